"""The oracle reward: the shapes world's judge scores each rollout against the image's true scene.

What a perfect fact-augmented reward model would say, for measuring the ceiling of the RL stage
(issue #16): if PPO with this reward cannot lower hallucination, the reward model is not the
bottleneck. The score is the judge's MMHal-style 0-6 rating centred on its hallucination threshold
(score - 3: a hallucinated answer scores below 0, an informative true one above), in place of the
RM's score; every other term of the terminal reward (stop, length, correctness, KL) is unchanged.
Only for data whose scenes are known (`factedge data shapes` writes scenes.json beside the prompts).

`oracle_score: claims` counts instead: true claims (+1 for a right direct answer) − w·false claims. The
MMHal rating gives an answer with no claim at all the same 0 as a description with one slip among four
true objects, so a policy ranked by it learns to say nothing (BENCHMARKS.md); the count pays for every
true object and charges every false one. A policy ranked by claims learnt to stop after the count
("There are four objects: a.", one true claim, no risk); `objects` pays only for the scene's objects
that true claims identify (the judge's coverage), so a count alone earns nothing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from factedge.edge.errors import ConfigError, InputError
from factedge.train.rl.config import RewardSettings
from factedge.train.rl.data import PromptItem

REWARD_SOURCES = ("rm", "oracle")
ORACLE_SCORES = ("mmhal", "claims", "objects")
CENTRE = 3.0  # MMHal's rubric: a score below 3 is a hallucination


def check_reward_source(reward: RewardSettings) -> None:
    if reward.source not in REWARD_SOURCES:
        raise ConfigError(f"reward.source must be one of {', '.join(REWARD_SOURCES)}, not {reward.source!r}")
    if reward.source == "oracle" and not reward.scenes:
        raise ConfigError("reward.source oracle needs reward.scenes (the world's scenes.json)")
    if reward.oracle_score not in ORACLE_SCORES:
        raise ConfigError(f"reward.oracle_score must be one of {', '.join(ORACLE_SCORES)}, not {reward.oracle_score!r}")


@lru_cache(maxsize=4)
def _scenes(path: str) -> dict:
    from factedge.train.world.export import read_scenes

    return read_scenes(path)


def oracle_scores(items: Sequence[PromptItem], texts: Sequence[str], scenes_path: str | Path,
                  kind: str = "mmhal", false_weight: float = 2.0) -> torch.Tensor:
    """[B] score of each response against its image's scene: the judge's rating − 3 (`mmhal`) or the
    claim count (`claims`, module doc)."""
    from factedge.train.world.judge import judge

    scenes = _scenes(str(scenes_path))
    out = []
    for item, text in zip(items, texts):
        scene = scenes.get(item.image.name)
        if scene is None:
            raise InputError(f"no scene for image {item.image.name} (item {item.id})", Path(scenes_path))
        question = item.question.replace("<image>", "").strip()
        v = judge(scene, text, question)
        if kind in ("claims", "objects"):
            paid = len(v.true_claims) if kind == "claims" else v.covered
            out.append(paid + (v.answered is True) - false_weight * len(v.hallucinations))
        else:
            out.append(v.score - CENTRE)
    return torch.tensor(out, dtype=torch.float32)
