"""Reading the three checkpoint layouts into canonical form, and refusing bad input with typed errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from factedge.convert.layouts import detect_layout, load_checkpoint
from factedge.convert.shapes import lm_shapes, projector_shapes, vision_shapes
from factedge.edge.errors import (
    ConfigError,
    CorruptFileError,
    InputError,
    LayoutError,
    MismatchError,
    UnsafePickleError,
)
from factedge.train.base import tiny_weights as tw


def _materialise(lazy) -> dict[str, torch.Tensor]:
    return {name: load() for name, load in lazy}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert list(got) == [k for k in got if k in want] and set(got) <= set(want), set(got) - set(want)
    for name, tensor in got.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, want[name].to(dtype)), name


def test_detect(llava_hf_dir, llava_dir, rlhf_dir):
    assert detect_layout(llava_hf_dir) == "llava-hf"
    assert detect_layout(llava_dir) == "llava"
    assert detect_layout(rlhf_dir) == "llava-rlhf"


def test_llava_hf_reads_canonical(llava_hf_dir):
    ckpt = load_checkpoint(llava_hf_dir)
    text, vision = tw.tiny_text(32064), tw.tiny_vision()
    assert ckpt.layout == "llava-hf" and ckpt.projector_type == "mlp2x_gelu"
    assert ckpt.text == text.__class__(**{**text.__dict__, "pad_token_id": 32001})
    assert (ckpt.image_token_id, ckpt.vision.tokens_per_image, ckpt.vision.feature_layer) == (32000, 256, -2)
    assert ckpt.vision.select_feature == "patch" and ckpt.vision.hidden_size == 64
    lm = _materialise(ckpt.lm_tensors())
    assert list(lm) == list(lm_shapes(ckpt.text))
    _assert_same(lm, tw.text_weights(text, 0), torch.float16)
    vis = _materialise(ckpt.vision_tensors())
    assert list(vis) == list(vision_shapes(vision))
    _assert_same(vis, {k.removeprefix("vision_model."): v for k, v in tw.vision_weights(vision, 0).items()}, torch.float16)
    proj = _materialise(ckpt.projector_tensors())
    _assert_same(proj, tw.projector_weights("mlp2x_gelu", vision, text, 0), torch.float16)
    names = {p.name for p in ckpt.source_files}
    assert {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.model"} <= names  # fmt: skip


def test_llava_hf_new_key_names(llava_hf_dir, tmp_path):
    """transformers>=4.52 saves model.language_model.* / model.vision_tower.* / lm_head.weight."""
    from safetensors.torch import load_file, save_file

    new = tmp_path / "new"
    shutil.copytree(llava_hf_dir, new, ignore=shutil.ignore_patterns("model*.safetensors*"))
    sd = {}
    for shard in sorted(llava_hf_dir.glob("model-*.safetensors")):
        sd.update(load_file(shard))
    renamed = {}
    for key, value in sd.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        elif key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        else:
            key = "model." + key
        renamed[key] = value
    save_file(renamed, str(new / "model.safetensors"))
    old, ckpt = load_checkpoint(llava_hf_dir), load_checkpoint(new)
    for a, b in ((old.lm_tensors, ckpt.lm_tensors), (old.vision_tensors, ckpt.vision_tensors),
                 (old.projector_tensors, ckpt.projector_tensors)):  # fmt: skip
        got, want = _materialise(b()), _materialise(a())
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_original_llava_with_clip_folder(llava_dir):
    ckpt = load_checkpoint(llava_dir)
    text, vision = tw.tiny_text(), tw.tiny_vision(336)
    assert ckpt.layout == "llava" and ckpt.projector_type == "mlp2x_gelu" and ckpt.image_token_id is None
    assert ckpt.text == text and ckpt.text.pad_token_id == 0 == ckpt.text.unk_token_id
    assert ckpt.vision == vision and ckpt.vision.tokens_per_image == 576
    _assert_same(_materialise(ckpt.lm_tensors()), tw.text_weights(text, 0), torch.float16)
    clip = {k.removeprefix("vision_model."): v for k, v in tw.vision_weights(vision, 0).items()}
    _assert_same(_materialise(ckpt.vision_tensors()), clip, torch.float32)  # CLIP folder is fp32
    _assert_same(_materialise(ckpt.projector_tensors()), tw.projector_weights("mlp2x_gelu", vision, text, 0), torch.float16)
    assert any(p.name == "pytorch_model.bin" and p.parent.name.startswith("clip") for p in ckpt.source_files)


def test_llava_rlhf(rlhf_dir):
    ckpt = load_checkpoint(rlhf_dir)
    assert ckpt.layout == "llava-rlhf" and ckpt.root == rlhf_dir and ckpt.projector_type == "linear"
    assert ckpt.adapter_dir == rlhf_dir / "rlhf_lora_adapter_model"
    assert ckpt.tokenizer_dir == rlhf_dir / "sft_model"
    text = tw.tiny_text()
    _assert_same(_materialise(ckpt.lm_tensors()), tw.text_weights(text, 0), torch.bfloat16)
    assert list(dict(ckpt.projector_tensors())) == list(projector_shapes("linear", 64, 256))
    assert any(p.name == "adapter_model.bin" for p in ckpt.source_files)


def test_bare_linear_projector_and_vision_tower_override(llava_dir, tmp_path):
    """Original LLaVA's linear projector is an nn.Linear (`model.mm_projector.weight`)."""
    root = tmp_path / "m"
    shutil.copytree(llava_dir, root, ignore=shutil.ignore_patterns("pytorch_model*"))
    sd = {}
    for shard in sorted(llava_dir.glob("pytorch_model-*.bin")):
        sd.update(torch.load(shard, weights_only=True))
    sd = {k: v for k, v in sd.items() if not k.startswith("model.mm_projector.")}
    sd["model.mm_projector.weight"] = torch.ones(256, 64)
    sd["model.mm_projector.bias"] = torch.zeros(256)
    torch.save(sd, root / "pytorch_model.bin")
    cfg = json.loads((root / "config.json").read_text())
    clip = Path(cfg.pop("mm_vision_tower"))
    del cfg["mm_projector_type"]
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="vision tower") as err:
        load_checkpoint(root)
    assert "config.json" in str(err.value)
    ckpt = load_checkpoint(root, vision_tower=clip)
    proj = _materialise(ckpt.projector_tensors())
    assert ckpt.projector_type == "linear" and list(proj) == ["0.weight", "0.bias"]
    assert torch.equal(proj["0.weight"], torch.ones(256, 64))


