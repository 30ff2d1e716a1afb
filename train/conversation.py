"""LLaVA conversation JSON -> token ids and labels, through edge/prompt.py's Vicuna v1 template.

Training must see exactly what inference sends, so the text is `edge.prompt.Conversation.text()`
and the ids follow LLaVA's `tokenizer_image_token` (split at `<image>`, each piece tokenised on its
own, BOS only on the first; IMAGE_TOKEN_INDEX where the image goes). The text is tokenised piece by
piece -- prompt pieces (system + user turns up to "ASSISTANT:") and target pieces (each assistant
reply, then `</s>`) -- so labels fall exactly on the reply tokens and their EOS. With SentencePiece
(whitespace-split pieces, a dummy prefix after special tokens) this is the same id sequence as
tokenising the whole text at once, which a test checks; LLaVA's `preprocess_v1` instead tokenises
whole and re-derives the boundaries with a "-2" length fix-up.

As LLaVA's `preprocess_multimodal`, `<image>` is moved to the front of the first human turn
("<image>\\n" + question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from factedge.edge.errors import InputError
from factedge.edge.prompt import ASSISTANT, IMAGE, SEP, SYSTEM, USER, Conversation, Turn, split_at_images
from factedge.train.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class Piece:
    """A run of text tokenised on its own: `target` pieces carry the loss; `eos` appends `</s>`."""

    text: str
    target: bool = False
    eos: bool = False


def _ids(tokenizer, text: str, bos: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=bos).input_ids) if text else []


def encode_pieces(pieces: Sequence[Piece], tokenizer, *, bos: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels): BOS before the first piece (unless `bos` is off: a reply encoded alone),
    `<image>` -> IMAGE_TOKEN_INDEX in any piece, labels = ids on target pieces (incl. their EOS),
    IGNORE_INDEX elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for n, piece in enumerate(pieces):
        lead = bos and n == 0
        part: list[int] = []
        for seg in split_at_images(piece.text, lambda text, first: _ids(tokenizer, text, lead and first)):
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


def turn_pieces(turns: Sequence[Turn], system: str = SYSTEM) -> list[Piece]:
    """The template of `Conversation(system, turns).text()`, cut into prompt and target pieces."""
    pieces: list[Piece] = []
    prefix = system + SEP
    for turn in turns:
        user = (IMAGE + "\n") * turn.n_images + turn.user
        pieces.append(Piece(f"{prefix}{USER}: {user}{SEP}{ASSISTANT}:"))
        if turn.assistant is None:
            break
        pieces.append(Piece(turn.assistant, target=True, eos=True))
        prefix = ""
    return pieces


def pieces_text(pieces: Sequence[Piece]) -> str:
    """The text the pieces stand for: a reply follows "ASSISTANT:" after a space (tokenised apart,
    SentencePiece's dummy prefix is that space) and its EOS is written `</s>`."""
    return "".join((" " if p.target else "") + p.text + ("</s>" if p.eos else "") for p in pieces)


def encode_conversation(item: dict[str, Any], tokenizer, *, system: str = SYSTEM) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA JSON item; loss only on assistant replies and their `</s>`."""
    turns = conversation_turns(item)
    if turns[-1].assistant is None:
        turns = turns[:-1]
    if not turns:
        raise InputError(f"item {item.get('id')!r}: no assistant reply to learn from")
    return encode_pieces(turn_pieces(turns, system), tokenizer)


def encode_prompt(question: str, tokenizer, *, has_image: bool = True, system: str = SYSTEM) -> list[int]:
    """Ids of a one-question chat ending in "ASSISTANT:", ready for generation (the first human
    value of an item; `<image>` in it is moved to the front as in training)."""
    text, n_images = _first_user(question, has_image)
    ids, _ = encode_pieces([Piece(Conversation(system, [Turn(text, None, n_images)]).text())], tokenizer)
    return ids


def encode_reply(text: str, tokenizer) -> list[int]:
    """Ids of an assistant reply as training targets see it after "ASSISTANT:" (no BOS, then `</s>`)."""
    return encode_pieces([Piece(text, target=True, eos=True)], tokenizer, bos=False)[0]


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
