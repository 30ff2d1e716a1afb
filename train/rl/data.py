"""RL prompts: ppo_prompts.json items with their image, facts and correctness key, and the batch order.

A PPO prompt is an SFT-style item cut to its first human turn (FACT_RLHF.md), plus `type`
(yes_no | multiple_choice | open | describe) and the ground-truth `answer` for the correctness term,
and an optional `length_bonus` multiplier m of the length term. Facts for the reward prompt come from
`image_to_caption.json`, looked up by `facts_key` when an item has one (LLaVA-RLHF keys A-OKVQA items
as "aok_<file>"), else by the image name. The batch order is a pure function of (seed, step), so
a resumed run draws the same prompts without saving a data-loader state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from factedge.edge.errors import ConfigError, InputError
from factedge.train.data import image_folder as resolve_folder
from factedge.train.data import image_path, read_facts, read_items
from factedge.train.rl.maths import QUESTION_TYPES


@dataclass(frozen=True)
class PromptItem:
    id: str
    image: Path
    question: str  # the first human turn's value, "<image>" included
    qtype: str
    answer: str | None
    length_bonus: float  # the length term's multiplier m (default 1)
    facts: tuple[str, ...] | None  # None: plain reward prompt
    reference: str | None = None  # the item's reference gpt turn (its second turn), for DPO's reference pairs


def _facts_for(item: dict, table: dict[str, list[str]], path: Path | str) -> tuple[str, ...]:
    image = str(item.get("image", ""))
    keys = [item.get("facts_key"), image, Path(image).name, Path(image).stem, str(item.get("id"))]
    for key in keys:
        if key and key in table:
            return tuple(str(f) for f in table[key])
    raise InputError(f"no facts for item {item.get('id')!r} (image {image!r})", path)


def _reference(turns: list) -> str | None:
    second = turns[1] if len(turns) > 1 else None
    ok = isinstance(second, dict) and second.get("from") == "gpt" and isinstance(second.get("value"), str)
    return second["value"] if ok and second["value"].strip() else None


def load_prompts(path: str | Path, *, image_folder: str | Path | None = None,
                 facts_path: str | Path | None = None) -> list[PromptItem]:
    """Every item of a ppo_prompts.json, checked (missing fields and unknown types are InputErrors)."""
    path = Path(path)
    data = read_items(path, required=("image", "conversations"))
    folder = resolve_folder(path, image_folder)
    table = read_facts(facts_path) if facts_path is not None else None
    items = []
    for n, item in enumerate(data):
        where = f"item {n} ({item.get('id', '?')})"
        try:
            turns = item["conversations"]
            first = turns[0]
            if first.get("from") != "human":
                raise InputError(f"{where}: the first turn is not from human", path)
            qtype = str(item.get("type", "open"))
            if qtype not in QUESTION_TYPES:
                raise InputError(f"{where}: unknown type {qtype!r}", path)
            answer = item.get("answer")
            items.append(PromptItem(
                id=str(item.get("id", n)), image=image_path(folder, str(item["image"]), path),
                question=str(first["value"]),
                qtype=qtype, answer=None if answer is None else str(answer),
                length_bonus=float(item.get("length_bonus", 1.0)),
                facts=_facts_for(item, table, facts_path) if table is not None else None,
                reference=_reference(turns),
            ))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise InputError(f"{where}: malformed prompt item ({exc!r})", path) from exc
    return items


def steps_for(n_items: int, prompts_per_step: int, epochs: float, max_steps: int = 0) -> int:
    """RL steps of a run: ⌊n·epochs / batch⌋ as the reference trainer (or max_steps when set)."""
    if prompts_per_step < 1 or n_items < prompts_per_step:
        raise ConfigError(f"{n_items} prompts cannot fill a batch of {prompts_per_step}")
    total = int(n_items * epochs // prompts_per_step)
    return max_steps if max_steps > 0 else max(total, 1)


def batch_indices(n_items: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """The prompt indices of RL step `step` (0-based): epoch-wise seeded shuffles, incomplete last
    batch of an epoch dropped (the reference's drop_last loader)."""
    per_epoch = n_items // prompts_per_step
    if per_epoch < 1:
        raise ConfigError(f"{n_items} prompts cannot fill a batch of {prompts_per_step}")
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_items))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[k * prompts_per_step:(k + 1) * prompts_per_step]
