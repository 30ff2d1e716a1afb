"""The chat template written into the language-model GGUF: the conversation format the model was trained on.

LLaVA on Vicuna (a SentencePiece vocab) was trained with `conv_vicuna_v1`, whatever template a hub
folder's processor carries, so those get edge.prompt's Vicuna template (as always). A LLaVA on another
LM (SmolLM2, Qwen, LLaMA-3: a BPE tokenizer.json) talks in its LM's own format, so its checkpoint's
template is copied: `chat_template.jinja` (transformers 5), `chat_template.json` (processors) or
`tokenizer_config.json`'s `chat_template`, first found. The edge reads it back to format prompts.
"""

from __future__ import annotations

from pathlib import Path

from factedge.convert import hparams
from factedge.convert.hparams import is_spm
from factedge.edge.errors import ConfigError, CorruptFileError
from factedge.edge.prompt import VICUNA_JINJA


def own_template(tokenizer_dir: Path) -> str | None:
    """The checkpoint's own chat template, or None."""
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"unreadable chat template: {exc}", jinja) from exc
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = hparams.read_json(tokenizer_dir / name, required=False).get("chat_template")
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str) and value.strip():
            return value
    return None


def gguf_chat_template(tokenizer_dir: Path) -> str:
    """Vicuna v1 for LLaMA-SentencePiece LLaVAs, the checkpoint's own template otherwise."""
    if is_spm(tokenizer_dir):
        return VICUNA_JINJA
    template = own_template(tokenizer_dir)
    if template is None:
        raise ConfigError("the checkpoint's tokenizer has no chat template (chat_template.jinja or "
                          "tokenizer_config.json's chat_template); its conversation format is unknown", tokenizer_dir)
    return template
