"""The vocabulary that goes into the language-model GGUF: SentencePiece (LLaMA/Vicuna) or BPE.

llama.cpp tokenizes from the GGUF alone, so the GGUF must carry every piece with its score and type
(byte-fallback pieces included) plus the tokens added on top (llava-hf's `<image>`, `<pad>`), and the
token list must be exactly as long as the embedding has rows: llava-hf pads the embedding to 32064,
and the padding rows get `[PAD{id}]` entries, as llama.cpp's own converter writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from factedge.convert import hparams
from factedge.edge.errors import CorruptFileError, InputError, MismatchError

# SentencePiece / GGUF token types (gguf.TokenType uses the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6



@dataclass(frozen=True)
class Vocab:
    """Parallel lists, one entry per token id (length == embedding rows), and how llama.cpp reads them:
    model "llama" (SentencePiece: scores rank the merges) or "gpt2" (byte-level BPE: merges, `pre`)."""

    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]
    model: str = "llama"
    pre: str = "default"
    merges: list[str] | None = None
    add_bos: bool = True


def padding_rows(n_rows: int) -> tuple[list[bytes], list[int]]:
    """Tokens and types for an embedding's rows before the tokenizer fills them: `[PAD{id}]`, UNUSED
    (llava-hf pads the embedding to a multiple of 64, as llama.cpp's own converter names the rows)."""
    return [f"[PAD{i}]".encode() for i in range(n_rows)], [UNUSED] * n_rows


def _load_spm(path: Path):
    from sentencepiece import SentencePieceProcessor

    if not path.is_file():
        raise InputError("tokenizer.model missing", path)
    spm = SentencePieceProcessor()
    try:
        spm.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise CorruptFileError(f"not a SentencePiece model: {exc}", path) from exc
    return spm


def _piece_type(spm, i: int) -> int:
    if spm.IsUnknown(i):
        return UNKNOWN
    if spm.IsControl(i):
        return CONTROL
    if spm.IsUnused(i):
        return UNUSED
    if spm.IsByte(i):
        return BYTE
    return NORMAL


def looks_special(token: str) -> bool:
    """llama.cpp's converter heuristic for added tokens that should be CONTROL though not flagged."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def spm_vocab(tokenizer_dir: str | Path, n_rows: int) -> Vocab:
    """tokenizer.model + added tokens, padded to `n_rows` entries (the embedding's row count)."""
    tokenizer_dir = Path(tokenizer_dir)
    model_path = tokenizer_dir / "tokenizer.model"
    spm = _load_spm(model_path)
    n_spm = spm.vocab_size()
    if n_spm > n_rows:
        raise MismatchError(f"tokenizer has {n_spm} pieces but the embedding only {n_rows} rows", model_path)
    tokens, types = padding_rows(n_rows)
    scores = [-10000.0] * n_rows
    for i in range(n_spm):
        tokens[i], scores[i], types[i] = spm.IdToPiece(i).encode("utf-8"), float(spm.GetScore(i)), _piece_type(spm, i)

    decoder = hparams.read_json(tokenizer_dir / "tokenizer_config.json", required=False).get("added_tokens_decoder") or {}
    special = {str(d.get("content")): bool(d.get("special")) for d in decoder.values() if isinstance(d, dict)}
    for token, token_id in sorted(hparams.added_tokens(tokenizer_dir).items(), key=lambda kv: kv[1]):
        if token_id < n_spm and tokens[token_id] == token.encode("utf-8"):
            continue  # <unk>, <s>, </s> restated by tokenizer_config: keep the SPM entry
        if token_id >= n_rows:
            raise MismatchError(f"added token {token!r} has id {token_id} >= {n_rows} embedding rows", tokenizer_dir)
        is_special = special.get(token, False) or looks_special(token)
        tokens[token_id] = token.encode("utf-8") if is_special else token.replace("\u2581", " ").encode("utf-8")
        scores[token_id] = -1000.0
        types[token_id] = CONTROL if is_special else USER_DEFINED
    return Vocab(tokens, scores, types)
