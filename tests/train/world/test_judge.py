"""The shapes world's scenes, pictures, language and judge: exact on its own language, robust to junk."""

from __future__ import annotations

import random

import pytest

from factedge.edge.errors import ConfigError
from factedge.train.world.claims import extract_claims
from factedge.train.world.describe import captions, describe
from factedge.train.world.hallucinate import (DESCRIPTION_KINDS, MISSING_OBJECT, corrupt_answer, corrupt_description,
                                              partial_description)
from factedge.train.world.answers import judge_choice, judge_yes_no, parse_choice, parse_yes_no
from factedge.train.world.judge import judge
from factedge.train.world.questions import VQA_MIX, make_spec, parse_question, qa_of, vqa_items
from factedge.train.world.render import render
from factedge.train.world.scene import (PALETTE, SIZE_EXTENT, Obj, Scene, WorldConfig, derive_seed, random_scene,
                                        scene_for)

# a hand-made scene: large red circle on the left, small blue square on the right, black background
TWO = Scene((Obj("circle", "red", "large", 1 / 6, 0.5), Obj("square", "blue", "small", 5 / 6, 0.5)), "black")
N_SCENES = 300


def scenes(n=N_SCENES, cfg=None):
    return [scene_for(derive_seed("judge-test", i), cfg) for i in range(n)]


def test_scene_is_a_function_of_the_seed_and_follows_the_rules():
    cfg = WorldConfig()
    a = [random_scene(random.Random(7), cfg) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert scene_for(1) != scene_for(2)
    counts = set()
    for s in scenes():
        counts.add(len(s.objects))
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells)  # one object per grid cell: no overlaps
        assert len({o.name for o in s.objects}) == len(s.objects)  # (colour, shape) unique
        assert cells == sorted(cells, key=lambda c: (c[1], c[0]))  # reading order
        assert all(SIZE_EXTENT[o.size] >= 0.2 for o in s.objects)
        assert Scene.from_dict(s.to_dict()) == s
    assert counts == {1, 2, 3, 4}


def test_config_rejects_bad_vocabulary():
    with pytest.raises(ConfigError):
        WorldConfig(colors=("red", "black"), backgrounds=("black",))
    with pytest.raises(ConfigError):
        WorldConfig(max_objects=10)
    with pytest.raises(ConfigError):
        WorldConfig(sft_hallucination_rate=1.5)


def test_render_pixels_are_exact():
    for s in scenes(60):
        img = render(s, 224)
        px = img.load()
        for o in s.objects:
            assert px[int(o.x * 224), int(o.y * 224)] == PALETTE[o.color], (s, o)
        # points far from every object are background
        for x in range(4, 224, 20):
            for y in range(4, 224, 20):
                far = all(max(abs(x / 224 - o.x), abs(y / 224 - o.y)) > SIZE_EXTENT[o.size] / 2 + 0.01
                          for o in s.objects)
                if far:
                    assert px[x, y] == PALETTE[s.background]
    assert {c for _, c in render(TWO, 64).getcolors()} == {PALETTE["black"], PALETTE["red"], PALETTE["blue"]}


def test_hand_worked_verdicts():
    truth = "There are two objects: a large red circle on the left and a small blue square on the right."
    assert describe(TWO) == truth
    ok = judge(TWO, truth)
    assert (ok.hallucinated, ok.score, len(ok.claims), ok.covered) == (False, 6, 3, 2)
    bad = judge(TWO, "There are three objects: a large red circle on the left and a small blue square on the right.")
    assert (bad.hallucinations, bad.score) == (["three objects"], 2)
    assert judge(TWO, "There is a green triangle.").score == 0
    assert judge(TWO, "The square is blue.").score == 4
    assert judge(TWO, "The square is red.").hallucinations == ["the square is red"]
    assert not judge(TWO, "The red circle is to the left of the blue square.").hallucinated
    assert judge(TWO, "The red circle is to the right of the blue square.").hallucinated
    assert judge(TWO, "The red circle is above the blue square.").hallucinated
    assert judge(TWO, "A hexagon and a red circle.").hallucinations == ["a hexagon"]
    assert judge(TWO, "There is no green triangle. The background is black.").score == 4
    assert judge(TWO, "On a grey background.").hallucinated
    assert judge(TWO, "There are two red circles.").hallucinated
    assert judge(TWO, "The small red circle is on the left.").hallucinated  # size wrong
    assert judge(TWO, "A large red circle at the top left.").hallucinated  # the circle is mid-left
    assert judge(TWO, "Both shapes are large.").hallucinations == ["both shapes are large"]  # plural: each one
    assert judge(TWO, "Both objects are on the left.").hallucinated
    assert judge(TWO, "The circle is red and the square is blue.").score == 5  # all named, no count/places
    assert judge(TWO, "In the image, there is a large red circle on the left side and a small blue square "
                      "on the right side.").score == 6  # a free-form variant


