"""Byte-level BPE vocabularies: each pre-tokenizer the converter knows is proved on llama.cpp's own
reference vectors (GPT-2, StarCoder/SmolLM, LLaMA-3, Qwen2 vocabs from the pinned sdist).

For each vocab the test rebuilds an HF `tokenizer.json` from the vocab GGUF with the pre-tokenizer a
real hub tokenizer.json of that family carries, checks that HF then reproduces the reference ids
(so the pre-tokenizer JSON is right), and that factedge's converter, reading that tokenizer.json,
writes a GGUF whose llama.cpp tokenisation reproduces them too (so the name it picks is right).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from factedge.convert.language_model import add_vocab
from factedge.convert.pretokenizers import llama_cpp_pre
from factedge.convert.specs import TextSpec
from factedge.convert.vocab import CONTROL, USER_DEFINED
from factedge.convert.vocab_read import read_vocab
from factedge.edge.errors import LayoutError
from factedge.edge.runtime import Model
from factedge.edge.tokenizer_vectors import read_test_vectors

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**_BYTELEVEL, "use_regex": False}]}


# vocab in the sdist -> (the pre_tokenizer its hub tokenizer.json has, its BPE ignore_merges, the name
# factedge writes)
FAMILIES = {
    "gpt-2": (_BYTELEVEL, False, "gpt-2"),
    "starcoder": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL]},
                  False, "smollm"),  # llama.cpp applies one regex set to starcoder and smollm
    "llama-bpe": (_split_then_bytes(_LLAMA3), True, "llama-bpe"),
    "qwen2": (_split_then_bytes(_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")), False, "qwen2"),
}


@pytest.fixture(scope="module")
def sdist_models(tmp_path_factory) -> Path:
    """llama.cpp's vocab GGUFs and test vectors, taken from the pinned sdist setup downloaded."""
    root = Path(__file__).resolve().parents[2] / ".cache" / "native"
    sdists = sorted(root.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        pytest.skip("the llama-cpp-python sdist is not in .cache/native (scripts/setup.sh downloads it)")
    out = tmp_path_factory.mktemp("vocabs")
    wanted = tuple(f"ggml-vocab-{name}.gguf" for name in FAMILIES)
    with tarfile.open(sdists[-1]) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/vendor/llama.cpp/models/" in member.name and name.startswith(wanted):
                (out / name).write_bytes(tar.extractfile(member).read())
    return out


def _gguf_field(fields, key):
    return fields[key].contents() if key in fields else None


def _hub_style_tokenizer(vocab_gguf: Path, pre_tokenizer: dict, folder: Path, ignore_merges: bool = False) -> Path:
    """tokenizer.json (+ config) as a hub folder of this family has it, rebuilt from the vocab GGUF."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models

    fields = GGUFReader(vocab_gguf).fields
    tokens, types = _gguf_field(fields, "tokenizer.ggml.tokens"), _gguf_field(fields, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_field(fields, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = pre_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def _vocab_only_gguf(tokenizer_dir: Path, out: Path, n_rows: int) -> Path:
    from gguf import GGUFWriter

    vocab = read_vocab(tokenizer_dir, n_rows)
    text = TextSpec(vocab_size=n_rows, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                    num_kv_heads=4, bos_token_id=0, eos_token_id=0, unk_token_id=0, pad_token_id=0)
    writer = GGUFWriter(str(out), "llama")
    for add, value in ((writer.add_context_length, 512), (writer.add_embedding_length, 64),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 128),
                       (writer.add_head_count, 4), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    add_vocab(writer, vocab, text)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_pre_tokenizer_reproduces_llama_cpp_reference_ids(sdist_models, tmp_path, family):
    from tokenizers import Tokenizer

    pre_tokenizer, ignore_merges, name = FAMILIES[family]
    vocab_gguf = sdist_models / f"ggml-vocab-{family}.gguf"
    vectors = read_test_vectors(vocab_gguf)
    folder = _hub_style_tokenizer(vocab_gguf, pre_tokenizer, tmp_path / "tok", ignore_merges)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [hf.encode(t, add_special_tokens=False).ids for t, _ in vectors] == [ids for _, ids in vectors]
    assert llama_cpp_pre(pre_tokenizer, ignore_merges) == name
    n_rows = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    gguf = _vocab_only_gguf(folder, tmp_path / "vocab.gguf", n_rows)
    with Model(gguf, vocab_only=True) as model:
        got = [model.tokenize(t, add_bos=False, special=False) for t, _ in vectors]
    assert got == [ids for _, ids in vectors]


def test_unknown_pre_tokenizers_are_refused(sdist_models, tmp_path):
    folder = _hub_style_tokenizer(sdist_models / "ggml-vocab-gpt-2.gguf",
                                  {"type": "Whitespace"}, tmp_path / "tok")
    with pytest.raises(LayoutError, match="pre-tokenizer \\[Whitespace\\] has no llama.cpp equivalent") as info:
        read_vocab(folder, 50257)
    assert info.value.path == folder / "tokenizer.json"
