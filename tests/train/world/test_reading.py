"""world.reading: text-only items whose answers are right by the captions they carry."""

from __future__ import annotations

import json
import random

from factedge.train.world.describe import captions
from factedge.train.world.export import read_scenes, write_world
from factedge.train.world.judge import judge
from factedge.train.world.reading import VERIFY_QUESTION, reading_items
from factedge.train.world.scene import WorldConfig, scene_for


def _parts(item):
    human, gpt = (t["value"] for t in item["conversations"])
    return human, gpt


def test_reading_items_answer_from_the_captions():
    cfg = WorldConfig(image_size=64, reading_per_image=2)
    kinds = {"question": 0, "yes": 0, "no": 0}
    for i in range(150):
        scene = scene_for(i, cfg)
        fixed = set(captions(scene, random.Random(0))) & set(captions(scene, random.Random(1)))
        assert len(fixed) >= 4  # only the relation sentence depends on the rng
        for item in reading_items(f"{i:07d}", scene, random.Random(i), cfg):
            human, gpt = _parts(item)
            assert "image" not in item and "<image>" not in human and item["id"].startswith(f"{i:07d}-read")
            listed = {line[4:] for line in human.splitlines() if line.startswith("  - ")}
            assert len(listed) == 5 and fixed <= listed  # the image's five facts
            if human.endswith(VERIFY_QUESTION):
                text = human.split("\n", 1)[0].removeprefix("Description: ")
                bad = judge(scene, text).hallucinations
                assert gpt == "Yes." if not bad else gpt.startswith("No. ")
                kinds["no" if bad else "yes"] += 1
            else:  # a world question, answered as the judge accepts
                question = human.rsplit("\n", 1)[1]
                assert not judge(scene, gpt, question).hallucinated
                kinds["question"] += 1
    total = sum(kinds.values())
    assert total == 300
    assert 0.4 < kinds["question"] / total < 0.6 and 0.2 < kinds["yes"] / total < 0.3 and 0.2 < kinds["no"] / total < 0.3


def test_reading_items_leave_the_other_files_unchanged(tmp_path):
    plain = write_world(tmp_path / "a", 12, seed=1, cfg=WorldConfig(image_size=64))
    read = write_world(tmp_path / "b", 12, seed=1, cfg=WorldConfig(image_size=64, reading_per_image=1))
    for name in ("preference.json", "ppo_prompts.json", "image_to_caption.json", "scenes.json"):
        assert (plain.root / name).read_bytes() == (read.root / name).read_bytes()
    a, b = json.loads(plain.sft.read_text()), json.loads(read.sft.read_text())
    assert [x for x in b if "-read" not in x["id"]] == a and len(b) - len(a) == 12
    assert read_scenes(read.scenes).keys() == read_scenes(plain.scenes).keys()
