"""The shapes world on disk: exact formats (FACT_RLHF.md, MMHal, POPE), determinism, oracle direction, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from factedge.edge.cli import run
from factedge.edge.errors import ConfigError
from factedge.train.world.benchmarks import MMHAL_TYPES, write_shapes_mmhal, write_shapes_pope
from factedge.train.world.export import HELDOUT_ID_BASE, read_scenes, write_world
from factedge.train.world.judge import judge
from factedge.train.world.questions import TYPES, parse_question
from factedge.train.world.scene import PALETTE, WorldConfig

N = 120


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return write_world(out, N, seed=3, cfg=WorldConfig(image_size=96))


def load(path):
    return json.loads(Path(path).read_text())


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def question(item):
    return item["conversations"][0]["value"].removeprefix("<image>\n")


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = write_world(tmp_path / "a", 12, seed=5, cfg=WorldConfig(image_size=64))
    b = write_world(tmp_path / "b", 12, seed=5, cfg=WorldConfig(image_size=64))
    c = write_world(tmp_path / "c", 12, seed=6, cfg=WorldConfig(image_size=64))
    fa, fb, fc = all_files(a.root), all_files(b.root), all_files(c.root)
    assert fa == fb and len(fa) == 12 + 1 + 11  # images (train + 1 held-out), 5 + 5 json, world.json
    assert fa["scenes.json"] != fc["scenes.json"]
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temp files


def test_train_files_have_the_exact_formats(world):
    scenes = read_scenes(world.scenes)
    sft, prefs, ppo, caps = load(world.sft), load(world.preference), load(world.ppo_prompts), load(world.captions)
    assert len(scenes) == N and set(caps) == set(scenes)
    assert all(len(v) == 5 and all(isinstance(c, str) for c in v) for v in caps.values())
    for item in sft + prefs + ppo:
        assert item["image"] in scenes
        turns = item["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] and all(set(t) == {"from", "value"} for t in turns)
        assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1
    assert all(set(x) == {"id", "image", "conversations"} for x in sft)
    assert all(set(x) == {"id", "image", "conversations", "output_1", "output_2", "preference"} for x in prefs)
    assert all(set(x["output_1"]) == set(x["output_2"]) == {"value"} and x["preference"] in (1, 2) for x in prefs)
    assert all(set(x) == {"id", "image", "conversations", "type", "answer"} and x["type"] in TYPES for x in ppo)
    assert len({x["id"] for x in sft + prefs + ppo}) == len(sft) + len(prefs) + len(ppo)
    assert (len(sft), len(prefs), len(ppo)) == (4 * N, 2 * N, 2 * N)
    for x in ppo:
        if x["type"] == "multiple_choice":
            assert x["answer"] in "ABCD" and x["answer"] == x["conversations"][1]["value"]
        if x["type"] == "yes_no":
            assert x["answer"] in ("Yes", "No") and x["conversations"][1]["value"].startswith(x["answer"] + ".")
    img = Image.open(world.images / "0000000.png")
    assert (img.mode, img.size) == ("RGB", (96, 96)) and img.getpixel((0, 0)) in {PALETTE["black"], PALETTE["grey"]}
    assert int("0000000.png".split(".")[0]) == 0  # LLaVA-RLHF's PPO loader parses the stem as an int


def test_heldout_split_is_separate(world):
    held = world.heldout
    train_scenes, held_scenes = read_scenes(world.scenes), read_scenes(held.scenes)
    assert len(held_scenes) == round(N * 0.1)
    assert held.images == world.root / "heldout" / "images"
    assert all(int(k.split(".")[0]) >= HELDOUT_ID_BASE and (held.images / k).is_file() for k in held_scenes)
    assert not {s.signature() for s in train_scenes.values()} & {s.signature() for s in held_scenes.values()}
    assert {x["image"] for x in load(held.sft)} == set(held_scenes)
    manifest = load(world.manifest)
    assert manifest["counts"]["heldout"]["images"] == len(held_scenes) and manifest["image_folder"] == "images"


def test_sft_hallucinations_are_injected_at_the_rate(world):
    scenes = read_scenes(world.scenes)
    injected = set(load(world.manifest)["sft_injected_ids"])
    describes = [x for x in load(world.sft) if parse_question(question(x)).topic == "describe"]
    assert len(describes) == N
    share = sum(x["id"] in injected for x in describes) / N
    assert 0.18 <= share <= 0.42, share
    for x in load(world.sft):
        v = judge(scenes[x["image"]], x["conversations"][1]["value"], question(x))
        assert v.hallucinated == (x["id"] in injected), x  # exactly the injected items are wrong
        assert len(v.hallucinations) <= 2  # one injection (an extra object also falsifies the count)


def test_preference_oracle_prefers_fewer_hallucinations(world):
    scenes = read_scenes(world.scenes)
    prefs = load(world.preference)
    first = describe = longer = shorter = 0
    for x in prefs:
        scene, q = scenes[x["image"]], question(x)
        v1, v2 = judge(scene, x["output_1"]["value"], q), judge(scene, x["output_2"]["value"], q)
        better, worse = (v1, v2) if x["preference"] == 1 else (v2, v1)
        assert (len(better.hallucinations), -better.score) < (len(worse.hallucinations), -worse.score), x
        assert worse.hallucinated
        first += x["preference"] == 1
        describe += parse_question(q).topic == "describe"
        words = [len(x[k]["value"].split()) for k in ("output_1", "output_2")]
        gap = words[1] - words[0] if x["preference"] == 1 else words[0] - words[1]  # worse minus better
        longer, shorter = longer + (gap > 0), shorter + (gap < 0)
    assert shorter >= 0.4 * longer  # the worse side is often the shorter one too: length is no shortcut
    assert 0.38 <= first / len(prefs) <= 0.62  # the better side is random
    assert describe / len(prefs) >= 0.45  # plenty of describe pairs (what PPO improves)


def test_shapes_mmhal_format_and_answers(tmp_path):
    files = write_shapes_mmhal(tmp_path, 24, seed=1, cfg=WorldConfig(image_size=64))
    items = load(files.questions)
    scenes = read_scenes(files.scenes)
    keys = {"question_type", "question_topic", "image_id", "image_src", "image_path", "image_content",
            "question", "gt_answer"}
    assert [x["question_type"] for x in items] == list(MMHAL_TYPES) * 3
    for x in items:
        assert set(x) == keys and (tmp_path / x["image_path"]).is_file()
        scene = scenes[Path(x["image_path"]).name]
        assert x["image_content"] == [o.label for o in scene.objects]
        v = judge(scene, x["gt_answer"], x["question"])
        assert not v.hallucinated and v.score >= 5, x
    adversarial = [x for x in items if x["question_type"] == "adversarial object"]
    assert all(x["gt_answer"].startswith("There is no ") for x in adversarial)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_shapes_pope_is_balanced_and_true(tmp_path, split):
    files = write_shapes_pope(tmp_path, 40, seed=2, split=split, cfg=WorldConfig(image_size=64))
    lines = [json.loads(s) for s in files.questions.read_text().splitlines()]
    scenes = read_scenes(files.scenes)
    assert all(set(x) == {"question_id", "image", "text", "label"} for x in lines)
    assert [x["question_id"] for x in lines] == list(range(1, len(lines) + 1))
    assert sum(x["label"] == "yes" for x in lines) * 2 == len(lines)
    shared = 0
    for x in lines:
        spec = parse_question(x["text"])
        assert spec.topic == "exists" and spec.value(scenes[x["image"]]) == x["label"]
        if x["label"] == "no":
            present = scenes[x["image"]].objects
            shared += any(o.color == spec.attrs.color or o.shape == spec.attrs.shape for o in present)
    if split == "adversarial":
        assert shared == len(lines) // 2  # every adversarial negative shares a colour or shape
    with pytest.raises(ConfigError):
        write_shapes_pope(tmp_path, 2, split="hard")


def test_cli_writes_and_summarises(tmp_path, capsys):
    assert run(["data", "shapes", "--out", str(tmp_path / "w"), "--n", "6", "--image-size", "64",
                "--sft-hallucination-rate", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 train + 1 held-out images, 24 sft items (6 with an injected hallucination)" in out
    assert run(["data", "shapes-mmhal", "--out", str(tmp_path / "m"), "--n", "8"]) == 0
    assert run(["data", "shapes-pope", "--out", str(tmp_path / "p"), "--n", "5", "--split", "popular"]) == 0
    assert (tmp_path / "p" / "shapes_pope_popular.jsonl").is_file()
    assert run(["data", "shapes", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
