"""Preference pairs for DPO, as token ids: from a preference file, from ranked rollouts, and their
image-conditional counterparts.

A pair is one prompt and two sides, each side an (image, reply) — so the same type holds the usual
pair (one image, a less and a more hallucinated reply) and mDPO's conditional pair (one reply, the
true image vs another image): the DPO loss does not care which of the two differs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from factedge.edge.chat_format import VICUNA_V1, ChatFormat
from factedge.edge.errors import InputError
from factedge.train.conversation import encode_prompt, encode_reply
from factedge.train.data import image_folder, image_path, read_items

RESPONSE, IMAGE = "response", "image"  # what differs between a pair's sides


@dataclass(frozen=True)
class Side:
    image: Path
    reply: tuple[int, ...]  # reply ids, `</s>` included when the reply ended


@dataclass(frozen=True)
class PrefPair:
    id: str
    prompt: tuple[int, ...]  # ids up to "ASSISTANT:", IMAGE_TOKEN_INDEX where the image goes
    chosen: Side
    rejected: Side
    kind: str = RESPONSE


def _reply_text(value, where: str, path: Path) -> str:
    text = value.get("value") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: an output is empty or not text", path)
    return text


def load_preference_pairs(path: str | Path, tokenizer, *, images: str | Path | None = None,
                          fmt: ChatFormat = VICUNA_V1) -> list[PrefPair]:
    """LLaVA-Human-Preference-10K items (`conversations`, `output_1`, `output_2`, `preference` 1|2,
    `image`) as pairs: the first human turn is the prompt, the preferred output the chosen reply."""
    path = Path(path)
    folder = image_folder(path, images)
    out = []
    for n, item in enumerate(read_items(path, required=("image", "conversations", "output_1", "output_2",
                                                        "preference"))):
        where = f"item {n} ({item.get('id', '?')})"
        pref = item["preference"]
        if pref not in (1, 2):
            raise InputError(f"{where}: preference must be 1 or 2, not {pref!r}", path)
        turns = item["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
                or turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str):
            raise InputError(f"{where}: the first turn must be a human message", path)
        image = image_path(folder, str(item["image"]), path)
        replies = [tuple(encode_reply(_reply_text(item[k], where, path), tokenizer, fmt))
                   for k in ("output_1", "output_2")]
        if replies[0] == replies[1]:
            continue  # nothing to prefer
        chosen, rejected = (replies[0], replies[1]) if pref == 1 else (replies[1], replies[0])
        out.append(PrefPair(str(item.get("id", n)), tuple(encode_prompt(turns[0]["value"], tokenizer, fmt=fmt)),
                            Side(image, chosen), Side(image, rejected)))
    if not out:
        raise InputError("no pair with two different outputs", path)
    return out


def image_conditional(pairs: Sequence[PrefPair], seed: int | str) -> list[PrefPair]:
    """mDPO's conditional pairs: for each response pair, its chosen reply with its own image ≻ the same
    reply with another pair's image (a seeded shuffle; never the same image file)."""
    base = [p for p in pairs if p.kind == RESPONSE]
    others = [p.chosen.image for p in base]
    if len(set(others)) < 2:
        return []
    rng = random.Random(f"image-pairs:{seed}")
    out = []
    for p in base:
        other = p.chosen.image
        while other == p.chosen.image:
            other = rng.choice(others)
        out.append(replace(p, id=f"{p.id}:image", rejected=Side(other, p.chosen.reply), kind=IMAGE))
    return out


def ranked_pairs(prompts: Sequence[Sequence[int]], images: Sequence[Path], replies: Sequence[Sequence[int]],
                 rewards: Sequence[float], group: int, min_gap: float, ids: Sequence[str],
                 references: Sequence[Sequence[int] | None] | None = None) -> list[PrefPair]:
    """Best vs worst reply of each prompt's `group` consecutive samples (RLAIF-V's ranking), when
    their rewards differ by at least `min_gap` and the replies differ. With `references` (reply ids per
    sample, the same for a group), the group's reference ≻ its worst sample (POVID / HA-DPO) whenever
    the two differ: the gap is not asked for, since a group whose samples all share one mistake is the
    case the best-vs-worst ranking cannot teach."""
    out = []
    for g in range(0, len(rewards) - group + 1, group):
        idx = range(g, g + group)
        best = max(idx, key=lambda i: rewards[i])
        worst = min(idx, key=lambda i: rewards[i])
        if references is not None:
            if references[g] is None or list(references[g]) == list(replies[worst]):
                continue
            chosen = Side(images[g], tuple(references[g]))
        elif rewards[best] - rewards[worst] < min_gap or list(replies[best]) == list(replies[worst]):
            continue
        else:
            chosen = Side(images[best], tuple(replies[best]))
        out.append(PrefPair(ids[g], tuple(prompts[g]), chosen, Side(images[worst], tuple(replies[worst]))))
    return out
