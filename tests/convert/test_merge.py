"""Streaming LoRA merge: equals PEFT's merge_and_unload, checks the base, bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from factedge.convert.language_model import write_language_model
from factedge.convert.layouts import load_checkpoint
from factedge.convert.merge import merged_lm_tensors, read_adapter
from factedge.edge.errors import CorruptFileError, MismatchError, NumericsError


def _adapter_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a PEFT folder with its tensors passed through `edit(dict) -> dict` (saved as safetensors)."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    sd = torch.load(src / "adapter_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in edit(sd).items()}, str(dst / "adapter_model.safetensors"))
    return dst


def _merged(ckpt, adapter_dir, **kw) -> dict[str, torch.Tensor]:
    return {name: load() for name, load in merged_lm_tensors(ckpt, adapter_dir, **kw)}


def test_read_adapter(rlhf_dir):
    ad = read_adapter(rlhf_dir / "rlhf_lora_adapter_model")
    assert (ad.r, ad.alpha, ad.use_rslora, ad.file.name) == (64, 16.0, False, "adapter_model.bin")
    pairs = ad.targets["lm"]
    assert set(ad.targets) == {"lm"} and len(pairs) == 14
    q = pairs["model.layers.1.self_attn.q_proj.weight"]
    assert (q.a.shape, q.b.shape, q.shape, ad.scaling(q)) == ((64, 256), (256, 64), (256, 256), 0.25)


def test_merge_equals_peft_merge_and_unload(rlhf_dir):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = load_checkpoint(rlhf_dir)
    t = ckpt.text
    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                      rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings)  # fmt: skip
    model = LlamaForCausalLM(cfg).float()
    missing, unexpected = model.load_state_dict({n: l().float() for n, l in ckpt.lm_tensors()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    reference = PeftModel.from_pretrained(model, ckpt.adapter_dir).merge_and_unload().state_dict()
    merged = _merged(ckpt, ckpt.adapter_dir)
    worst = max((merged[n] - reference[n]).abs().max().item() for n in merged)
    assert worst <= 1e-5, worst
    base = {n: l().float() for n, l in ckpt.lm_tensors()}
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert len(changed) == 14 and all(merged[n].dtype == torch.float32 for n in changed)
    # scale multiplies the adapter's contribution, as llama.cpp's --lora-scaled does
    half = _merged(ckpt, ckpt.adapter_dir, scale=0.5)
    n = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(half[n] - base[n], (merged[n] - base[n]) / 2, atol=1e-6)


def test_other_key_prefix_and_safetensors(rlhf_dir, tmp_path):
    """PEFT around a bare LlamaModel names keys base_model.model.layers.* (no inner `model.`)."""
    ckpt = load_checkpoint(rlhf_dir)
    strip = lambda sd: {k.replace("base_model.model.model.", "base_model.model."): v for k, v in sd.items()}  # noqa: E731
    other = _adapter_copy(ckpt.adapter_dir, tmp_path / "a", strip)
    a, b = _merged(ckpt, ckpt.adapter_dir), _merged(ckpt, other)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_adapter_for_another_base_refused(rlhf_dir, tmp_path):
    ckpt = load_checkpoint(rlhf_dir)

    def widen(sd):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        return {**sd, key: torch.zeros(64, 512)}

    other = _adapter_copy(ckpt.adapter_dir, tmp_path / "a", widen)
    with pytest.raises(MismatchError, match=r"adapter_model.safetensors.*different base.*q_proj.weight is \[256, 512\]"):
        merged_lm_tensors(ckpt, other)
    deeper = _adapter_copy(ckpt.adapter_dir, tmp_path / "b", lambda sd: {
        **sd, "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(64, 256),
        "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": torch.zeros(512, 64)})  # fmt: skip
    with pytest.raises(MismatchError, match="layers.7.mlp.up_proj.weight, which the base model does not have"):
        merged_lm_tensors(ckpt, deeper)
    lonely = _adapter_copy(ckpt.adapter_dir, tmp_path / "c", lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj.lora_B" not in k})
    with pytest.raises(CorruptFileError, match="lora_B missing"):
        merged_lm_tensors(ckpt, lonely)


def test_non_finite_merge_raises_and_writes_nothing(rlhf_dir, tmp_path):
    ckpt = load_checkpoint(rlhf_dir)

    def poison(sd):
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        bad = sd[key].clone()
        bad[3, 5] = float("inf")
        return {**sd, key: bad}

    bad = _adapter_copy(ckpt.adapter_dir, tmp_path / "a", poison)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NumericsError, match="layers.1.mlp.down_proj.weight is not finite") as err:
        write_language_model(ckpt, out / "lm.gguf", tensors=merged_lm_tensors(ckpt, bad))
    assert "adapter_model.safetensors" in str(err.value) and list(out.iterdir()) == []


_PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from factedge.convert.merge import merged_lm_tensors
    from factedge.convert.specs import Checkpoint, TextSpec, VisionSpec
    from factedge.convert.weights import index_files, loader

    PAGE = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    folder = Path(sys.argv[1])
    text = TextSpec(**json.loads(sys.argv[2]))
    refs = index_files([folder / "model.safetensors"])
    ckpt = Checkpoint(layout="llava", root=folder, text=text, vision=VisionSpec(224, 14, 64, 128, 1, 4),
                      projector_type="linear", tokenizer_dir=folder,
                      _lm=lambda: ((k, loader(r)) for k, r in refs.items()))
    for name, load in merged_lm_tensors(ckpt, folder / "adapter"):  # warm up allocator and kernels
        if "layers.0.self_attn.q_proj" in name:
            load()
            break
    keep = [] if sys.argv[3] == "keep" else None
    base, peak, running = rss(), [0], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    total = 0
    for name, load in merged_lm_tensors(ckpt, folder / "adapter"):
        t = load()
        total += t.numel() * t.element_size()
        peak[0] = max(peak[0], rss())
        if keep is not None:
            keep.append(t)
        del t
    running[0] = False
    sampler.join()
    print(json.dumps({"growth": peak[0] - base, "merged_bytes": total}))
""")


