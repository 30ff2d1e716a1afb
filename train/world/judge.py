"""The oracle: check an answer against the scene, MMHal-style (0..6, < 3 = hallucination).

Deterministic and exact on the world's own language, so hallucination rates of trained models are
measured, not estimated. Every claim claims.py reads is checked against the scene; a false claim is a
hallucination. With the question given, the direct answer (a letter, yes/no, a count, a colour...)
is checked too, and a wrong one counts as a hallucination (MMHal's judge treats wrong answers so).

Score, as MMHal's rubric: no hallucination -> 6 very informative with analysis, 5 very informative,
4 somewhat informative, 3 not informative; with hallucination -> 2, 1, 0 by the same informativeness.
Informative = answers the question (with a supporting, true statement: "analysis"), or for a
description: names every object (and gets the count or all positions right: "analysis").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .claims import Attrs, Claim, extract_claims, tokens
from .questions import parse_question
from .scene import Scene, above, left_of


@dataclass
class Verdict:
    claims: list[str]  # every checked claim, as the text it was read from
    hallucinations: list[str]  # the false ones (plus "wrong answer: ..." for a wrong direct answer)
    hallucinated: bool
    score: int  # 0..6, MMHal's rubric
    informative: int = 0  # 0 not, 1 somewhat, 2 very, 3 very + analysis
    answered: bool | None = None  # the question's direct answer was right / wrong / not found
    covered: int = 0  # scene objects identified by true claims
    true_claims: list[str] = field(default_factory=list)


def _match(scene: Scene, a: Attrs) -> list[int]:
    return [i for i, o in enumerate(scene.objects)
            if (a.shape is None or o.shape == a.shape) and (a.color is None or o.color == a.color)
            and (a.size is None or o.size == a.size)]


_RELATIONS = {
    "left_of": lambda a, b: left_of(a, b),
    "right_of": lambda a, b: left_of(b, a),
    "above": lambda a, b: above(a, b),
    "below": lambda a, b: above(b, a),
}


def check_claim(scene: Scene, c: Claim) -> tuple[bool, set[int], set[int]]:
    """(true?, objects it identifies, objects whose place it states correctly)."""
    objs = scene.objects
    if c.kind == "background":
        return scene.background == c.color, set(), set()
    if c.kind == "count":
        found = _match(scene, c.attrs)
        ok = len(found) == c.n
        return ok, set(found) if ok and c.n == 1 and not c.attrs.empty() else set(), set()
    if c.kind == "relation":
        xs, ys = _match(scene, c.attrs), _match(scene, c.other)
        pairs = [(i, j) for i in xs for j in ys if i != j and _RELATIONS[c.rel](objs[i], objs[j])]
        ok = bool(pairs)
        ids = {i for p in pairs for i in p} if ok and len(xs) == 1 and len(ys) == 1 else set()
        return ok, ids, ids
    attrs = c.attrs
    if c.kind == "attr":
        referents = _match(scene, attrs)
        if not referents:
            return False, set(), set()
        attrs = attrs.merge(c.pred)
        if attrs is None:
            return False, set(), set()
        if c.every:
            each = set(_match(scene, attrs))
            placed = {i for i in each if c.pos is None or c.pos.holds(objs[i].cell)}
            return placed >= set(referents), set(), set()
    found = _match(scene, attrs)
    if c.pos is not None:
        found = [i for i in found if c.pos.holds(objs[i].cell)]
    unique = set(found) if len(found) == 1 else set()
    return bool(found), unique, unique if c.pos is not None else set()


def _informative_description(scene: Scene, claims: list[Claim], covered: set[int], located: set[int],
                             n_true: int) -> int:
    n = len(scene.objects)
    count_ok = any(c.kind == "count" and c.attrs.empty() and c.n == n for c in claims)
    if n and len(covered) == n:
        return 3 if count_ok or len(located) == n else 2
    return 1 if n_true else 0


def judge(scene: Scene, text: str | None, question: str | None = None) -> Verdict:
    """Check `text` (a model's answer) against `scene`; `question` lets short answers ("B", "No.") count."""
    text = text or ""
    claims = extract_claims(text)
    results = [(c, *check_claim(scene, c)) for c in claims]
    halluc = [c.text for c, ok, _, _ in results if not ok]
    true = [c.text for c, ok, _, _ in results if ok]
    covered = set().union(*(ids for _, ok, ids, _ in results if ok)) if results else set()
    located = set().union(*(ids for _, ok, _, ids in results if ok)) if results else set()

    spec = parse_question(question) if question else None
    answered = None
    if spec is not None and spec.topic != "describe":
        answered = spec.check(scene, text)
        if answered is False and not halluc:
            halluc.append(f"wrong answer: {' '.join(tokens(text)[:12])} (truth: {spec.truth(scene)})")
        if answered:
            info = 3 if true else 2
        elif answered is False:  # it did address the question
            info = 2 if true else 1
        else:
            info = 1 if true else 0
    else:
        info = _informative_description(scene, claims, covered, located, len(true))
        attempted = sum(c.kind in ("exists", "attr") for c in claims)
        if halluc and attempted >= len(scene.objects):  # describes every object, some wrongly
            info = max(info, 2)
    hallucinated = bool(halluc)
    score = (2 if info >= 2 else info) if hallucinated else 3 + info
    return Verdict([c.text for c in claims], halluc, hallucinated, score, info, answered, len(covered), true)
