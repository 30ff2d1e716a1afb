"""Preference pairs as ids: the preference file, mDPO's image-conditional twins, ranked rollouts."""

from __future__ import annotations

import json

import pytest

from factedge.edge.errors import InputError
from factedge.train.conversation import encode_conversation, encode_reply
from factedge.train.dpo.pairs import IMAGE, RESPONSE, image_conditional, load_preference_pairs, ranked_pairs
from factedge.train.model import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(small_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_base)


def test_reply_ids_are_the_sft_targets(tokenizer):
    item = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                {"from": "gpt", "value": "A small red circle on the left."}]}
    ids, labels = encode_conversation(item, tokenizer)
    assert encode_reply("A small red circle on the left.", tokenizer) == [t for t in labels if t != IGNORE_INDEX]
    assert ids[-1] == tokenizer.eos_token_id


def test_preference_file_gives_chosen_and_rejected(small_world, tokenizer):
    items = json.loads(small_world.preference.read_text())
    pairs = load_preference_pairs(small_world.preference, tokenizer)
    kept = [it for it in items if it["output_1"]["value"] != it["output_2"]["value"]]
    assert len(pairs) == len(kept) >= 4
    for pair, item in zip(pairs, kept):
        better = item["output_1" if item["preference"] == 1 else "output_2"]["value"]
        worse = item["output_2" if item["preference"] == 1 else "output_1"]["value"]
        assert tokenizer.decode(pair.chosen.reply, skip_special_tokens=True).strip() == better.strip()
        assert tokenizer.decode(pair.rejected.reply, skip_special_tokens=True).strip() == worse.strip()
        assert pair.chosen.reply[-1] == tokenizer.eos_token_id and pair.kind == RESPONSE
        assert pair.chosen.image == pair.rejected.image and pair.chosen.image.name == item["image"]
        assert pair.prompt[0] == tokenizer.bos_token_id and -200 in pair.prompt


def test_image_conditional_pairs_keep_the_reply_and_change_the_image(small_world, tokenizer):
    pairs = load_preference_pairs(small_world.preference, tokenizer)
    twins = image_conditional(pairs, seed=3)
    assert len(twins) == len(pairs)
    for pair, twin in zip(pairs, twins):
        assert twin.kind == IMAGE and twin.chosen == pair.chosen
        assert twin.rejected.reply == pair.chosen.reply and twin.rejected.image != pair.chosen.image
    assert twins == image_conditional(pairs, seed=3)  # seeded
    assert image_conditional(pairs[:1], seed=3) == []  # one image: no other to contrast with


def test_ranked_pairs_take_best_and_worst_of_each_group(tmp_path):
    img = [tmp_path / f"{i}.png" for i in range(2)]
    prompts = [[1, 5]] * 3 + [[1, 6]] * 3
    replies = [[7, 2], [8, 2], [9, 2], [7, 2], [7, 2], [8, 2]]
    rewards = [0.0, 2.0, -1.0, 1.0, 1.2, 1.1]
    pairs = ranked_pairs(prompts, [img[0]] * 3 + [img[1]] * 3, replies, rewards, 3, 0.5, ["a"] * 3 + ["b"] * 3)
    assert len(pairs) == 1  # group b: best − worst = 0.2 < min_gap
    assert pairs[0].chosen.reply == (8, 2) and pairs[0].rejected.reply == (9, 2) and pairs[0].id == "a"
    same = ranked_pairs(prompts[:3], [img[0]] * 3, [[7, 2]] * 3, [0.0, 2.0, -1.0], 3, 0.5, ["a"] * 3)
    assert same == []  # identical replies: nothing to prefer


def test_reference_pairs_prefer_the_truth_to_the_worst_sample(tmp_path):
    """POVID / HA-DPO: the group's reference is chosen even when every sample scores alike (no gap),
    and a group whose worst sample is the reference, or that has none, gives no pair."""
    img = [tmp_path / f"{i}.png" for i in range(3)]
    prompts = [[1, 5]] * 2 + [[1, 6]] * 2 + [[1, 7]] * 2
    replies = [[7, 2], [8, 2], [9, 2], [9, 2], [4, 2], [5, 2]]
    rewards = [0.0, -1.0, 1.0, 1.0, 0.0, 3.0]
    refs = [(3, 2)] * 2 + [(9, 2)] * 2 + [None] * 2
    images = [img[0]] * 2 + [img[1]] * 2 + [img[2]] * 2
    pairs = ranked_pairs(prompts, images, replies, rewards, 2, 0.5, ["a"] * 2 + ["b"] * 2 + ["c"] * 2, refs)
    assert [(p.id, p.chosen.reply, p.rejected.reply) for p in pairs] == [("a", (3, 2), (8, 2))]
    assert pairs[0].chosen.image == img[0] and pairs[0].prompt == (1, 5)
    tied = ranked_pairs(prompts[:2], images[:2], [[7, 2]] * 2, [0.0, 0.0], 2, 0.5, ["a"] * 2, refs[:2])
    assert [(p.chosen.reply, p.rejected.reply) for p in tied] == [((3, 2), (7, 2))]  # no gap needed


@pytest.mark.parametrize("change,message", [
    (lambda it: it.update(preference=3), "preference must be 1 or 2"),
    (lambda it: it.update(output_1={"value": ""}), "empty or not text"),
    (lambda it: it.update(conversations=[]), "first turn"),
])
def test_bad_pairs_are_named(small_world, tokenizer, tmp_path, change, message):
    items = json.loads(small_world.preference.read_text())
    change(items[0])
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps(items))
    with pytest.raises(InputError, match=message) as err:
        load_preference_pairs(bad, tokenizer, images=small_world.root)
    assert str(err.value).startswith(f"{bad}: item 0")
