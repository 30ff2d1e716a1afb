"""A byte-level BPE `tokenizer.json` (SmolLM2, LLaMA-3, Qwen2, GPT-2 style) as a llama.cpp `gpt2` vocab.

llama.cpp's BPE tokenizer needs from the GGUF: every token string in byte-level form (as tokenizer.json
stores them), the merges in rank order, token types (added special tokens are CONTROL, so a user's
text cannot produce them unless parsed as special; other added tokens USER_DEFINED), the name of its
pre-tokenizer (convert.pretokenizers), and whether BOS is added (read from the post-processor, which
is where HF decides it). Rows past the tokenizer (an embedding padded to a multiple of 64) get
`[PAD{id}]` UNUSED entries, as for SentencePiece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factedge.convert import hparams
from factedge.convert.pretokenizers import NORMALIZERS_ACCEPTED, llama_cpp_pre, signature
from factedge.convert.vocab import CONTROL, NORMAL, USER_DEFINED, Vocab, looks_special, padding_rows
from factedge.edge.errors import CorruptFileError, LayoutError, MismatchError


def _merges(model: dict[str, Any], path: Path) -> list[str]:
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise CorruptFileError("model.merges is not a list", path)
    out = []
    for merge in merges:  # "a b" (tokenizers < 0.20) or ["a", "b"]
        if isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge):
            merge = " ".join(merge)
        if not isinstance(merge, str) or merge.count(" ") != 1:
            raise CorruptFileError(f"merge {merge!r} is not a pair of tokens", path)
        out.append(merge)
    return out


def _adds_bos(post: dict[str, Any] | None) -> bool:
    """Whether HF's post-processor puts a special token before a single sequence."""
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post.get("processors") or [])
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return post.get("type") in ("BertProcessing", "RobertaProcessing")


def bpe_vocab(tokenizer_dir: Path, n_rows: int) -> Vocab:
    """tokenizer.json's vocab + added tokens, padded to `n_rows` entries."""
    path = tokenizer_dir / "tokenizer.json"
    data = hparams.read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise LayoutError(f"tokenizer model {model.get('type')!r} is not supported (BPE with a vocab)", path)
    ignore_merges = bool(model.get("ignore_merges"))
    pre = llama_cpp_pre(data.get("pre_tokenizer"), ignore_merges)
    if pre is None:
        steps = ", ".join(signature(data.get("pre_tokenizer"), ignore_merges)) or "none"
        hint = " (a SentencePiece-style tokenizer.json: convert with its tokenizer.model)" if model.get("byte_fallback") else ""
        raise LayoutError(f"pre-tokenizer [{steps[:120]}] has no llama.cpp equivalent{hint}", path)
    if data.get("normalizer") not in NORMALIZERS_ACCEPTED:
        raise LayoutError(f"normalizer {data['normalizer'].get('type')!r} is not supported for BPE", path)
    tokens, types = padding_rows(n_rows)
    for token, token_id in model["vocab"].items():
        if not isinstance(token_id, int) or not 0 <= token_id:
            raise CorruptFileError(f"vocab id of {token!r} is not a token id", path)
        if token_id >= n_rows:
            raise MismatchError(f"tokenizer token {token!r} has id {token_id} >= {n_rows} embedding rows", path)
        tokens[token_id], types[token_id] = token.encode("utf-8"), NORMAL
    for added in hparams.added_token_list(data, path):
        token_id = added["id"]
        if not 0 <= token_id < n_rows:
            raise MismatchError(f"added token {added['content']!r} has id {token_id} >= {n_rows} embedding rows", path)
        tokens[token_id] = added["content"].encode("utf-8")
        types[token_id] = CONTROL if added.get("special") or looks_special(added["content"]) else USER_DEFINED
    return Vocab(tokens, None, types, model="gpt2", pre=pre, merges=_merges(model, path),
                 add_bos=_adds_bos(data.get("post_processor")))
