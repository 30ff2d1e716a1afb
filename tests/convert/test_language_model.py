"""The language-model GGUF: every tensor, the vocab, the metadata, and atomic writes."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from factedge.convert.language_model import permute_qk, unpermute_qk, write_language_model
from factedge.convert.layouts import load_checkpoint
from factedge.convert.merge import merged_lm_tensors
from factedge.convert.tensor_names import LM_TENSORS, gguf_name
from factedge.edge.prompt import SYSTEM as LLAVA_SYSTEM_PROMPT
from factedge.edge.prompt import VICUNA_JINJA as VICUNA_V1_TEMPLATE
from factedge.edge.errors import ConfigError, OutputError

CONTROL, USER_DEFINED, UNUSED, BYTE = 3, 4, 5, 6


def _source(ckpt, tensors=None) -> dict[str, torch.Tensor]:
    return {name: load().to(torch.float32) for name, load in (tensors or ckpt.lm_tensors())}


def _as_hf(gguf_name_: str, array: np.ndarray, ckpt) -> torch.Tensor:
    """Undo the Q/K permutation the writer applies."""
    t = torch.from_numpy(array)
    if ".attn_q." in gguf_name_:
        return unpermute_qk(t, ckpt.text.num_heads)
    if ".attn_k." in gguf_name_:
        return unpermute_qk(t, ckpt.text.num_kv_heads)
    return t


def _rope_hf(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """HF Llama: rotate_half pairs element i with i + d/2."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def _rope_ggml(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """ggml rope mode 0 (LLaMA): rotates adjacent pairs (2i, 2i+1) by pos * base^(-2i/d)."""
    d = x.shape[-1]
    ang = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_qk_permutation_matches_ggml_rope():
    """Permuted weights + ggml's pairwise RoPE give HF's attention scores (and inverse is exact)."""
    g = torch.Generator().manual_seed(0)
    n_head, n_kv, d, hidden = 4, 2, 16, 64
    wq, wk = torch.randn(n_head * d, hidden, generator=g, dtype=torch.float64), torch.randn(n_kv * d, hidden, generator=g, dtype=torch.float64)
    x1, x2 = torch.randn(hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g, dtype=torch.float64)
    hf_q = _rope_hf((wq @ x1).view(n_head, d), 7)
    hf_k = _rope_hf((wk @ x2).view(n_kv, d), 3)
    gg_q = _rope_ggml((permute_qk(wq, n_head) @ x1).view(n_head, d), 7)
    gg_k = _rope_ggml((permute_qk(wk, n_kv) @ x2).view(n_kv, d), 3)
    rep = n_head // n_kv
    hf_scores = (hf_q * hf_k.repeat_interleave(rep, 0)).sum(-1)
    gg_scores = (gg_q * gg_k.repeat_interleave(rep, 0)).sum(-1)
    assert torch.allclose(hf_scores, gg_scores, atol=1e-10)
    assert torch.equal(unpermute_qk(permute_qk(wk, n_kv), n_kv), wk)


@pytest.fixture(scope="module")
def hf_f32(llava_hf_dir, tmp_path_factory) -> Path:
    return write_language_model(load_checkpoint(llava_hf_dir), tmp_path_factory.mktemp("lm") / "lm.gguf", ftype="f32")


def test_f32_tensors_exact_and_named(llava_hf_dir, hf_f32, gguf_io):
    ckpt, out = load_checkpoint(llava_hf_dir), hf_f32
    got, types = gguf_io.tensors(out), gguf_io.types(out)
    src = _source(ckpt)
    assert list(got) == [gguf_name(n, LM_TENSORS) for n in src]
    for name, tensor in src.items():
        g = gguf_name(name, LM_TENSORS)
        assert types[g] == "F32"
        assert torch.equal(_as_hf(g, got[g], ckpt), tensor), name  # max-abs-diff 0
    assert got["token_embd.weight"].shape == (32064, 256)


def test_bf16_exact_and_norms_f32(rlhf_dir, tmp_path, gguf_io):
    ckpt = load_checkpoint(rlhf_dir)  # sft_model is bf16
    out = write_language_model(ckpt, tmp_path / "lm.gguf", ftype="bf16")
    got, types = gguf_io.tensors(out), gguf_io.types(out)
    for name, tensor in _source(ckpt).items():
        g = gguf_name(name, LM_TENSORS)
        assert types[g] == ("F32" if tensor.dim() == 1 else "BF16"), g
        assert torch.equal(_as_hf(g, got[g], ckpt), tensor), name


def test_f16_merged_within_tolerance(rlhf_dir, tmp_path, gguf_io):
    """f32 merged weights -> f16 GGUF: relative error <= 1e-3 per tensor."""
    ckpt = load_checkpoint(rlhf_dir)
    out = write_language_model(ckpt, tmp_path / "lm.gguf", tensors=merged_lm_tensors(ckpt, ckpt.adapter_dir), ftype="f16")
    got, types = gguf_io.tensors(out), gguf_io.types(out)
    worst = 0.0
    for name, tensor in _source(ckpt, merged_lm_tensors(ckpt, ckpt.adapter_dir)).items():
        g = gguf_name(name, LM_TENSORS)
        assert types[g] == ("F32" if tensor.dim() == 1 else "F16")
        err = (_as_hf(g, got[g], ckpt) - tensor).abs().max().item() / tensor.abs().max().item()
        worst = max(worst, err)
    assert worst <= 1e-3, worst


def test_vocab_matches_llama_spm_and_pads_to_embedding(hf_f32, gguf_io, vocab_gguf):
    f, ref = gguf_io.fields(hf_f32), gguf_io.fields(vocab_gguf)
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 32064 == f["llama.vocab_size"]
    assert tokens[:32000] == ref["tokenizer.ggml.tokens"]
    assert list(types[:32000]) == list(ref["tokenizer.ggml.token_type"])
    assert np.array_equal(np.float32(scores[:32000]), np.float32(ref["tokenizer.ggml.scores"]))
    assert (tokens[3], types[3]) == ("<0x00>", BYTE)
    assert (tokens[32000], types[32000]) == ("<image>", CONTROL)
    assert (tokens[32001], types[32001]) == ("<pad>", CONTROL)
    assert (tokens[32002], types[32002], tokens[32063]) == ("[PAD32002]", UNUSED, "[PAD32063]")
    ids = [f[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")]
    assert ids == [1, 2, 0, 32001]
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "default")


def test_metadata(llava_dir, tmp_path, gguf_io):
    ckpt = load_checkpoint(llava_dir)
    extra = {"factedge.source_sha256": "ab" * 32, "factedge.fidelity_checked": False, "factedge.n": 3}
    seen = []
    out = write_language_model(ckpt, tmp_path / "lm.gguf", extra_kv=extra, name="tiny", progress=lambda *a: seen.append(a))
    f = gguf_io.fields(out)
    assert f["general.architecture"] == "llama" and f["general.type"] == "model" and f["general.name"] == "tiny"
    assert f["general.file_type"] == 1  # MOSTLY_F16
    expect = {"context_length": 4096, "embedding_length": 256, "block_count": 2, "feed_forward_length": 512,
              "attention.head_count": 4, "attention.head_count_kv": 4, "rope.dimension_count": 64, "vocab_size": 32000}
    assert {k: f[f"llama.{k}"] for k in expect} == expect
    assert f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.padding_token_id"] == 0  # LLaVA: pad = unk
    assert {k: f[k] for k in extra} == extra and f["factedge.layout"] == "llava"
    assert len(seen) == 21 and seen[-1] == (21, 21, "output.weight")


def test_chat_template_is_llava_v1():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tmpl = ImmutableSandboxedEnvironment().from_string(VICUNA_V1_TEMPLATE)
    msgs = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]  # fmt: skip
    assert tmpl.render(messages=msgs, add_generation_prompt=True) == (
        LLAVA_SYSTEM_PROMPT + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:"
    )
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tmpl.render(messages=own, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"


def test_write_failure_leaves_nothing(llava_dir, tmp_path, monkeypatch):
    import gguf

    ckpt = load_checkpoint(llava_dir)
    out = tmp_path / "lm.gguf"
    out.write_bytes(b"previous")
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def full_disk(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    with pytest.raises(OutputError, match="No space left on device") as err:
        write_language_model(ckpt, out)
    assert str(out) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.gguf"] and out.read_bytes() == b"previous"


def test_bad_arguments(llava_dir, tmp_path):
    ckpt = load_checkpoint(llava_dir)
    with pytest.raises(ConfigError, match="q4_0"):
        write_language_model(ckpt, tmp_path / "x.gguf", ftype="q4_0")
    with pytest.raises(OutputError, match="does not exist"):
        write_language_model(ckpt, tmp_path / "no" / "x.gguf")
    assert list(tmp_path.iterdir()) == []