def _peak(folder: Path, spec: dict, mode: str) -> dict:
    # glibc would keep freed 2 MB blocks in its heap (RSS creeps by a few tensors): measure our peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder), json.dumps(spec), mode],
                         capture_output=True, text=True, check=True, env=env)  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_merge_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """8 layers x 7 adapted matrices (~84 MB in f32): merging must not hold them all."""
    from safetensors.torch import save_file

    from factedge.convert.shapes import lm_shapes
    from factedge.convert.specs import TextSpec

    spec = dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8, num_kv_heads=8)
    shapes = lm_shapes(TextSpec(**spec))
    g = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    lora, r = {}, 8
    for n, s in shapes.items():
        if n.endswith("_proj.weight"):
            stem = "base_model.model." + n.removesuffix(".weight")
            lora[stem + ".lora_A.weight"] = torch.randn(r, s[1], generator=g)
            lora[stem + ".lora_B.weight"] = torch.randn(s[0], r, generator=g)
    (tmp_path / "adapter").mkdir()
    save_file(lora, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16}))
    largest = max(math.prod(s) for s in shapes.values()) * 4
    streamed, hoarded = _peak(tmp_path, spec, "stream"), _peak(tmp_path, spec, "keep")
    assert streamed["merged_bytes"] > 80e6
    assert hoarded["growth"] > 0.9 * hoarded["merged_bytes"]  # the probe sees memory that is kept
    # merging holds ~3 tensors at once (loaded base, its f32 copy being merged, the caller's result)
    assert streamed["growth"] < 5 * largest < 0.15 * streamed["merged_bytes"], (streamed, largest)


def test_projector_targets_merge_separately(rlhf_dir, tmp_path):
    """An adapter that also adapts LLaVA's mm_projector: LM merge ignores it, projector merge applies it."""
    from factedge.convert.merge import merged_projector_tensors

    ckpt = load_checkpoint(rlhf_dir)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 64, generator=g), torch.randn(256, 64, generator=g)
    extra = {"base_model.model.model.mm_projector.0.lora_A.weight": a, "base_model.model.model.mm_projector.0.lora_B.weight": b}
    both = _adapter_copy(ckpt.adapter_dir, tmp_path / "a", lambda sd: {**sd, **extra})
    assert set(read_adapter(both).targets) == {"lm", "projector"}
    lm = _merged(ckpt, both)
    assert all(torch.equal(lm[n], v) for n, v in _merged(ckpt, ckpt.adapter_dir).items())
    proj = {n: load() for n, load in merged_projector_tensors(ckpt, both)}
    base = {n: load().float() for n, load in ckpt.projector_tensors()}
    assert torch.allclose(proj["0.weight"], base["0.weight"] + 0.25 * b @ a, atol=1e-5)
    assert torch.equal(proj["0.bias"], base["0.bias"])
