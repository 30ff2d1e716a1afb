"""llama.cpp's tokenizer test vectors (`<vocab>.gguf.inp` / `.out`): texts and the ids they must give.

The native build ships the LLaMA SPM ones; tests and `factedge verify` use them to check that a
converted GGUF tokenises exactly like the vocabulary it was made from.
"""

from __future__ import annotations

from pathlib import Path

from factedge.edge.errors import CorruptFileError, InputError

TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp tests/test-tokenizer-0 splits .inp on this


def read_test_vectors(gguf_path: str | Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs from `<vocab>.gguf.inp/.out`, split the way test-tokenizer-0 does."""
    gguf_path = Path(gguf_path)
    inp = gguf_path.with_name(gguf_path.name + ".inp")
    out = gguf_path.with_name(gguf_path.name + ".out")
    if not inp.is_file() or not out.is_file():
        raise InputError("tokenizer test vectors (.inp/.out) missing next to the vocab", gguf_path)
    raw = inp.read_bytes().decode("utf-8")
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(TEST_SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(TEST_SEPARATOR)
    ids = [[int(x) for x in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(ids):
        raise CorruptFileError(f"{len(texts)} test texts but {len(ids)} id lines", inp)
    return list(zip(texts, ids))
