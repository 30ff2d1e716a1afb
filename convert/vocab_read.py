"""Which vocabulary a checkpoint has: LLaMA's SentencePiece `tokenizer.model`, or a byte-level BPE
`tokenizer.json` (SmolLM2, LLaMA-3, Qwen2); each is read by its own module into one `Vocab`."""

from __future__ import annotations

from pathlib import Path

from factedge.convert.vocab import Vocab, spm_vocab
from factedge.convert.vocab_bpe import bpe_vocab


def is_spm(tokenizer_dir: str | Path) -> bool:
    """Whether a folder's tokenizer is LLaMA's SentencePiece (what LLaVA's Vicuna template goes with)."""
    return (Path(tokenizer_dir) / "tokenizer.model").is_file()


def read_vocab(tokenizer_dir: str | Path, n_rows: int) -> Vocab:
    """tokenizer.model (SentencePiece) when present, else tokenizer.json (byte-level BPE)."""
    folder = Path(tokenizer_dir)
    if is_spm(folder) or not (folder / "tokenizer.json").is_file():
        return spm_vocab(folder, n_rows)
    return bpe_vocab(folder, n_rows)
