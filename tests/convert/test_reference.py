"""The PyTorch reference equals HF's own LLaVA, loads strictly, and applies LoRA the PEFT way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from factedge.convert.layouts import load_checkpoint
from factedge.convert.reference import TorchLlava
from factedge.edge.errors import ConfigError, InputError, MismatchError

# "USER: <image>\nWhat is in the picture? ASSISTANT:" around the image, as SPM ids (no tokenizer needed)
PROMPT_HEAD = [1, 3148, 1001, 29901, 29871]
PROMPT_TAIL = [13, 5618, 338, 297, 278, 7623, 29973, 319, 1799, 9047, 13566, 29901]


def _image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_pair(tiny_llava_hf):
    """(our reference, HF LlavaForConditionalGeneration) over the same tiny llava-hf folder."""
    from transformers import LlavaForConditionalGeneration

    ckpt = load_checkpoint(tiny_llava_hf.root)
    ref = TorchLlava.from_checkpoint(ckpt)
    hf = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_hf.root, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return ref, hf


def _hf_image_features(hf, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf.get_image_features(
            pixel_values=torch.from_numpy(pixels), vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 / 4
    return feats[0].numpy()


def test_image_embeddings_equal_hf_get_image_features(hf_pair):
    ref, hf = hf_pair
    for img in (_image(), _image(224, 224, seed=1), _image(150, 400, seed=2)):
        ours = ref.image_embeddings(img)
        theirs = _hf_image_features(hf, ref.pixel_values(img))
        assert ours.shape == (256, 256) and ours.dtype == np.float32
        assert float(np.abs(ours - theirs).max()) <= 1e-5
        assert float(np.abs(ours).max()) > 1.0  # not a degenerate all-zero comparison


def _hf_input_ids(hf) -> list[int]:
    return PROMPT_HEAD + [hf.config.image_token_id] * 256 + PROMPT_TAIL


def test_logits_equal_hf_full_forward(hf_pair):
    ref, hf = hf_pair
    img = _image()
    ids = _hf_input_ids(hf)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(ref.pixel_values(img))).logits[0]
    ours = ref.logits([PROMPT_HEAD, img, PROMPT_TAIL])
    assert ours.shape == (len(ids), 32064)
    scale = float(np.abs(theirs.numpy()).max())
    assert float(np.abs(ours - theirs.numpy()).max()) <= 1e-5 * max(scale, 1.0)
    # the image matters: another picture moves the logits after it
    other = ref.logits([PROMPT_HEAD, _image(seed=7), PROMPT_TAIL])
    assert float(np.abs(other[-1] - ours[-1]).max()) > 0.1


def test_greedy_equals_hf_generate(hf_pair):
    ref, hf = hf_pair
    img = _image()
    ids = _hf_input_ids(hf)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(ref.pixel_values(img)),
                          max_new_tokens=12, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    ours = ref.greedy([PROMPT_HEAD, img, PROMPT_TAIL], 12)
    assert ours == theirs
    assert len(set(ours)) > 3  # not a degenerate repeat


def test_precomputed_embeddings_segment_equals_image_segment(hf_pair):
    ref, _ = hf_pair
    img = _image(seed=3)
    direct = ref.logits([PROMPT_HEAD, img, PROMPT_TAIL])
    spliced = ref.logits([PROMPT_HEAD, ref.image_embeddings(img), PROMPT_TAIL])
    assert float(np.abs(direct - spliced).max()) == 0.0
    with pytest.raises(InputError):
        ref.logits([PROMPT_HEAD, np.zeros((4, 7), np.float32)])
    with pytest.raises(InputError, match="out of range"):
        ref.logits([[1, 40000]])


def test_linear_projector_matches_clip_plus_linear(tiny_llava_linear):
    """Original LLaVA without mm_projector_type: CLIP hidden_states[-2] patches through one Linear."""
    from transformers import CLIPVisionModel

    ckpt = load_checkpoint(tiny_llava_linear.root)
    assert ckpt.projector_type == "linear"
    ref = TorchLlava.from_checkpoint(ckpt)
    clip = CLIPVisionModel.from_pretrained(tiny_llava_linear.clip_dir, dtype=torch.float32,
                                           attn_implementation="eager").eval()
    proj = dict(ckpt.projector_tensors())
    w, b = proj["0.weight"]().float(), proj["0.bias"]().float()
    img = _image(seed=5)
    with torch.no_grad():
        hidden = clip(torch.from_numpy(ref.pixel_values(img)), output_hidden_states=True).hidden_states[-2][0, 1:]
        expected = (hidden @ w.T + b).numpy()
    assert float(np.abs(ref.image_embeddings(img) - expected).max()) <= 1e-5


def _with_vision(ckpt, edit):
    """A copy of `ckpt` whose vision tensors pass through `edit(list of (name, loader))`."""
    original = ckpt._vision
    return dataclasses.replace(ckpt, _vision=lambda: iter(edit(list(original()))))


def test_strict_loading_names_the_offending_tensor(tiny_llava_hf):
    ckpt = load_checkpoint(tiny_llava_hf.root)
    dropped = _with_vision(ckpt, lambda ts: [t for t in ts if t[0] != "encoder.layers.1.mlp.fc2.bias"])
    with pytest.raises(MismatchError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        TorchLlava.from_checkpoint(dropped)
    extra = _with_vision(ckpt, lambda ts: ts + [("encoder.layers.9.mlp.fc2.bias", lambda: torch.zeros(64))])
    with pytest.raises(MismatchError, match="no place"):
        TorchLlava.from_checkpoint(extra)
    wrong = _with_vision(ckpt, lambda ts: [(n, (lambda: torch.zeros(3, 3)) if n == "pre_layrnorm.bias" else f)
                                           for n, f in ts])
    with pytest.raises(MismatchError, match=r"pre_layrnorm\.bias.*shape"):
        TorchLlava.from_checkpoint(wrong)
    with pytest.raises(ConfigError):
        TorchLlava.from_checkpoint(ckpt, adapter="peft")  # llava-hf has no adapter


@pytest.fixture(scope="module")
def rlhf_refs(tiny_llava_rlhf):
    ckpt = load_checkpoint(tiny_llava_rlhf.root)
    return ckpt, {mode: TorchLlava.from_checkpoint(ckpt, adapter=mode) for mode in (None, "peft", "merged")}


def test_rlhf_adapter_peft_equals_merged_and_changes_the_policy(rlhf_refs):
    from peft import PeftModel

    ckpt, refs = rlhf_refs
    assert ckpt.projector_type == "linear"
    assert isinstance(refs["peft"].lm, PeftModel) and not isinstance(refs["merged"].lm, PeftModel)
    segments = [PROMPT_HEAD, _image(seed=6), PROMPT_TAIL]
    logits = {mode: ref.logits(segments) for mode, ref in refs.items()}
    scale = float(np.abs(logits["peft"]).max())
    assert float(np.abs(logits["peft"] - logits["merged"]).max()) <= 1e-5 * scale
    assert float(np.abs(logits["peft"] - logits[None]).max()) > 0.1 * scale  # the adapter is really applied
    assert refs["peft"].greedy(segments, 8) == refs["merged"].greedy(segments, 8)


def test_peft_merge_equals_factedge_streaming_merge(rlhf_refs):
    """Two independent merges of the LLaVA-RLHF LoRA (PEFT's and convert.merge's) agree."""
    from factedge.convert.merge import merged_lm_tensors

    ckpt, refs = rlhf_refs
    params = dict(refs["merged"].lm.named_parameters())
    worst = 0.0
    for name, load in merged_lm_tensors(ckpt, ckpt.adapter_dir):
        ours = load().float()
        worst = max(worst, float((ours - params[name].detach()).abs().max()))
    assert worst <= 1e-5
