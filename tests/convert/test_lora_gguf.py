"""The PEFT adapter as a llama.cpp GGUF LoRA: shapes the loader accepts, values that reproduce the merge."""

from __future__ import annotations

import pytest
import torch

from factedge.convert.language_model import write_language_model
from factedge.convert.layouts import load_checkpoint
from factedge.convert.lora_gguf import write_lora_adapter
from factedge.convert.merge import merged_lm_tensors, read_adapter
from factedge.edge.errors import ConfigError


@pytest.fixture(scope="module")
def rlhf_ggufs(rlhf_dir, tmp_path_factory):
    """(checkpoint, base f32 GGUF, merged f32 GGUF, adapter f32 GGUF)."""
    ckpt = load_checkpoint(rlhf_dir)
    out = tmp_path_factory.mktemp("lora")
    base = write_language_model(ckpt, out / "base.gguf", ftype="f32")
    merged = write_language_model(ckpt, out / "merged.gguf", ftype="f32", tensors=merged_lm_tensors(ckpt, ckpt.adapter_dir))
    lora = write_lora_adapter(ckpt, out / "lora.gguf", ftype="f32", extra_kv={"factedge.source_sha256": "00" * 32})
    return ckpt, base, merged, lora


def test_metadata_and_shapes_as_llama_adapter_expects(rlhf_ggufs, gguf_io):
    ckpt, base, _, lora = rlhf_ggufs
    f = gguf_io.fields(lora)
    assert (f["general.architecture"], f["general.type"], f["adapter.type"]) == ("llama", "adapter", "lora")
    assert f["adapter.lora.alpha"] == 16.0 and f["factedge.source_sha256"] == "00" * 32
    from gguf import GGUFReader

    model = {t.name: [int(d) for d in t.shape] for t in GGUFReader(base).tensors}  # ggml ne order
    adapter = {t.name: [int(d) for d in t.shape] for t in GGUFReader(lora).tensors}
    assert len(adapter) == 28 and set(gguf_io.types(lora).values()) == {"F32"}
    for name, ne in model.items():
        if f"{name}.lora_a" not in adapter:
            continue
        a, b = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]
        # the checks in llama.cpp src/llama-adapter.cpp (non-embedding case)
        assert ne[0] == a[0] and ne[1] == b[1] and a[1] == b[0] == 64, name


def test_base_plus_adapter_reproduces_merge(rlhf_ggufs, gguf_io):
    """What llama.cpp computes, W' + (alpha/r) B' A', equals the merged GGUF tensor (permuted too)."""
    ckpt, base, merged, lora = rlhf_ggufs
    w, m, ab = gguf_io.tensors(base), gguf_io.tensors(merged), gguf_io.tensors(lora)
    scale = 16.0 / 64
    worst, checked = 0.0, 0
    for name in w:
        if f"{name}.lora_a" not in ab:
            assert (w[name] == m[name]).all(), name
            continue
        a, b = torch.from_numpy(ab[f"{name}.lora_a"]), torch.from_numpy(ab[f"{name}.lora_b"])
        applied = torch.from_numpy(w[name]) + scale * (b @ a)
        worst = max(worst, (applied - torch.from_numpy(m[name])).abs().max().item())
        checked += 1
    assert checked == 14 and worst <= 1e-5, worst


def test_lora_tensors_are_peft_tensors(rlhf_ggufs, gguf_io):
    ckpt, _, _, lora = rlhf_ggufs
    ab = gguf_io.tensors(lora)
    pair = read_adapter(ckpt.adapter_dir).targets["lm"]["model.layers.0.mlp.up_proj.weight"]
    a, b = pair.load()
    assert torch.equal(torch.from_numpy(ab["blk.0.ffn_up.weight.lora_a"]), a)
    assert torch.equal(torch.from_numpy(ab["blk.0.ffn_up.weight.lora_b"]), b)


def test_f16_adapter_and_refusals(rlhf_dir, llava_dir, tmp_path, gguf_io):
    ckpt = load_checkpoint(rlhf_dir)
    out = write_lora_adapter(ckpt, tmp_path / "lora16.gguf")
    assert set(gguf_io.types(out).values()) == {"F16"}
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        write_lora_adapter(load_checkpoint(llava_dir), tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora16.gguf"]
