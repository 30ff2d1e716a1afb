"""Tiny checkpoints load the way their real counterparts do, and are fit for parity tests.

Figures (seed 0, measured when the init gains were tuned; asserted with margin below):
- llava-hf, "USER: <image>\\nWhat is in the picture? ASSISTANT:" (273 tokens) with a random-noise
  image / a flat red image: logits std 7.96 / 8.01; top1-top2 margin over all positions: median
  1.43 / 1.17, 10th percentile 0.29 / 0.20, min 0.001 / 0.002 (random weights: a few positions are
  near-ties, so parity tests should compare top-1 only where the reference margin exceeds their
  tolerance, or teacher-force); margin at the first generated token 1.89 / 0.036; greedy 32 tokens:
  32 / 31 distinct, never one token twice in a row; the two images give different continuations.
- LLaVA-RLHF LoRA on the sft LLaMA (15-token prompt): logits cosine 0.92 to the sft model's, top-1
  changed on 53% of positions, logits std 8.01 -> 8.01, median margin 2.15 -> 1.06.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from factedge.train.base.tiny import build_tiny
from factedge.train.base.tiny_weights import normal

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
LM_LAYER_KEYS = [
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.weight", "self_attn.v_proj.weight",
]


def _lm_keys(prefix: str = "") -> set[str]:
    keys = {f"{prefix}model.embed_tokens.weight", f"{prefix}model.norm.weight", f"{prefix}lm_head.weight"}
    keys |= {f"{prefix}model.layers.{i}.{k}" for i in range(2) for k in LM_LAYER_KEYS}
    return keys


def _load_bin_shards(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = torch.load(folder / shard, weights_only=True, map_location="cpu")
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(part)
        sd.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    return sd, index


def _images():
    rng = np.random.default_rng(0)
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)),
            Image.fromarray(np.full((224, 224, 3), (200, 30, 30), dtype=np.uint8))]


def _margins(logits: torch.Tensor) -> torch.Tensor:
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _file_hashes(root: Path) -> dict[str, str]:
    """sha256 per file, with the build folder's absolute path (named in configs) masked."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        data = path.read_bytes().replace(str(root.resolve()).encode(), b"<ROOT>")
        out[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


# ---------------------------------------------------------------- llava-hf
def test_llava_hf_files_and_keys(tiny_llava_hf, tiny_llava_hf_sharded):
    from safetensors import safe_open

    common = {"added_tokens.json", "config.json", "generation_config.json", "preprocessor_config.json",
              "processor_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"}
    assert {p.name for p in tiny_llava_hf.root.iterdir() if not p.name.startswith(".")} == common | {"model.safetensors"}
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    assert {p.name for p in tiny_llava_hf_sharded.root.iterdir() if not p.name.startswith(".")} == common | shards

    cfg = json.loads((tiny_llava_hf.root / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert (cfg["image_token_index"], cfg["pad_token_id"], cfg["vision_feature_layer"]) == (32000, 32001, -2)
    assert cfg["projector_hidden_act"] == "gelu" and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["text_config"]["vocab_size"] == 32064 and cfg["vision_config"]["image_size"] == 224
    assert json.loads((tiny_llava_hf.root / "added_tokens.json").read_text()) == {"<image>": 32000, "<pad>": 32001}
    pre = json.loads((tiny_llava_hf.root / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 224, "width": 224} and pre["size"] == {"shortest_edge": 224}

    with safe_open(tiny_llava_hf.root / "model.safetensors", "pt") as f:
        single = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    assert _lm_keys("language_model.") <= set(single)
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
            "vision_tower.vision_model.embeddings.class_embedding",
            "vision_tower.vision_model.post_layernorm.weight",
            "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias"} <= set(single)
    assert len(single) == 3 + 9 * 2 + 4 + (5 + 16 * 3 + 2)
    assert all(t.dtype == torch.float16 for t in single.values())
    assert single["language_model.model.embed_tokens.weight"].shape == (32064, 256)
    assert single["language_model.lm_head.weight"].shape == (32064, 256)
    assert single["multi_modal_projector.linear_1.weight"].shape == (256, 64)
    assert single["vision_tower.vision_model.embeddings.position_embedding.weight"].shape == (257, 64)
    # padding rows sit at the mean of the real rows, as llava-hf's converter leaves them
    emb = single["language_model.model.embed_tokens.weight"].float()
    assert torch.allclose(emb[32000:], emb[:32000].mean(0).expand(64, -1), atol=0.01)

    index = json.loads((tiny_llava_hf_sharded.root / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(single) and len(set(index["weight_map"].values())) == 2
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(tiny_llava_hf_sharded.root / shard, "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard and torch.equal(f.get_tensor(k), single[k])


def test_llava_hf_runs_in_transformers(tiny_llava_hf):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_hf.root, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(tiny_llava_hf.root)
    runs = []
    for image in _images():
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        assert inputs["pixel_values"].shape == (1, 3, 224, 224)
        assert int((inputs["input_ids"] == 32000).sum()) == 256
        with torch.no_grad():
            logits = model(**inputs).logits[0]
            gen = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert logits.shape == (inputs["input_ids"].shape[1], 32064) and torch.isfinite(logits).all()
        runs.append((logits, gen[0, inputs["input_ids"].shape[1]:].tolist()))
    for logits, tokens in runs:
        assert 6.0 < logits.std().item() < 10.0
        assert _margins(logits).median().item() > 0.8  # observed ~1.2-1.4
        assert len(set(tokens)) >= 28  # observed 31-32
        assert all(a != b for a, b in zip(tokens, tokens[1:]))
    # the image reaches the answer: another image, another continuation
    assert runs[0][1][:4] != runs[1][1][:4]


# ---------------------------------------------------------------- original LLaVA
@pytest.mark.parametrize("which", ["tiny_llava", "tiny_llava_linear"])
def test_llava_original_state_dict(which, request, tiny_llava_hf):
    ckpt = request.getfixturevalue(which)
    names = {p.name for p in ckpt.model_dir.iterdir()}
    assert names == {"config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
                     "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
                     "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"}
    cfg = json.loads((ckpt.model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava"
    assert (cfg["mm_hidden_size"], cfg["mm_vision_select_layer"], cfg["mm_vision_select_feature"]) == (64, -2, "patch")
    assert cfg["mm_use_im_start_end"] is False and cfg["mm_use_im_patch_token"] is False
    assert cfg["image_aspect_ratio"] == "pad" and cfg["vocab_size"] == 32000
    assert Path(cfg["mm_vision_tower"]) == ckpt.clip_dir and Path(cfg["mm_vision_tower"]).is_absolute()
    assert ("mm_projector_type" in cfg) == (ckpt.projector == "mlp2x_gelu")

    sd, index = _load_bin_shards(ckpt.model_dir)
    proj = {"model.mm_projector.0.weight": (256, 64), "model.mm_projector.0.bias": (256,),
            "model.mm_projector.2.weight": (256, 256), "model.mm_projector.2.bias": (256,)}
    if ckpt.projector == "linear":
        proj = {"model.mm_projector.weight": (256, 64), "model.mm_projector.bias": (256,)}
    assert set(sd) == _lm_keys() | set(proj)
    assert {k: tuple(sd[k].shape) for k in proj} == proj
    assert sd["model.embed_tokens.weight"].shape == sd["lm_head.weight"].shape == (32000, 256)
    assert all(t.dtype == torch.float16 for t in sd.values())
    # like LLaVA-v1.5, the projector lives in the last shard (llama.cpp's llava_surgery relies on it)
    assert {index["weight_map"][k] for k in proj} == {"pytorch_model-00002-of-00002.bin"}

    # same seed, same component, same numbers across layouts
    from safetensors import safe_open

    with safe_open(tiny_llava_hf.root / "model.safetensors", "pt") as f:
        hf_layer = f.get_tensor("language_model.model.layers.1.mlp.down_proj.weight")
        hf_vis = f.get_tensor("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], hf_layer)
    clip = torch.load(ckpt.clip_dir / "pytorch_model.bin", weights_only=True)
    assert torch.equal(clip["vision_model.encoder.layers.0.self_attn.q_proj.weight"].half(), hf_vis)


def test_clip_folder_is_a_clip_model(tiny_llava):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

    clip_dir = tiny_llava.clip_dir
    assert clip_dir.name == "clip-vit-large-patch14-336"
    assert {p.name for p in clip_dir.iterdir()} == {"config.json", "preprocessor_config.json", "pytorch_model.bin"}
    sd = torch.load(clip_dir / "pytorch_model.bin", weights_only=True)
    assert {"logit_scale", "visual_projection.weight", "text_projection.weight",
            "text_model.embeddings.token_embedding.weight", "vision_model.embeddings.position_ids"} <= set(sd)
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (577, 64)
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())
    model, info = CLIPModel.from_pretrained(clip_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    vision, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True)
    assert not info["missing_keys"]
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images=_images()[0], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 336, 336)
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    feats = hidden[-2][0, 1:]  # LLaVA: layer -2, CLS dropped
    assert feats.shape == (576, 64) and torch.isfinite(feats).all() and 0.3 < feats.std() < 10


# ---------------------------------------------------------------- LLaVA-RLHF
def _llama_from_sft(sft_dir: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((sft_dir / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keep}, rope_theta=cfg["rope_theta"])).eval()
    sd, _ = _load_bin_shards(sft_dir)
    lm = {k: v.float() for k, v in sd.items() if not k.startswith("model.mm_projector")}
    missing, unexpected = model.load_state_dict(lm, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return model


def test_llava_rlhf_layout_and_lora(tiny_llava_rlhf):
    from peft import PeftModel

    root = tiny_llava_rlhf.root
    assert root.name == "LLaVA-RLHF-tiny-224"
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == {
        "sft_model", "rlhf_lora_adapter_model", "clip-vit-large-patch14"}
    cfg = json.loads((tiny_llava_rlhf.model_dir / "config.json").read_text())
    assert "mm_projector_type" not in cfg and cfg["torch_dtype"] == "bfloat16"
    sd, _ = _load_bin_shards(tiny_llava_rlhf.model_dir)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert {k for k in sd if "mm_projector" in k} == {"model.mm_projector.weight", "model.mm_projector.bias"}

    adapter = tiny_llava_rlhf.adapter_dir
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"], acfg["lora_dropout"]) == ("LORA", 64, 16, 0.0)
    assert sorted(acfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora = torch.load(adapter / "adapter_model.bin", weights_only=True)
    assert len(lora) == 2 * 7 * 2
    assert lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (64, 256)
    assert lora["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (256, 64)
    assert lora["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (64, 512)
    assert all(t.dtype == torch.bfloat16 and t.abs().max() > 0 for t in lora.values())

    ids = torch.tensor([[1, 3148, 1001, 29901, 1724, 338, 297, 278, 7623, 29973, 319, 1799, 9047, 13566, 29901]])
    base = _llama_from_sft(tiny_llava_rlhf.model_dir)
    with torch.no_grad():
        before = base(ids).logits[0]
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        after = peft_model(ids).logits[0]
        merged = peft_model.merge_and_unload()(ids).logits[0]
    assert torch.isfinite(after).all()
    assert torch.allclose(merged, after, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0).item()
    assert 0.5 < cos < 0.99  # noticeable, sane (observed 0.92)
    changed = (before.argmax(-1) != after.argmax(-1)).float().mean().item()
    assert changed >= 0.3  # observed 0.53
    assert abs(after.std().item() - before.std().item()) < 1.0  # observed 8.01 -> 8.01
    assert _margins(after).median().item() > 0.5  # observed 1.06 (sft: 2.15)


# ---------------------------------------------------------------- determinism
def test_builds_are_byte_identical(tmp_path, tiny_llava_hf, tiny_llava_rlhf):
    """A fresh build (other folder, other process than the cached fixture) gives the same bytes; the
    adapter can also be written as safetensors, with the same tensors."""
    from safetensors.torch import load_file

    hf = build_tiny("llava-hf", tmp_path / "hf", seed=0)
    assert _file_hashes(hf) == _file_hashes(tiny_llava_hf.root)
    rlhf = build_tiny("llava-rlhf", tmp_path / "rlhf", seed=0, adapter_format="safetensors")
    fresh, cached = _file_hashes(rlhf), _file_hashes(tiny_llava_rlhf.root)
    adapter = "rlhf_lora_adapter_model/adapter_model"
    assert fresh.pop(f"{adapter}.safetensors") and cached.pop(f"{adapter}.bin")
    assert fresh == cached
    st = load_file(rlhf / f"{adapter}.safetensors")
    bin_ = torch.load(tiny_llava_rlhf.root / f"{adapter}.bin", weights_only=True)
    assert st.keys() == bin_.keys() and all(torch.equal(st[k], bin_[k]) for k in st)


def test_seed_changes_weights():
    a = normal(0, "model.layers.0.mlp.up_proj.weight", (4, 4), 1.0)
    assert torch.equal(a, normal(0, "model.layers.0.mlp.up_proj.weight", (4, 4), 1.0))
    assert not torch.equal(a, normal(1, "model.layers.0.mlp.up_proj.weight", (4, 4), 1.0))
    assert not torch.equal(a, normal(0, "model.layers.1.mlp.up_proj.weight", (4, 4), 1.0))


@pytest.mark.parametrize("kwargs", [
    {"layout": "llava-next"},
    {"layout": "llava-hf", "projector": "linear"},
    {"layout": "llava", "projector": "resampler"},
    {"layout": "llava", "image_size": 230},
    {"layout": "llava-rlhf", "adapter_format": "pt"},
])
def test_bad_options_refused_before_writing(kwargs, tmp_path):
    from factedge.edge.errors import ConfigError

    with pytest.raises(ConfigError):
        build_tiny(out_dir=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
