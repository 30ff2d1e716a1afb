"""Our GGUFs through the real llama.cpp: tokenizer vectors, loading, logits vs PyTorch, LoRA vs merge.

Needs the patched native build (FACTEDGE_NATIVE_DIR or the installed one); skipped without it.
"""

from __future__ import annotations

import pytest

from factedge.convert.language_model import write_language_model
from factedge.convert.layouts import load_checkpoint
from factedge.edge.tokenizer_vectors import read_test_vectors


@pytest.fixture(scope="module")
def llama_cpp():
    from factedge.edge.errors import NativeError
    from factedge.edge.native import load_llama_cpp

    try:
        lib = load_llama_cpp()
    except NativeError as exc:
        pytest.skip(f"native llama.cpp build not available: {exc.reason}")
    lib.llama_backend_init()
    return lib


def _tokenizer(lib, path):
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp refused {path}"
    vocab = lib.llama_model_get_vocab(model)

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        buf = (lib.llama_token * (len(raw) + 8))()
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)  # as test-tokenizer-0
        assert n >= 0, n
        return list(buf[:n])

    return model, vocab, tokenize


@pytest.mark.parametrize("which", ["llava_dir", "llava_hf_dir"])
def test_lm_gguf_reproduces_llama_spm_vectors(llama_cpp, vocab_gguf, which, request, tmp_path):
    ckpt = load_checkpoint(request.getfixturevalue(which))
    out = write_language_model(ckpt, tmp_path / "lm.gguf", ftype="f16")
    model, vocab, tokenize = _tokenizer(llama_cpp, out)
    try:
        vectors = read_test_vectors(vocab_gguf)
        assert len(vectors) > 30
        mismatches = [(text, ids, tokenize(text)) for text, ids in vectors if tokenize(text) != ids]
        assert not mismatches, mismatches[:3]
        assert llama_cpp.llama_vocab_n_tokens(vocab) == ckpt.text.vocab_size
        assert (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)) == (1, 2)
        if ckpt.image_token_id is not None:  # llava-hf's <image> is a control token, parsed as special
            raw = b"<image>"
            buf = (llama_cpp.llama_token * 8)()
            n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 8, False, True)
            assert list(buf[:n]) == [ckpt.image_token_id]
    finally:
        llama_cpp.llama_model_free(model)


def test_llama_cpp_loads_lm_and_lora_adapter(llama_cpp, rlhf_dir, tmp_path):
    """The real loader accepts the LM GGUF (all tensors, shapes, types) and our LoRA GGUF on top of it."""
    from factedge.convert.lora_gguf import write_lora_adapter

    ckpt = load_checkpoint(rlhf_dir)
    lm = write_language_model(ckpt, tmp_path / "lm.gguf", ftype="f16")
    lora = write_lora_adapter(ckpt, tmp_path / "lora.gguf", ftype="f16")
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(lm).encode(), params)
    assert model, "llama.cpp refused the LM GGUF"
    try:
        t = ckpt.text
        n_params = sum(v * h for v, h in [(t.vocab_size, t.hidden_size)] * 2) + t.hidden_size
        assert llama_cpp.llama_model_n_params(model) > n_params
        adapter = llama_cpp.llama_adapter_lora_init(model, str(lora).encode())
        assert adapter, "llama.cpp refused the LoRA GGUF"
        llama_cpp.llama_adapter_lora_free(adapter)
    finally:
        llama_cpp.llama_model_free(model)


def _llama_logits(path, tokens: list[int], lora=None):
    from llama_cpp import Llama

    f32 = 0  # GGML_TYPE_F32: keep the KV cache exact too (its default f16 costs ~1e-3)
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                type_k=f32, type_v=f32, lora_path=str(lora) if lora else None)  # fmt: skip
    try:
        llm.eval(tokens)
        return llm.scores[: len(tokens)].copy()
    finally:
        llm.close()


def test_llama_cpp_logits_match_pytorch_and_lora_matches_merge(llama_cpp, rlhf_dir, tmp_path):
    """End to end through ggml: f32 merged GGUF == PyTorch LlamaForCausalLM with PEFT-merged weights,
    and f32 base GGUF + f32 LoRA GGUF == merged GGUF (Q/K permutation of lora_b included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from factedge.convert.lora_gguf import write_lora_adapter
    from factedge.convert.merge import merged_lm_tensors

    ckpt = load_checkpoint(rlhf_dir)
    merged = write_language_model(ckpt, tmp_path / "merged.gguf", ftype="f32", tensors=merged_lm_tensors(ckpt, ckpt.adapter_dir))
    base = write_language_model(ckpt, tmp_path / "base.gguf", ftype="f32")
    lora = write_lora_adapter(ckpt, tmp_path / "lora.gguf", ftype="f32")
    tokens = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]

    t = ckpt.text
    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                      rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings)  # fmt: skip
    model = LlamaForCausalLM(cfg).float().eval()
    model.load_state_dict({n: load().float() for n, load in merged_lm_tensors(ckpt, ckpt.adapter_dir)}, strict=False)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()

    got = _llama_logits(merged, tokens)
    applied = _llama_logits(base, tokens, lora=lora)
    scale = float(abs(ref).max())
    assert abs(got - ref).max() / scale < 1e-4, abs(got - ref).max() / scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert abs(applied - got).max() / scale < 1e-4, abs(applied - got).max() / scale
