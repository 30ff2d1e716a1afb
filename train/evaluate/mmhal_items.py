"""MMHal-Bench's vocabulary: its eight question types, the hallucination threshold, one item.

Its own module so that the judges (which rate an item) and the benchmark runner (which asks the
judges) both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TYPES = ("attribute", "adversarial object", "comparison", "counting", "spatial relation", "environment",
         "holistic description", "other")
# the short names MMHal-Bench's json uses, and other spellings seen in the wild
_ALIASES = {"adversarial": "adversarial object", "relation": "spatial relation", "spatial": "spatial relation",
            "holistic": "holistic description", "description": "holistic description", "count": "counting",
            "attributes": "attribute", "comparison": "comparison", "environment": "environment", "other": "other"}
HALLUCINATION_BELOW = 3


@dataclass(frozen=True)
class MMHalItem:
    index: int
    question: str
    image: Path
    image_content: Any  # list of object labels (real MMHal) or whatever the file holds
    gt_answer: str
    question_type: str
    scene: dict | None = None  # a shapes-world scene, when the benchmark came from `factedge data`
    source: Path | None = None


def normalize_type(value: Any, index: int) -> str:
    """One of TYPES: the item's own type when recognisable, else MMHal's index order (i % 8)."""
    if isinstance(value, str):
        v = value.strip().lower().replace("_", " ")
        if v in TYPES:
            return v
        if v in _ALIASES:
            return _ALIASES[v]
        first = v.split(" ")[0] if v else ""
        if first in _ALIASES:
            return _ALIASES[first]
    return TYPES[index % len(TYPES)]
