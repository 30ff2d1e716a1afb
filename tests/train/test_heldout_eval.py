"""Held-out scoring: the reference answers are judged true with full coverage; saying less lowers the
hallucination rate *and* the coverage (so the figures expose that trade); one false colour is one
false claim."""

from __future__ import annotations

import pytest

from factedge.train.heldout_eval import heldout_items, score_answers
from factedge.train.world.export import read_scenes


@pytest.fixture(scope="module")
def split(small_world):
    root = small_world.root
    items = [it for it in heldout_items(root) if it["type"] == "describe"]
    assert len(items) >= 4
    return root, items


def _answers(texts):
    return [(t, 10, True) for t in texts]


def test_references_are_true_and_cover_every_object(split):
    root, items = split
    res = score_answers(root, items, _answers(it["conversations"][1]["value"] for it in items))
    assert res["hallucination_rate"] == 0.0
    assert res["false_claims"] == 0.0
    assert res["claim_precision"] == 1.0
    assert res["describe_coverage"] == pytest.approx(1.0)
    assert res["true_claims"] >= 1.0


def test_saying_less_is_visible_in_coverage(split):
    root, items = split
    res = score_answers(root, items, _answers("There is a shape." for _ in items))
    assert res["hallucination_rate"] == 0.0 and res["describe_coverage"] == 0.0


def test_one_false_colour_is_one_false_claim(split):
    root, items = split
    scenes = read_scenes(root / "scenes.json")
    texts = []
    for it in items:
        obj = scenes[it["image"]].objects[0]
        other = next(c for c in ("red", "green", "blue", "yellow")
                     if not scenes[it["image"]].find(shape=obj.shape, color=c))
        texts.append(f"There is a {other} {obj.shape}.")
    res = score_answers(root, items, _answers(texts))
    assert res["hallucination_rate"] == 1.0
    assert res["false_claims"] == 1.0
    assert res["claim_precision"] == 0.0
