"""The oracle reward source: the world's judge against the true scene replaces the RM's score, and a
PPO run with it trains and logs those scores (the ceiling measurement of issue #16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factedge.edge.errors import ConfigError
from factedge.train.rl.config import RewardSettings
from factedge.train.rl.data import PromptItem
from factedge.train.rl.oracle import CENTRE, check_reward_source, oracle_scores
from factedge.train.world.judge import judge
from factedge.train.world.scene import BACKGROUNDS, Obj, Scene


def test_scores_are_the_judges_rating_centred(tmp_path):
    scene = Scene((Obj("circle", "red", "large", 0.2, 0.2),), BACKGROUNDS[0])
    (tmp_path / "scenes.json").write_text(json.dumps({"0000001.png": scene.to_dict()}))
    item = PromptItem("a", Path("imgs/0000001.png"), "<image>\nDescribe the image.", "describe", None, 1.0, None)
    texts = ["There is a large red circle at the top left.", "There is a small blue square at the bottom right."]
    got = oracle_scores([item, item], texts, tmp_path / "scenes.json")
    want = [judge(scene, t, "Describe the image.").score - CENTRE for t in texts]
    assert got.tolist() == want and got[0] > 0 > got[1]


def test_the_source_is_checked():
    check_reward_source(RewardSettings())
    with pytest.raises(ConfigError, match="needs reward.scenes"):
        check_reward_source(RewardSettings(source="oracle"))
    with pytest.raises(ConfigError, match="reward.source must be one of rm, oracle"):
        check_reward_source(RewardSettings(source="human"))


def test_claims_score_pays_true_objects_and_charges_false_ones(tmp_path):
    scene = Scene((Obj("circle", "red", "large", 0.2, 0.2), Obj("square", "blue", "small", 0.8, 0.8),
                   Obj("triangle", "green", "small", 0.2, 0.8)), BACKGROUNDS[0])
    (tmp_path / "scenes.json").write_text(json.dumps({"0000001.png": scene.to_dict()}))
    item = PromptItem("a", Path("imgs/0000001.png"), "<image>\nDescribe the image.", "describe", None, 1.0, None)
    texts = ["There is a large red circle at the top left, a small blue square at the bottom right, a small green "
             "triangle at the bottom left and a small yellow circle at the top right.",  # 3 true, 1 false
             "There is a large red circle at the top left.",  # 1 true
             "There is a small yellow circle at the top right.",  # 1 false
             ""]
    got = oracle_scores([item] * 4, texts, tmp_path / "scenes.json", "claims", 2.0).tolist()
    mmhal = oracle_scores([item] * 4, texts, tmp_path / "scenes.json").tolist()
    assert got == [1.0, 1.0, -2.0, 0.0]  # 3 − 2·1, 1, −2, nothing said
    assert mmhal[3] > mmhal[0]  # the rating puts silence above three true objects and one slip
    count_only = ["There are three objects: a.", texts[1]]
    claims = oracle_scores([item] * 2, count_only, tmp_path / "scenes.json", "claims", 2.0).tolist()
    objects = oracle_scores([item] * 2, count_only, tmp_path / "scenes.json", "objects", 2.0).tolist()
    assert claims == [1.0, 1.0] and objects == [0.0, 1.0]  # a true count alone pays under claims, not objects
    assert oracle_scores([item] * 4, texts, tmp_path / "scenes.json", "objects", 1.0).tolist() == [2.0, 1.0, -1.0, 0.0]
    with pytest.raises(ConfigError, match="oracle_score"):
        check_reward_source(RewardSettings(source="oracle", scenes="s.json", oracle_score="f1"))
