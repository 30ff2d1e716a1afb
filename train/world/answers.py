"""Short answers read back: yes/no by POPE's rule, a multiple-choice letter, and whether each is right.

Its own module so that the question specs (which check their own answers) and the judge (which reads
the question specs) both import it, and neither imports the other's helpers at call time.
"""

from __future__ import annotations

from .claims import tokens


def parse_yes_no(text: str | None) -> str | None:
    """POPE's rule: "no" if the first sentence has no/not, else "yes"; None for empty text."""
    text = (text or "").strip()
    if not text:
        return None
    first = text.split(".")[0]
    words = set(tokens(first))
    return "no" if words & {"no", "not"} else "yes"


def judge_yes_no(text: str | None, truth: str) -> bool:
    """Is the yes/no answer right? (`truth`: "yes"/"no", any case, trailing "." allowed.)"""
    return parse_yes_no(text) == truth.strip().rstrip(".").lower()


def parse_choice(text: str | None, letters: str = "ABCDEFGH") -> str | None:
    """The option letter an answer starts with ("B", "B.", "(B) ...", "Answer: B"), or None."""
    t = (text or "").strip()
    for prefix in ("answer:", "the answer is", "option"):
        if t.lower().startswith(prefix):
            t = t[len(prefix):].strip()
    t = t.lstrip("(").strip()
    if t and t[0] in letters and (len(t) == 1 or not t[1].isalpha()):
        return t[:1]
    return None


def judge_choice(text: str | None, truth: str) -> bool:
    """Does the answer start with the right letter (LLaVA-RLHF's multiple-choice check)?"""
    return parse_choice(text) == truth.strip().rstrip(".").upper()[:1]
