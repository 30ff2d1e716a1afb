"""tokenizer.model rebuilt from llama.cpp's LLaMA SPM vocab tokenizes exactly like the real one.

Reference: llama.cpp's own test vectors for that vocab (`ggml-vocab-llama-spm.gguf.inp/.out`, 46
texts: whitespace runs, digits, emoji, byte fallback, CJK, Khmer...), produced from the real LLaMA
tokenizer; `add_special=False`, as tests/test-tokenizer-0 runs them.
"""

from __future__ import annotations

import pytest

from factedge.edge.tokenizer_vectors import read_test_vectors
from factedge.train.base.spm_vocab import (
    build_model_proto,
    default_vocab_path,
    read_gguf_vocab,
    tokenizer_model_bytes,
)

N_VECTORS = 46


@pytest.fixture(scope="module")
def vocab_path():
    return default_vocab_path()


@pytest.fixture(scope="module")
def vocab(vocab_path):
    return read_gguf_vocab(vocab_path)  # parsing the GGUF takes seconds: once per module


@pytest.fixture(scope="module")
def vectors(vocab_path):
    pairs = read_test_vectors(vocab_path)
    assert len(pairs) == N_VECTORS
    return pairs


def _mismatches(encode, vectors) -> list[str]:
    return [text for text, ids in vectors if encode(text) != ids]


def test_proto_has_llama_settings(vocab):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = build_model_proto(vocab)
    assert len(proto.pieces) == 32000
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert [p.type for p in proto.pieces[:3]] == [pb.ModelProto.SentencePiece.UNKNOWN,
                                                  pb.ModelProto.SentencePiece.CONTROL,
                                                  pb.ModelProto.SentencePiece.CONTROL]
    assert sum(p.type == pb.ModelProto.SentencePiece.BYTE for p in proto.pieces) == 256
    assert proto.pieces[3].piece == "<0x00>" and proto.pieces[258].piece == "<0xFF>"
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.byte_fallback and t.vocab_size == 32000
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert n.precompiled_charsmap == b""


def test_sentencepiece_reproduces_llama_cpp_vectors(vocab_path, vectors):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer_model_bytes(vocab_path))
    assert sp.vocab_size() == 32000
    assert _mismatches(sp.encode, vectors) == []
    # byte fallback round-trips text with no piece of its own
    text = "ខ 🦙 \x01"
    assert sp.decode(sp.encode(text)) == text


def test_hf_from_tokenizer_model_alone_reproduces_vectors(vocab_path, vectors, tmp_path):
    """HF's tokenizer built from a bare tokenizer.model (transformers 5: TokenizersBackend via
    SpmConverter, legacy SentencePiece semantics) matches all 46 vectors."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes(tokenizer_model_bytes(vocab_path))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 32000
    assert _mismatches(lambda s: tok.encode(s, add_special_tokens=False), vectors) == []


@pytest.mark.parametrize("which", ["tiny_llava_hf", "tiny_llava_linear"])
def test_hf_checkpoint_tokenizer(which, vectors, request):
    """`AutoTokenizer.from_pretrained(<checkpoint>)` (model_type llava -> TokenizersBackend from
    tokenizer.model). With `legacy=True` it is SentencePiece exactly: all 46 vectors, and a dummy
    prefix after special tokens as llama.cpp adds. As the real configs say (`legacy: false`), and
    for the `LlamaTokenizer` class whatever `legacy`, transformers 5 drops the dummy prefix when the
    text already starts with a space: only those texts differ."""
    from transformers import AutoTokenizer, LlamaTokenizer

    ckpt = request.getfixturevalue(which)
    exact = AutoTokenizer.from_pretrained(ckpt.model_dir, legacy=True)
    assert _mismatches(lambda s: exact.encode(s, add_special_tokens=False), vectors) == []
    assert exact("Hello world").input_ids == [1, 15043, 3186]  # BOS added, no EOS
    n_space_led = sum(text.startswith(" ") for text, _ in vectors)
    assert n_space_led == 15
    for tok in (AutoTokenizer.from_pretrained(ckpt.model_dir), LlamaTokenizer.from_pretrained(ckpt.model_dir)):
        bad = _mismatches(lambda s: tok.encode(s, add_special_tokens=False), vectors)
        assert all(text.startswith(" ") for text in bad) and len(bad) == n_space_led
    if ckpt.layout == "llava-hf":
        assert len(exact) == 32002
        assert exact.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
        # USER: <image>\nHi  (29871 = the dummy-prefix space llama.cpp also inserts after <image>)
        assert exact("USER: <image>\nHi").input_ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 18567]
    else:
        assert len(exact) == 32000


def test_tokenizer_bytes_deterministic(vocab, vocab_path, tiny_llava_hf, tiny_llava_rlhf):
    fresh = build_model_proto(vocab).SerializeToString(deterministic=True)
    assert fresh == tokenizer_model_bytes(vocab_path)
    assert (tiny_llava_hf.model_dir / "tokenizer.model").read_bytes() == fresh
    assert (tiny_llava_rlhf.model_dir / "tokenizer.model").read_bytes() == fresh
