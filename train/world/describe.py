"""The world's own language about a scene: the reference description and the 5 captions (facts).

A description is a count plus a list of mentions ("a large red circle on the left"), always in the
same regular pattern, short enough (<= ~40 LLaMA tokens for 4 objects) for PPO to generate on CPU:

    There are two objects: a large red circle on the left and a small blue square on the right.

`Description` keeps the structure, so hallucinate.py can corrupt one part and re-render the text.
Captions say the same content in five COCO-like ways; they are the facts the reward model sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .scene import POSITION_NAMES, Obj, Scene, above, left_of

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PREPOSITION = {"left": "on", "right": "on", "centre": "in"}  # everything else: "at the ..."


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def position_phrase(cell: tuple[int, int]) -> str:
    """"on the left", "at the top right", "in the centre"."""
    name = POSITION_NAMES[cell]
    return f"{_PREPOSITION.get(name, 'at')} the {name}"


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def count_phrase(n: int, noun: str) -> str:
    """"There is one circle" / "There are two red objects" / "There are no triangles"."""
    return f"There {'is' if n == 1 else 'are'} {number_word(n)} {plural(noun, n)}"


def join_list(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class Mention:
    size: str
    color: str
    shape: str
    cell: tuple[int, int]

    def text(self) -> str:
        return f"{article(self.size)} {self.size} {self.color} {self.shape} {position_phrase(self.cell)}"

    @classmethod
    def of(cls, obj: Obj) -> "Mention":
        return cls(obj.size, obj.color, obj.shape, obj.cell)


@dataclass(frozen=True)
class Description:
    """A stated object count and the mentioned objects, in reading order."""

    count: int
    mentions: tuple[Mention, ...]

    def text(self) -> str:
        head = f"There {'is' if self.count == 1 else 'are'} {number_word(self.count)} {plural('object', self.count)}"
        if not self.mentions:
            return head + "."
        return f"{head}: {join_list([m.text() for m in self.mentions])}."

    def with_mentions(self, mentions) -> "Description":
        ordered = tuple(sorted(mentions, key=lambda m: (m.cell[1], m.cell[0])))
        return replace(self, mentions=ordered)


def description_of(scene: Scene) -> Description:
    return Description(len(scene.objects), tuple(Mention.of(o) for o in scene.objects))


def describe(scene: Scene) -> str:
    """The reference description (what SFT teaches and the judge scores 6)."""
    return description_of(scene).text()


def _names(objs, with_size: bool = False) -> str:
    return join_list([f"{article(o.label if with_size else o.name)} {o.label if with_size else o.name}"
                      for o in objs])


def _relation_sentence(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    if len(objs) == 1:
        o = objs[0]
        return f"A single {o.label} {position_phrase(o.cell)} of the picture."
    pairs = [(a, b) for a in objs for b in objs if a is not b and (left_of(a, b) or above(a, b))]
    a, b = rng.choice(pairs)
    rel = "to the left of" if left_of(a, b) else "above"
    return f"The {a.name} is {rel} the {b.name}."


def captions(scene: Scene, rng: random.Random | None = None) -> list[str]:
    """Five true captions in different phrasings (the image's facts, COCO style)."""
    rng = rng or random.Random(scene.seed)
    objs, bg = scene.objects, scene.background
    n = len(objs)
    shapes = sorted({o.shape for o in objs}, key=lambda s: [o.shape for o in objs].index(s))
    shape_counts = join_list([f"{number_word(c) if c > 1 else article(s)} {plural(s, c)}"
                              for s in shapes for c in [sum(o.shape == s for o in objs)]])
    return [
        f"{_names(objs, with_size=True)[0].upper()}{_names(objs, with_size=True)[1:]} on a {bg} background.",
        f"{number_word(n).capitalize()} {plural('shape', n)} on a {bg} background: "
        f"{join_list([f'{article(o.label)} {o.label} {position_phrase(o.cell)}' for o in objs])}.",
        f"A picture of {shape_counts}.",
        _relation_sentence(scene, rng),
        f"A {bg} image with {_names(objs)}.",
    ]