def test_degenerate_output_is_not_informative_not_hallucinated():
    for text in ["", "   ", None, "red red red red red", "the the the the", "There are", ".....", "\n\n",
                 "There are two objects: a large red circle on the left and a sm", "ASSISTANT: </s>",
                 "is is is is is", "A. B. C.", "1 2 3 4 5 6 7 8 9 10 11 12", "left right top bottom"]:
        v = judge(TWO, text)
        assert not v.hallucinated, text
        assert v.score in (3, 4), text
    # junk that names an absent thing is a hallucination
    assert judge(TWO, "triangle triangle triangle triangle").hallucinated
    rng = random.Random(0)
    words = "a an the two no not is are red blue green large small circle square triangles objects left " \
            "right top of above below there background and , . ? : 3".split()
    for _ in range(500):  # word salad never crashes and always scores inside the rubric
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        assert 0 <= judge(TWO, text, "Describe the image briefly.").score <= 6


def test_short_answers_with_the_question():
    q = "Is there a green triangle in the image?"
    assert judge(TWO, "No.", q).score == 5
    assert judge(TWO, "No. There is no green triangle in the image.", q).score == 6
    assert judge(TWO, "Yes.", q).hallucinated
    mc = "Which shape is red?\nA. square\nB. circle\nC. triangle\nAnswer with the option's letter."
    assert parse_question(mc).options == ("square", "circle", "triangle")
    assert (judge(TWO, "B", mc).score, judge(TWO, "A", mc).hallucinated) == (5, True)
    assert judge(TWO, "2", "How many objects are there?").score == 5
    assert judge(TWO, "Three.", "How many objects are there?").hallucinated
    assert judge(TWO, "The triangle is red.", "What colour is the triangle?").hallucinated
    assert judge(TWO, "There is no triangle in the image.", "What colour is the triangle?").score == 6
    assert (parse_yes_no("No, there is not."), parse_yes_no("Yes it is"), parse_yes_no("")) == ("no", "yes", None)
    assert judge_yes_no("No. There is no red square.", "No") and not judge_yes_no("Yes.", "no")
    assert [parse_choice(x) for x in ("B", "B.", "(C) circle", "Answer: D", "Because", "")] == \
        ["B", "B", "C", "D", None, None]
    assert judge_choice("A. square", "A") and not judge_choice("B", "A")


def test_true_language_is_judged_true_over_random_scenes():
    cfg = WorldConfig()
    topics = {t for t, _, _ in VQA_MIX} | {"compare", "at_position"}
    for i, s in enumerate(scenes()):
        rng = random.Random(i)
        v = judge(s, describe(s), "Describe the image briefly.")
        assert (v.hallucinated, v.score, v.covered) == (False, 6, len(s.objects)), (s, v)
        for cap in captions(s, rng):
            assert not judge(s, cap).hallucinated, (s, cap)
        qas = vqa_items(s, rng, 6, cfg)
        qas += [qa_of(spec, s) for t in sorted(topics) if (spec := make_spec(t, s, rng, cfg)) is not None]
        for qa in qas:
            assert parse_question(qa.question) is not None, qa.question
            v = judge(s, qa.answer, qa.question)
            assert not v.hallucinated and v.score >= 5, (s, qa, v)


def test_every_injected_hallucination_is_detected():
    cfg = WorldConfig()
    seen = set()
    for i, s in enumerate(scenes()):
        rng = random.Random(i)
        for n in (1, 2):
            c = corrupt_description(s, rng, n, cfg)
            seen.update(c.kinds)
            v = judge(s, c.text)
            assert v.hallucinated and len(v.hallucinations) >= n and v.score <= 2, (s, c, v)
        for qa in vqa_items(s, rng, 3, cfg):
            bad = corrupt_answer(s, qa.spec, rng, cfg)
            if bad is not None:
                assert judge(s, bad.text, qa.question).hallucinated, (s, qa, bad)
    assert seen == set(DESCRIPTION_KINDS)


def test_missing_object_and_partial_descriptions():
    """The pair-only shapes: an under-count is shorter *and* false; a partial description is shorter and true."""
    cfg = WorldConfig()
    n_missing = n_partial = 0
    for i, s in enumerate(scenes()):
        rng = random.Random(i)
        ref = describe(s)
        part = partial_description(s, rng)
        if len(s.objects) < 2:
            assert part is None
            continue
        v = judge(s, part)
        assert not v.hallucinated and len(part) < len(ref) and len(v.true_claims) >= 2, (s, part, v)
        c = corrupt_description(s, rng, 1, cfg, (MISSING_OBJECT,))
        v = judge(s, c.text)
        assert c.kinds == (MISSING_OBJECT,) and v.hallucinated and len(c.text) < len(ref), (s, c, v)
        assert any("object" in h for h in v.hallucinations)  # what is false is the count
        n_missing, n_partial = n_missing + 1, n_partial + 1
    assert n_missing >= 10 and n_partial >= 10


def test_claims_reader_on_variants():
    kinds = lambda text: [(c.kind, c.n) for c in extract_claims(text)]  # noqa: E731
    assert kinds("There are no circles.") == [("count", 0)]
    assert kinds("I see two squares and a red circle.") == [("count", 2), ("exists", None)]
    assert kinds("Is there a red circle?") == []  # questions claim nothing
    assert kinds("There are 3 red and blue objects.") == []  # ambiguous: skipped, not guessed
    assert kinds("There isn't a green square.") == [("count", 0)]
