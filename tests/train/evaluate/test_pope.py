"""POPE: the paper's answer parsing, the metrics on hand-worked numbers, loading and splits."""

from __future__ import annotations

import json

import pytest

from factedge.edge.errors import InputError
from factedge.train.evaluate.pope import (PopeMetrics, PopeRecord, limit_per_split, load_pope, parse_yes_no,
                                          pope_metrics)


@pytest.mark.parametrize("answer, expected", [
    ("Yes, there is a red circle.", "yes"),
    ("No, there is not.", "no"),
    ("There is no red circle in the image.", "no"),
    ("I do not see one", "no"),
    ("no", "no"),
    ("Yes, no doubt", "no"),  # the first sentence has the word "no"
    ("Yes. There is no square.", "yes"),  # only the first sentence counts
    ("Not really.", "yes"),  # "Not" is not one of No / no / not: the script is case-sensitive
    ("NO", "yes"),
    ("None.", "yes"),
    ("nothing", "yes"),
    ("No\nthere is none", "yes"),  # split on spaces only: "No\nthere" is one word
    ("", "yes"),
])
def test_parse_yes_no_is_the_papers(answer, expected):
    assert parse_yes_no(answer) == expected


def _records(preds, labels, splits):
    return [PopeRecord(str(i), s, g, p, p, 1) for i, (p, g, s) in enumerate(zip(preds, labels, splits))]


def test_metrics_hand_worked():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["yes", "yes", "yes", "no", "yes", "no", "no", "no", "no", "yes"]
    m = PopeMetrics.compute(preds, labels)
    assert (m.tp, m.fn, m.fp, m.tn, m.n) == (3, 1, 2, 4, 10)
    assert m.accuracy == pytest.approx(0.7)
    assert m.precision == pytest.approx(0.6)
    assert m.recall == pytest.approx(0.75)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.yes_ratio == pytest.approx(0.5)

    per = pope_metrics(_records(preds, labels, ["random"] * 5 + ["adversarial"] * 5))
    assert list(per) == ["random", "adversarial", "all"]
    r, a = per["random"], per["adversarial"]
    assert (r.tp, r.fn, r.fp, r.tn) == (3, 1, 1, 0)
    assert (r.accuracy, r.precision, r.recall, r.f1, r.yes_ratio) == pytest.approx((0.6, 0.75, 0.75, 0.75, 0.8))
    # no positives predicted or present: precision/recall/F1 are 0, not a ZeroDivisionError
    assert (a.tp, a.fp, a.tn, a.fn) == (0, 1, 4, 0)
    assert (a.accuracy, a.precision, a.recall, a.f1, a.yes_ratio) == pytest.approx((0.8, 0.0, 0.0, 0.0, 0.2))
    assert per["all"] == m


def _write(path, rows, jsonl=True):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows))
    return path


def test_load_splits_images_and_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")  # existence is all loading checks
    (tmp_path / "b.jpg").write_bytes(b"x")
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
            {"question_id": 2, "image": "b.jpg", "text": "Is there a dog in the image?", "label": "No"}]
    random_file = _write(tmp_path / "coco_pope_random.jsonl", rows)
    tagged = _write(tmp_path / "probes.json", [{**rows[1], "category": "popular"}], jsonl=False)
    items = load_pope([random_file, tagged], images=tmp_path / "imgs")
    assert [(i.question_id, i.split, i.label, i.image.name) for i in items] == [
        ("1", "random", "yes", "a.jpg"), ("2", "random", "no", "b.jpg"), ("2", "popular", "no", "b.jpg")]
    assert items[0].image == tmp_path / "imgs" / "a.jpg" and items[1].image == tmp_path / "b.jpg"
    assert [i.question_id for i in limit_per_split(items, 1)] == ["1", "2"]

    bad = _write(tmp_path / "bad.jsonl", [{**rows[0], "label": "maybe"}])
    with pytest.raises(InputError, match="item 0: label must be yes or no"):
        load_pope([bad], images=tmp_path / "imgs")
    url = _write(tmp_path / "url.jsonl", [{**rows[0], "image": "http://images.cocodataset.org/val2014/z.jpg"}])
    with pytest.raises(InputError, match=r"URL .* no local copy.*pass --images DIR holding z\.jpg") as err:
        load_pope([url])
    assert err.value.path == url
    missing = _write(tmp_path / "missing.jsonl", [{"image": "a.jpg", "label": "yes"}])
    with pytest.raises(InputError, match="item 0: missing text"):
        load_pope([missing])
