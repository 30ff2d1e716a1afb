"""The promise: converted GGUFs compute what PyTorch computes, on all three input layouts.

Each figure below is produced by factedge.convert.verify (what `factedge verify` prints) and
asserted against the thresholds of issue #2. The patches each have a test here that fails without
them: 0001 (CLS order) and 0003 (linear projector) every embedding test; 0002 (layer count)
`test_legacy_mmproj_without_feature_layer_key`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.fidelity import EmbeddingFigures
from factedge.convert.layouts import load_checkpoint
from factedge.convert.mmproj import write_mmproj
from factedge.convert.reference import TorchLlava
from factedge.convert.verify import VerifyOptions, sample_images, verify_bundle
from factedge.edge.image import prepare_image
from factedge.edge.image_encoder import ImageEncoder
from factedge.edge.runtime import Model

LAYOUTS = ["tiny_llava_hf", "tiny_llava", "tiny_llava_rlhf"]
OPTIONS = dict(base_type="f32", quants=["Q8_0", "Q4_K_M"], mmproj_types=["f32", "f16", "q8_0"], verify=False)


@pytest.fixture(scope="module", params=LAYOUTS)
def converted(request, tmp_path_factory, convert_and_verify):
    """(checkpoint, bundle folder, verify report) for each layout, LoRA merged for LLaVA-RLHF."""
    return convert_and_verify(request, tmp_path_factory, OPTIONS)


def test_image_embeddings_match_pytorch(converted):
    ckpt, _, report = converted
    f32, f16 = report.embeddings["f32"], report.embeddings["f16"]
    assert [f.image for f in f32] == ["square-native", "square-2x", "wide-3x2"]
    assert all(f.tokens == ckpt.vision.tokens_per_image for f in f32)
    assert min(f.min_cosine for f in f32) >= 0.9999, f32
    assert min(f.min_cosine for f in f16) >= 0.999, f16
    assert min(f.min_cosine for f in report.embeddings["q8_0"]) >= 0.998  # reported; q8_0 has no promise


def test_logits_after_an_image_prompt_match_pytorch(converted):
    _, _, report = converted
    f32, q8, q4 = report.logits["F32"], report.logits["Q8_0"], report.logits["Q4_K_M"]
    assert f32.positions > 256  # the image tokens and the text around them
    assert f32.top1_agreement == 1.0
    assert f32.mean_kl <= 1e-5
    assert f32.greedy_identical and len(f32.greedy_ref) == 32
    # Quantized files: on these random-weight models about half the positions are near-ties (Gaussian
    # logits), which Q8_0 flips at a rate that depends on the machine's kernels (0.948 on one machine,
    # 0.961 on another): plain top-1 agreement is reported, not asserted. What must hold everywhere is
    # asserted: every position where PyTorch has a real margin (>= DECIDED_MARGIN nats) keeps its
    # top-1, and the mean KL (an average over ~300 positions, stable across kernels) stays small.
    assert q8.decided_positions >= 0.3 * q8.positions and q8.decided_agreement == 1.0, q8
    assert q8.mean_kl <= 2e-2, q8  # measured 0.006-0.007
    assert q4.decided_agreement >= 0.7 and np.isfinite(q4.mean_kl), q4  # reported, not promised (0.85 measured)
    assert report.failures() == []


def test_tokenizer_vectors_reproduced_exactly(converted, vocab_gguf):
    from factedge.edge.tokenizer_vectors import read_test_vectors

    _, bundle, report = converted
    # what `factedge verify` reports: the GGUF against the checkpoint's own HF tokenizer
    # llama.cpp's 46 test texts, 4 more (digits, whitespace, scripts) and 3-4 with special tokens
    assert report.tokenizer["texts"] >= 53 and report.tokenizer["mismatches"] == 0, report.tokenizer
    with Model(bundle / "model-f32.gguf", vocab_only=True) as model:
        vectors = read_test_vectors(vocab_gguf)
        assert len(vectors) >= 40
        bad = [(text, ids) for text, ids in vectors if model.tokenize(text, add_bos=False, special=False) != ids]
        assert bad == []


def test_legacy_mmproj_without_feature_layer_key(tiny_llava_hf, tmp_path):
    """Without clip.vision.feature_layer, only patch 0002 makes llama.cpp stop at hidden_states[-2]."""
    ckpt = load_checkpoint(tiny_llava_hf.root)
    bundle = tmp_path / "b"
    convert_checkpoint(tiny_llava_hf.root, bundle, ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"],
                                                                  verify=False), ckpt=ckpt)
    legacy = write_mmproj(ckpt, tmp_path / "legacy.gguf", ftype="f32", feature_layer_key=False)
    ref = TorchLlava.from_checkpoint(ckpt)
    name, image = sample_images(ckpt.vision.image_size)[0]
    pixels = prepare_image(image, ckpt.vision.image_size)
    with Model(bundle / "model-f32.gguf") as model, ImageEncoder(legacy, model) as enc:
        figs = EmbeddingFigures.compare(name, ref.image_embeddings(pixels), enc.encode(pixels))
    assert figs.min_cosine >= 0.9999, figs


def test_a_different_feature_layer_is_honoured(tiny_llava_hf, tmp_path):
    """feature layer -3 (hidden_states[1] of 3 layers): fewer layers stored and run, same parity."""
    base = load_checkpoint(tiny_llava_hf.root)
    ckpt = dataclasses.replace(base, vision=dataclasses.replace(base.vision, feature_layer=-3))
    bundle = tmp_path / "b"
    convert_checkpoint(tiny_llava_hf.root, bundle, ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"],
                                                                  verify=False), ckpt=ckpt)
    ref = TorchLlava.from_checkpoint(ckpt)
    name, image = sample_images(ckpt.vision.image_size)[1]
    pixels = prepare_image(image, ckpt.vision.image_size)
    with Model(bundle / "model-f32.gguf") as model, ImageEncoder(bundle / "mmproj-f32.gguf", model) as enc:
        figs = EmbeddingFigures.compare(name, ref.image_embeddings(pixels), enc.encode(pixels))
    assert figs.min_cosine >= 0.9999, figs


@pytest.fixture(scope="module")
def rlhf_both(tiny_llava_rlhf, tmp_path_factory):
    """LLaVA-RLHF converted twice: LoRA merged into the LM, and kept as a runtime GGUF adapter."""
    ckpt = load_checkpoint(tiny_llava_rlhf.root)
    root = tmp_path_factory.mktemp("rlhf-lora")
    opts = dict(base_type="f32", quants=[], mmproj_types=["f32"], verify=False)
    convert_checkpoint(tiny_llava_rlhf.root, root / "merged", ConvertOptions(lora_mode="merge", **opts), ckpt=ckpt)
    convert_checkpoint(tiny_llava_rlhf.root, root / "adapter", ConvertOptions(lora_mode="adapter", **opts), ckpt=ckpt)
    return ckpt, root


def test_lora_merged_runtime_adapter_and_peft_agree(rlhf_both):
    ckpt, root = rlhf_both
    _, merged = verify_bundle(root / "merged", ckpt, VerifyOptions(n_greedy=32))
    _, adapter = verify_bundle(root / "adapter", ckpt, VerifyOptions(n_greedy=32))
    m, a = merged.logits["F32"], adapter.logits["F32+adapter"]
    # the reference in both cases is PEFT applied unmerged, as LLaVA-RLHF's authors run it
    assert m.greedy_ref == a.greedy_ref and len(m.greedy_ref) == 32
    assert m.greedy_gguf == m.greedy_ref, "merged GGUF differs from PEFT"
    assert a.greedy_gguf == a.greedy_ref, "runtime adapter GGUF differs from PEFT"
    assert m.top1_agreement == 1.0 and a.top1_agreement == 1.0
    assert m.mean_kl <= 1e-5 and a.mean_kl <= 1e-5


def test_lora_changes_the_answer(rlhf_both):
    """The adapter matters (else the test above proves nothing): the SFT base answers differently."""
    ckpt, root = rlhf_both
    base = dataclasses.replace(ckpt, adapter_dir=None)
    ref = TorchLlava.from_checkpoint(base)
    _, with_lora = verify_bundle(root / "merged", ckpt, VerifyOptions(n_greedy=16))
    image = prepare_image(sample_images(ckpt.vision.image_size)[0][1], ckpt.vision.image_size)
    with Model(root / "merged" / "model-f32.gguf", vocab_only=True) as vocab:
        from factedge.convert.verify import prompt_segments

        pieces = prompt_segments(vocab, VerifyOptions().question)
    sft = ref.greedy([image if p is None else p for p in pieces], 16, stop_at_eos=False)
    assert sft != with_lora.logits["F32"].greedy_ref[:16]


def test_native_cli_gives_the_python_runtime_text(converted, tmp_path):
    """llama-mtmd-cli (greedy) and factedge's Python runtime produce the same text on the same files."""
    import subprocess

    from PIL import Image

    from factedge.edge.native import tool
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    from factedge.edge.native import build_info

    if not build_info().get("tools", True):
        pytest.skip("llama-mtmd-cli not built (FACTEDGE_TOOLS=OFF); scripts/test.sh builds it")
    ckpt, bundle, _ = converted
    size = ckpt.vision.image_size
    image = tmp_path / "img.png"  # model-sized: neither side resizes it
    Image.fromarray(prepare_image(sample_images(size)[0][1], size)).save(image)
    question = "Describe the image."
    cmd = [str(tool("llama-mtmd-cli")), "-m", str(bundle / "model-f32.gguf"), "--mmproj", str(bundle / "mmproj-f32.gguf"),
           "--image", str(image), "-p", "<__media__>\n" + question, "--jinja", "--temp", "0", "-n", "24", "--seed", "0",
           "-c", "2048", "--no-warmup"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = ModelOptions(n_ctx=2048, sampling=SamplingOptions(max_tokens=24))
    with VisionModel.open(bundle, quant="F32", options=options) as chat:
        answer = chat.ask(question, image)
    assert answer.text and len(answer.tokens) >= 8
    assert proc.stdout.strip().endswith(answer.text), (proc.stdout[-500:], answer.text)
