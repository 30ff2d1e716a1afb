"""Which vocabulary a checkpoint has: LLaMA's SentencePiece `tokenizer.model`, or a byte-level BPE
`tokenizer.json` (SmolLM2, LLaMA-3, Qwen2); each is read by its own module into one `Vocab`, and the
checkpoint's own HF tokenizer is loaded the way its family expects."""

from __future__ import annotations

from pathlib import Path

from factedge.convert.hparams import is_spm
from factedge.convert.vocab import Vocab, spm_vocab
from factedge.convert.vocab_bpe import bpe_vocab


def read_vocab(tokenizer_dir: str | Path, n_rows: int) -> Vocab:
    """tokenizer.model (SentencePiece) when present, else tokenizer.json (byte-level BPE)."""
    folder = Path(tokenizer_dir)
    if is_spm(folder) or not (folder / "tokenizer.json").is_file():
        return spm_vocab(folder, n_rows)
    return bpe_vocab(folder, n_rows)


def hf_tokenizer(tokenizer_dir: str | Path):
    """The checkpoint's own HF tokenizer: LLaMA's slow legacy SentencePiece one (what LLaVA trained
    with) for tokenizer.model, the fast tokenizer.json one otherwise."""
    from transformers import AutoTokenizer

    if is_spm(tokenizer_dir):
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False, legacy=True)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
