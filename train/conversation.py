"""LLaVA conversation JSON -> token ids and labels, in the model's chat format (edge.chat_format).

Training must see exactly what inference sends, so the text is `edge.prompt.Conversation.text()` in
the format the model talks (Vicuna v1 for LLaMA-SentencePiece LLaVAs, the checkpoint's own template,
e.g. ChatML, for BPE ones) and the ids follow LLaVA's `tokenizer_image_token` (split at `<image>`,
each piece tokenised on its own, BOS only on the first when the tokenizer adds one;
IMAGE_TOKEN_INDEX where the image goes). The text is tokenised piece by piece -- prompt pieces
(system + user turns up to the assistant opening) and target pieces (each assistant reply, then the
format's end token, the model's EOS) -- so labels fall exactly on the reply tokens and their EOS.
Both kinds of vocabulary give the same id sequence as tokenising the whole text at once, which a test
checks: SentencePiece splits at whitespace and its dummy prefix is Vicuna's space before a reply;
byte-level BPE splits at ChatML's special tokens and newlines. LLaVA's `preprocess_v1` instead
tokenises whole and re-derives the boundaries with a "-2" length fix-up.

As LLaVA's `preprocess_multimodal`, `<image>` is moved to the front of the first human turn
("<image>\\n" + question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from factedge.edge.chat_format import TEXT, VICUNA_V1, ChatFormat
from factedge.edge.errors import InputError
from factedge.edge.prompt import IMAGE, Conversation, Turn, split_at_images
from factedge.train.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class Piece:
    """A run of text tokenised on its own: `target` pieces (a reply) carry the loss; `eos` appends the
    model's EOS (the format's end token)."""

    text: str
    target: bool = False
    eos: bool = False


def _ids(tokenizer, text: str, bos: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=bos).input_ids) if text else []


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer opens a text with BOS (LLaMA's does; SmolLM2's and Qwen's do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and _ids(tokenizer, "a", True)[:1] == [bos]


def _dummy_prefix(tokenizer) -> bool:
    """Whether the tokenizer writes a space before a text's first word (SentencePiece's dummy prefix)."""
    return str(tokenizer.convert_ids_to_tokens(_ids(tokenizer, "a", False))[0]).startswith("\u2581")


def _reply_text(fmt: ChatFormat, tokenizer, reply: str) -> str:
    """A reply as tokenised on its own: the format's lead before it, unless the tokenizer's dummy prefix
    already is that lead (Vicuna's " " under SentencePiece)."""
    lead = fmt.answer_lead
    return reply if lead == " " and _dummy_prefix(tokenizer) else lead + reply


def encode_pieces(pieces: Sequence[Piece], tokenizer, *, bos: bool = True,
                  fmt: ChatFormat = VICUNA_V1) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS before the first piece when the tokenizer adds one (unless `bos` is off:
    a reply encoded alone), `<image>` -> IMAGE_TOKEN_INDEX in any piece, labels = ids on target pieces
    (incl. their EOS), IGNORE_INDEX elsewhere."""
    fmt.check_eos(tokenizer.eos_token)
    ids: list[int] = []
    labels: list[int] = []
    bos = bos and _adds_bos(tokenizer)
    for n, piece in enumerate(pieces):
        lead = bos and n == 0
        text = _reply_text(fmt, tokenizer, piece.text) if piece.target else piece.text
        part: list[int] = []
        for seg in split_at_images(text, lambda text, first: _ids(tokenizer, text, lead and first)):
            part.extend([IMAGE_TOKEN_INDEX] if seg is None else seg)
        if lead and (not part or part[0] != tokenizer.bos_token_id):  # text starting with <image>
            part.insert(0, tokenizer.bos_token_id)
        if piece.eos:
            part.append(tokenizer.eos_token_id)
        if piece.target and IMAGE_TOKEN_INDEX in part:
            raise InputError("an assistant reply cannot contain <image>")
        ids.extend(part)
        labels.extend(part if piece.target else [IGNORE_INDEX] * len(part))
    return ids, labels


def _first_user(value: str, has_image: bool) -> tuple[str, int]:
    """(question without `<image>`, number of images) as LLaVA's preprocess_multimodal places them."""
    if not isinstance(value, str):
        raise InputError("conversation values must be strings")
    text = value.replace(IMAGE, "").strip() if IMAGE in value else value
    return text, 1 if has_image else 0


def conversation_turns(item: dict[str, Any]) -> list[Turn]:
    """The item's `conversations` as template turns (human/gpt alternating; a leading non-human
    message is skipped and a trailing human message becomes an open turn, as LLaVA does)."""
    convs = item.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise InputError(f"item {item.get('id')!r}: no conversations")
    if convs[0].get("from") != "human":
        convs = convs[1:]
    turns: list[Turn] = []
    has_image = bool(item.get("image"))
    for i in range(0, len(convs), 2):
        human = convs[i]
        gpt = convs[i + 1] if i + 1 < len(convs) else None
        if human.get("from") != "human" or (gpt is not None and gpt.get("from") != "gpt"):
            raise InputError(f"item {item.get('id')!r}: turns must alternate human/gpt")
        if i == 0:
            text, n_images = _first_user(human.get("value", ""), has_image)
        else:
            text, n_images = str(human.get("value", "")).replace(IMAGE, "").strip(), 0
        turns.append(Turn(text, None if gpt is None else str(gpt.get("value", "")), n_images))
    return turns


def turn_pieces(turns: Sequence[Turn], system: str | None = None, fmt: ChatFormat = VICUNA_V1) -> list[Piece]:
    """The template of `Conversation(system, turns, fmt).text()` (system None: the format's default),
    cut into prompt and target pieces, up to the last answer's end token (what the format writes after
    an end token, ChatML's newline, opens the next prompt piece)."""
    pieces: list[Piece] = []
    system = fmt.system_prompt(system)
    prefix = fmt.system_block.replace(TEXT, system) if system is not None else ""
    for turn in turns:
        user = fmt.image * turn.n_images + turn.user
        pieces.append(Piece(prefix + fmt.user.replace(TEXT, user) + fmt.assistant))
        if turn.assistant is None:
            break
        pieces.append(Piece(turn.assistant, target=True, eos=True))
        prefix = fmt.after_end
    return pieces


def pieces_text(pieces: Sequence[Piece], fmt: ChatFormat = VICUNA_V1) -> str:
    """The text the pieces stand for: a reply follows the format's answer lead (Vicuna's space, which
    SentencePiece's dummy prefix writes when the reply is tokenised apart) and its EOS is written as
    the format's end token."""
    return "".join((fmt.answer_lead if p.target else "") + p.text + (fmt.end if p.eos else "") for p in pieces)


def encode_conversation(item: dict[str, Any], tokenizer, *, system: str | None = None,
                        fmt: ChatFormat = VICUNA_V1) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA JSON item; loss only on assistant replies and their EOS."""
    turns = conversation_turns(item)
    if turns[-1].assistant is None:
        turns = turns[:-1]
    if not turns:
        raise InputError(f"item {item.get('id')!r}: no assistant reply to learn from")
    return encode_pieces(turn_pieces(turns, system, fmt), tokenizer, fmt=fmt)


def encode_prompt(question: str, tokenizer, *, has_image: bool = True, system: str | None = None,
                  fmt: ChatFormat = VICUNA_V1) -> list[int]:
    """Ids of a one-question chat ending in the assistant opening, ready for generation (the first
    human value of an item; `<image>` in it is moved to the front as in training)."""
    text, n_images = _first_user(question, has_image)
    ids, _ = encode_pieces([Piece(Conversation(system, [Turn(text, None, n_images)], fmt).text())], tokenizer,
                           fmt=fmt)
    return ids


def encode_reply(text: str, tokenizer, fmt: ChatFormat = VICUNA_V1) -> list[int]:
    """Ids of an assistant reply as training targets see it after the assistant opening (no BOS, then
    the EOS)."""
    return encode_pieces([Piece(text, target=True, eos=True)], tokenizer, bos=False, fmt=fmt)[0]


def truncate(input_ids: list[int], labels: list[int], max_length: int,
             tokens_per_image: int) -> tuple[list[int], list[int]]:
    """Cut a sample so that it is at most `max_length` positions once each image token becomes
    `tokens_per_image` rows (LLaVA truncates at model_max_length the same way)."""
    length = 0
    for n, tok in enumerate(input_ids):
        length += tokens_per_image if tok == IMAGE_TOKEN_INDEX else 1
        if length > max_length:
            if tok == IMAGE_TOKEN_INDEX:
                raise InputError(f"max_length {max_length} cannot hold the image ({tokens_per_image} positions)")
            return input_ids[:n], labels[:n]
    return input_ids, labels


__all__ = ["Piece", "conversation_turns", "encode_conversation", "encode_pieces", "encode_prompt", "encode_reply",
           "pieces_text", "truncate", "turn_pieces"]
