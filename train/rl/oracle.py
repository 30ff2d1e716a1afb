"""The oracle reward: the shapes world's judge scores each rollout against the image's true scene.

What a perfect fact-augmented reward model would say, for measuring the ceiling of the RL stage
(issue #16): if PPO with this reward cannot lower hallucination, the reward model is not the
bottleneck. The score is the judge's MMHal-style 0-6 rating centred on its hallucination threshold
(score - 3: a hallucinated answer scores below 0, an informative true one above), in place of the
RM's score; every other term of the terminal reward (stop, length, correctness, KL) is unchanged.
Only for data whose scenes are known (`factedge data shapes` writes scenes.json beside the prompts).
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
CENTRE = 3.0  # MMHal's rubric: a score below 3 is a hallucination


def check_reward_source(reward: RewardSettings) -> None:
    if reward.source not in REWARD_SOURCES:
        raise ConfigError(f"reward.source must be one of {', '.join(REWARD_SOURCES)}, not {reward.source!r}")
    if reward.source == "oracle" and not reward.scenes:
        raise ConfigError("reward.source oracle needs reward.scenes (the world's scenes.json)")


@lru_cache(maxsize=4)
def _scenes(path: str) -> dict:
    from factedge.train.world.export import read_scenes

    return read_scenes(path)


def oracle_scores(items: Sequence[PromptItem], texts: Sequence[str], scenes_path: str | Path) -> torch.Tensor:
    """[B] judge score - 3 of each response against its image's scene."""
    from factedge.train.world.judge import judge

    scenes = _scenes(str(scenes_path))
    out = []
    for item, text in zip(items, texts):
        scene = scenes.get(item.image.name)
        if scene is None:
            raise InputError(f"no scene for image {item.image.name} (item {item.id})", Path(scenes_path))
        question = item.question.replace("<image>", "").strip()
        out.append(judge(scene, text, question).score - CENTRE)
    return torch.tensor(out, dtype=torch.float32)
