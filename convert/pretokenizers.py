"""Which llama.cpp pre-tokenizer a byte-level BPE `tokenizer.json` needs, as data.

llama.cpp does not read a tokenizer's splitting rules from the GGUF; it knows a fixed set by name
(`tokenizer.ggml.pre`) and applies its own regexes for each. A wrong name tokenizes almost right
(the same text splits differently only around digits, apostrophes or newlines), so the name is chosen
from what the tokenizer.json says, never guessed: its pre-tokenizer steps are reduced to a signature
and looked up here; anything else is refused, and the converter's verification then tokenizes a
text set both ways to prove the choice.
"""

from __future__ import annotations

from typing import Any

# The split patterns as tokenizer.json writes them (LLaMA-3 and Qwen2 differ only in digit grouping).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# the BPE model's `ignore_merges` (a word found whole in the vocab is one token); llama.cpp ties it to the name
IGNORE_MERGES = "ignore-merges"
# signature (see `signature`) -> llama.cpp tokenizer.ggml.pre
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",  # GPT-2's own regex inside ByteLevel
    ("digits:individual", "bytelevel+regex"): "smollm",  # SmolLM / StarCoder: every digit alone
    ("split:" + _LLAMA3_SPLIT, "bytelevel", IGNORE_MERGES): "llama-bpe",  # LLaMA-3 (whole words in the vocab win)
    ("split:" + _QWEN2_SPLIT, "bytelevel"): "qwen2",  # Qwen2 / Qwen2.5
}
# normalizers accepted: none, and NFC (Qwen2), which llama.cpp does not apply: text already in NFC
# (what keyboards and most files produce) tokenizes the same; decomposed accents may not
NORMALIZERS_ACCEPTED = (None, {"type": "NFC"})


def _step(step: dict[str, Any]) -> list[str]:
    kind = step.get("type")
    if kind == "Sequence":
        return [s for sub in step.get("pretokenizers") or [] for s in _step(sub)]
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return ["bytelevel+prefix"]  # llama.cpp never adds a prefix space for BPE
        return ["bytelevel+regex" if step.get("use_regex", True) else "bytelevel"]
    if kind == "Digits":
        return ["digits:individual" if step.get("individual_digits") else "digits"]
    if kind == "Split":
        pattern = step.get("pattern") or {}
        if step.get("behavior") != "Isolated" or step.get("invert") or "Regex" not in pattern:
            return [f"split:{step.get('behavior')}:{pattern}"]
        return ["split:" + str(pattern["Regex"])]
    return [str(kind)]


def signature(pre_tokenizer: dict[str, Any] | None, ignore_merges: bool = False) -> tuple[str, ...]:
    """The pre-tokenizer's steps, flattened, each reduced to what decides how text splits."""
    steps = tuple(_step(pre_tokenizer)) if isinstance(pre_tokenizer, dict) else ()
    return steps + ((IGNORE_MERGES,) if ignore_merges else ())


def llama_cpp_pre(pre_tokenizer: dict[str, Any] | None, ignore_merges: bool = False) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer (and its BPE model's
    ignore_merges), or None when llama.cpp has no equivalent."""
    return PRE_TOKENIZERS.get(signature(pre_tokenizer, ignore_merges))
