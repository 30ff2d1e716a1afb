"""Prompts: LLaVA's Vicuna v1 template in one place, and the one tokenisation every caller shares.

Other models' formats (ChatML, ...) are `edge.chat_format.ChatFormat`s; `Conversation` renders any.

Vicuna v1 as LLaVA's `conv_vicuna_v1`: the system prompt, a space, then `USER: <msg> ASSISTANT: <reply></s>`
per turn; the first user turn carries the image as `<image>\\n<question>` (mm_use_im_start_end off).
Token ids follow LLaVA's `tokenizer_image_token`: the text is split at each image, every piece is
tokenised on its own (so SentencePiece adds its dummy prefix to each), only the first keeps BOS.
The same text template is written into the GGUF as a jinja chat template (`VICUNA_JINJA`), so
`llama-mtmd-cli` formats a prompt exactly as this module does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from factedge.edge.chat_format import VICUNA_SYSTEM, VICUNA_V1, ChatFormat
from factedge.edge.errors import InputError

SYSTEM = VICUNA_SYSTEM
IMAGE = "<image>"

# LLaVA's `conv_vicuna_v1` / `llava_v1`: "<system> USER: <q> ASSISTANT: <a></s>USER: ..." (sep " ",
# sep2 "</s>"). No BOS in the template: the GGUF says add_bos, so the tokenizer adds it.
VICUNA_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + SYSTEM.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass
class Turn:
    user: str
    assistant: str | None = None
    n_images: int = 0


@dataclass
class Conversation:
    """A conversation in a format (LLaVA's Vicuna v1 unless given); images are placed before the text
    of the turn that has them. system None: the format's default system prompt."""

    system: str | None = SYSTEM
    turns: list[Turn] = field(default_factory=list)
    fmt: ChatFormat = VICUNA_V1

    def text(self) -> str:
        return self.fmt.render(self.fmt.system_prompt(self.system), [(t.user, t.assistant, t.n_images) for t in self.turns])


def single_turn(question: str, n_images: int = 1, fmt: ChatFormat = VICUNA_V1) -> str:
    """The prompt of a one-question chat (the format's default system prompt), ready for generation."""
    return Conversation(None, [Turn(question, n_images=n_images)], fmt).text()


def split_at_images(text: str, tokenize: Callable[[str, bool], list[int]]) -> list[list[int] | None]:
    """LLaVA's `tokenizer_image_token`: token-id pieces, with None where an image goes.

    `tokenize(piece, add_bos)` is the model's tokenizer (llama.cpp's or HF's): each piece is tokenised
    separately and only the first one gets BOS, exactly as LLaVA builds its training inputs.
    """
    pieces = text.split(IMAGE)
    out: list[list[int] | None] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            out.append(None)
        ids = tokenize(piece, i == 0)
        if ids:
            out.append(ids)
    return out


def prompt_pieces(text: str, tokenize: Callable[..., list[int]], *, bos: bool = True) -> list[list[int] | None]:
    """The one tokenisation of a rendered prompt that `ask`, `chat`, `serve` and the benchmarks share.

    `tokenize(text, add_bos=..., special=...)` is `runtime.Model.tokenize`. special=True: the template's
    "</s>" after an answer is the EOS token, as LLaVA's HF tokenizer reads any special-token text (so a
    user's literal "</s>" is EOS too, as in LLaVA's training data); BOS only on the first piece, and
    only when `bos` (a prompt continued after spliced answer ids has none).
    """
    return split_at_images(text, lambda piece, first: tokenize(piece, add_bos=bos and first, special=True))


def require_images(segments: Sequence[list[int] | None], n_images: int) -> None:
    """The prompt has one image slot per attached image: a user's literal "<image>" would add one."""
    if sum(1 for s in segments if s is None) != n_images:
        raise InputError("a message must not contain the image marker '<image>' itself")
