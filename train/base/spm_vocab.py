"""Rebuild LLaMA's SentencePiece `tokenizer.model` from the vocab GGUF that llama.cpp ships.

Tiny test checkpoints must tokenize exactly like the real LLaVA/Vicuna ones (same 32000 pieces, same
BPE merges by score, same byte fallback), but the real tokenizer.model cannot be downloaded here.
llama.cpp's `ggml-vocab-llama-spm.gguf` carries the pieces, scores and types verbatim; adding the
trainer/normaliser settings LLaMA was trained with gives back a model that sentencepiece and HF load.
FACTEDGE_SPM_VOCAB may also name a serialised tokenizer.model (used as is), for machines without gguf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from factedge.edge.errors import CorruptFileError, InputError, NativeError

ENV_SPM_VOCAB = "FACTEDGE_SPM_VOCAB"

# SentencePiece ModelProto.SentencePiece.Type; gguf's token_type uses the same numbers.
_PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


@dataclass(frozen=True)
class SpmVocab:
    """The parts of a llama.cpp SPM vocab GGUF a tokenizer.model needs."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


def default_vocab_path() -> Path:
    """The vocab GGUF: env FACTEDGE_SPM_VOCAB if set, else the one installed with the native build."""
    env = os.environ.get(ENV_SPM_VOCAB)
    if env:
        path = Path(env)
        if not path.is_file():
            raise InputError(f"{ENV_SPM_VOCAB} names no file", path)
        return path
    from factedge.edge.native import spm_vocab

    try:
        return spm_vocab()
    except NativeError as exc:
        raise NativeError(f"LLaMA SPM vocab not found ({exc.reason}); set {ENV_SPM_VOCAB}") from exc


def read_gguf_vocab(path: str | Path) -> SpmVocab:
    """Tokens, scores and token types of a `tokenizer.ggml.model == llama` GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        fields = GGUFReader(path).fields
    except (ValueError, OSError) as exc:
        raise CorruptFileError(f"not a readable GGUF: {exc}", path) from exc

    def get(key: str, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    if get("tokenizer.ggml.model") != "llama":
        raise InputError("not a SentencePiece (llama) vocab GGUF", path)
    tokens, scores, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores"), get("tokenizer.ggml.token_type")
    if not tokens or len(scores) != len(tokens) or len(types) != len(tokens):
        raise CorruptFileError("tokens, scores and token types differ in length", path)
    return SpmVocab(
        tokens=list(tokens),
        scores=[float(s) for s in scores],
        types=[int(t) for t in types],
        unk_id=int(get("tokenizer.ggml.unknown_token_id", 0)),
        bos_id=int(get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(get("tokenizer.ggml.eos_token_id", 2)),
    )


def build_model_proto(vocab: SpmVocab):
    """A `ModelProto` with LLaMA's pieces and LLaMA's trainer/normaliser settings."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for token, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        if kind not in _PIECE_TYPES:
            raise InputError(f"token {token!r} has unknown type {kind}")
        proto.pieces.add(piece=token, score=score, type=kind)

    t = proto.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(vocab.tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.split_by_unicode_script = True
    t.split_by_number = True
    t.split_by_whitespace = True
    t.treat_whitespace_as_suffix = False
    t.max_sentencepiece_length = 16
    t.character_coverage = 0.99995
    t.vocabulary_output_piece_score = True
    t.hard_vocab_limit = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = vocab.unk_id, vocab.bos_id, vocab.eos_id, -1
    t.unk_piece = vocab.tokens[vocab.unk_id]
    t.bos_piece = vocab.tokens[vocab.bos_id]
    t.eos_piece = vocab.tokens[vocab.eos_id]
    t.pad_piece = "<pad>"
    t.unk_surface = " \u2047 "

    n = proto.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return proto


def tokenizer_model_bytes(gguf_path: str | Path) -> bytes:
    """Serialised tokenizer.model for the vocab GGUF (deterministic bytes; cached per file version,
    since parsing the GGUF takes seconds and every tiny checkpoint needs it)."""
    path = Path(gguf_path).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"cannot read the vocab GGUF: {exc}", path) from exc
    return _tokenizer_model_bytes(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _tokenizer_model_bytes(path: Path, _mtime_ns: int, _size: int) -> bytes:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":  # already a serialised tokenizer.model (machines without the gguf package)
        return _checked_model_bytes(path)
    return build_model_proto(read_gguf_vocab(path)).SerializeToString(deterministic=True)


def _checked_model_bytes(path: Path) -> bytes:
    import sentencepiece as spm

    data = path.read_bytes()
    try:
        n = spm.SentencePieceProcessor(model_proto=data).get_piece_size()
    except (RuntimeError, OSError) as exc:
        raise CorruptFileError(f"neither a vocab GGUF nor a tokenizer.model: {exc}", path) from exc
    if n == 0:
        raise CorruptFileError("neither a vocab GGUF nor a tokenizer.model (no pieces)", path)
    return data