# ---------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_names_file(llava_hf_dir, tmp_path):
    root = _copy(llava_hf_dir, tmp_path / "m")
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(root)


@pytest.mark.parametrize("damage", ["truncate", "header", "size"])
def test_corrupt_safetensors(llava_hf_dir, tmp_path, damage):
    root = _copy(llava_hf_dir, tmp_path / "m")
    shard = root / "model-00001-of-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header":
        raw[8:12] = b"\xff\xfe{x"
    else:  # a shape that does not match its byte range
        header = json.loads(raw[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"][0] += 1
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(blob) == n
        raw[8 : 8 + n] = blob
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="model-00001-of-00002.safetensors") as err:
        load_checkpoint(root)
    assert "\n" not in str(err.value)


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(LayoutError, match="LlavaForConditionalGeneration.*LlavaLlamaForCausalLM.*sft_model"):
        load_checkpoint(tmp_path)
    with pytest.raises(LayoutError, match="config.json"):
        detect_layout(tmp_path / "..")
    with pytest.raises(InputError, match="missing"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ConfigError):
        load_checkpoint(tmp_path, layout="gpt2")  # type: ignore[arg-type]


def test_shape_mismatch_with_config(llava_dir, tmp_path):
    root = _copy(llava_dir, tmp_path / "m")
    cfg = json.loads((root / "config.json").read_text())
    cfg["intermediate_size"] = 1024
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MismatchError, match=r"mlp.gate_proj.weight: shape \[512, 256\] but config.json implies \[1024, 256\]") as err:
        load_checkpoint(root)
    assert "pytorch_model-0000" in str(err.value)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 512, 3
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MismatchError, match="model.layers.2.input_layernorm.weight missing"):
        load_checkpoint(root)


class _Evil:
    def __reduce__(self):
        import os

        return (os.getpid, ())


def test_unsafe_pickle_refused(llava_dir, tmp_path):
    root = _copy(llava_dir, tmp_path / "m")
    shard = root / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["evil"] = _Evil()  # unpickling would call os.getpid: weights_only must refuse it
    torch.save(sd, shard)
    with pytest.raises(UnsafePickleError, match="pytorch_model-00002-of-00002.bin"):
        load_checkpoint(root)


def test_bad_lora_folder(llava_dir, tmp_path):
    with pytest.raises(InputError, match="adapter_config.json"):
        load_checkpoint(llava_dir, lora=tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="adapter_model"):
        load_checkpoint(llava_dir, lora=tmp_path)


def test_truncated_pickle(llava_dir, tmp_path):
    root = _copy(llava_dir, tmp_path / "m")
    shard = root / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:4096])
    with pytest.raises(CorruptFileError, match=r"pytorch_model-00001-of-00002.bin: not a readable torch checkpoint") as err:
        load_checkpoint(root)
    assert "\n" not in str(err.value)


def test_vision_tower_from_local_hub_cache(llava_dir, tmp_path, monkeypatch):
    """mm_vision_tower names a hub id: a snapshot already in the HF cache is used (never downloaded)."""
    root = _copy(llava_dir, tmp_path / "m")
    cfg = json.loads((root / "config.json").read_text())
    clip = Path(cfg["mm_vision_tower"])
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (root / "config.json").write_text(json.dumps(cfg))
    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14-336"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(clip, repo / "snapshots" / "abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = load_checkpoint(root)
    assert ckpt.vision.image_size == 336
    assert any(p.parent == repo / "snapshots" / "abc123" for p in ckpt.source_files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="'openai/clip-vit-large-patch14-336' is not a local folder"):
        load_checkpoint(root)
