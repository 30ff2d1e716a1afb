"""MMHal-Bench: loading (types, images, scenes) and the summary figures on a hand-made 8-item set."""

from __future__ import annotations

import json

import pytest

from factedge.edge.errors import InputError
from factedge.train.evaluate.backends import Generation, Speed, one_by_one
from factedge.train.evaluate.judges import CachedJudge, JudgeResult
from factedge.train.evaluate.mmhal import TYPES, MMHalSummary, load_mmhal, normalize_type, run_mmhal

SCENE = {"background": "black", "seed": 7,
         "objects": [{"shape": "circle", "color": "red", "size": "large", "x": 0.5, "y": 0.5}]}
SCORES = [6, 2, 4, 0, 3, 5, 1, 3]  # what the scripted judge gives item i


class ScriptedBackend:
    """Answers "answer <i>" for the i-th question; counts calls."""

    label = "scripted"

    def __init__(self):
        self._speed, self.asked = Speed(), []

    def answer(self, image, question, max_tokens):
        self.asked.append((image.name, question, max_tokens))
        g = Generation(f"answer {len(self.asked) - 1}", [1, 2], "stop", generate_s=0.5)
        self._speed.add(g)
        return g

    def answer_many(self, jobs, max_tokens, progress=None):
        return one_by_one(self, jobs, max_tokens, progress)

    def speed(self):
        return self._speed.to_dict()


class ScriptedJudge:
    name = "scripted"

    def score(self, item, answer):
        s = SCORES[int(answer.split()[-1])]
        return JudgeResult(s, s < 3, f"item {item.index}", parsed=item.index != 7)


@pytest.fixture()
def bench(tmp_path):
    """8 items in MMHal's format, images given every way MMHal files give them."""
    for folder in ("imgs", "images", "elsewhere"):
        (tmp_path / folder).mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    (tmp_path / "images" / "c.jpg").write_bytes(b"x")  # MMHal-Bench's own images/ folder
    (tmp_path / "elsewhere" / "d.jpg").write_bytes(b"x")
    img = [{"image_path": "imgs/a.png"}, {"image_src": "https://farm.example/1/c.jpg"},
           {"image_src": "https://farm.example/2/d.jpg"}, {"image_path": str(tmp_path / "imgs" / "b.png")}]
    types = ["attribute", "adversarial", "counting", "counting", "relation", None, "holistic", "other"]
    items = []
    for i, qtype in enumerate(types):
        item = {"question": f"question {i}?", "image_content": ["Circle"], "gt_answer": "a red circle",
                "image_id": f"s{i}", **img[i % 4]}
        if qtype:
            item["question_type"] = qtype
        items.append(item)
    items[0]["image_content"] = SCENE  # a shapes-mmhal item may carry its scene itself
    (tmp_path / "mmhal.json").write_text(json.dumps(items))
    (tmp_path / "scenes.json").write_text(json.dumps({"s1": {**SCENE, "seed": 1}}))
    return tmp_path


def test_load(bench):
    items = load_mmhal(bench / "mmhal.json", images=bench / "elsewhere")
    assert [i.question_type for i in items] == ["attribute", "adversarial object", "counting", "counting",
                                                "spatial relation", "environment", "holistic description", "other"]
    assert [i.image.parent.name + "/" + i.image.name for i in items[:4]] == [
        "imgs/a.png", "images/c.jpg", "elsewhere/d.jpg", "imgs/b.png"]
    assert items[0].scene == SCENE and items[1].scene["seed"] == 1 and items[2].scene is None
    assert items[3].gt_answer == "a red circle" and items[3].image_content == ["Circle"]
    with pytest.raises(InputError, match=r"item 2: the image is a URL \(https://farm.example/2/d.jpg\).*"
                                         r"pass --images DIR holding d\.jpg"):
        load_mmhal(bench / "mmhal.json")  # d.jpg is only in elsewhere/


def test_type_names():
    assert [normalize_type(None, i) for i in range(9)] == list(TYPES) + ["attribute"]
    assert normalize_type("Spatial_Relation", 0) == "spatial relation"
    assert normalize_type("adversarial object", 0) == "adversarial object"
    assert normalize_type("something new", 3) == "counting"  # unknown: index order


def test_summary_hand_worked(bench):
    items = load_mmhal(bench / "mmhal.json", images=bench / "elsewhere")
    backend, judge = ScriptedBackend(), CachedJudge(ScriptedJudge())
    result = run_mmhal(backend, items, judge)
    s = result.summary
    assert (s.n, s.mean_score, s.hallucination_rate, s.unparsed) == (8, 3.0, 0.375, 1)  # 24/8; 2, 0, 1 are < 3
    assert list(s.per_type) == ["attribute", "adversarial object", "counting", "spatial relation", "environment",
                                "holistic description", "other"]  # no comparison item
    assert (s.per_type["counting"].n, s.per_type["counting"].mean_score,
            s.per_type["counting"].hallucination_rate) == (2, 2.0, 0.5)  # scores 4 and 0
    assert s.per_type["environment"].mean_score == 5.0 and s.per_type["other"].hallucination_rate == 0.0
    assert backend.asked[0] == ("a.png", "question 0?", 1024)  # the paper's MMHal setting, no suffix
    assert [r.score for r in result.records] == SCORES and judge.calls == 8
    assert result.speed["tokens_per_s"] == pytest.approx(16 / 4.0)
    d = result.to_dict()
    assert d["summary"]["per_type"]["counting"] == {"n": 2, "mean_score": 2.0, "hallucination_rate": 0.5}
    # the summary is a function of the records alone
    assert MMHalSummary.compute(result.records) == s


def test_world_judge(bench):
    pytest.importorskip("factedge.train.world.judge")
    from factedge.train.evaluate.judges import WorldJudge

    items = load_mmhal(bench / "mmhal.json", images=bench / "elsewhere")
    judge = WorldJudge()
    good = judge.score(items[0], "There is a large red circle in the image.")
    bad = judge.score(items[0], "There is a green triangle and a red circle.")
    assert not good.hallucinated and good.score >= 3
    assert bad.hallucinated and bad.score < 3 and "triangle" in bad.explanation
    with pytest.raises(InputError, match="no scene"):
        judge.score(items[2], "a red circle")
