"""`factedge train dpo`: direct preference optimisation of a policy LoRA on fact-checked pairs.

Why DPO beside PPO (issue #16): after LLaVA-RLHF the field moved to preference optimisation on
fact-checked pairs, which needs no reward model reading captions (RLAIF-V, HA-DPO, POVID); mDPO adds
image-conditional pairs because plain DPO can learn to ignore the image. Two pair sources:
- offline: the preference file's pairs (plus, with `image_pairs`, their image-conditional twins);
- on_policy: each step samples k answers per prompt from the current policy, ranks them with the
  reward (the fact RM, or the world's judge with `reward.source oracle`) and trains on best vs worst.
The run machinery is the RL stages' (rl/loop.py: adapters on one base, the reference = the policy's
start, AdamW + schedule stepped per step, resume, metrics), and so is the output: `rlhf_model/` with
`rlhf_lora_adapter_model/` beside `sft_model`, which convert, edge, eval and the demo take unchanged.

Why not trl's DPOTrainer: it needs a transformers `PreTrainedModel` fed `input_ids` (+ a processor's
`pixel_values`) and concatenates chosen/rejected token batches itself; our LLaVA splices projected CLIP
features into `inputs_embeds` at IMAGE_TOKEN_INDEX (−200, no token id), has LLaVA-1.5's single-Linear /
MLP projector and pad-to-square preprocessing, and mDPO's pairs differ in the image, not the text. The
loss itself (rl/maths.dpo_loss) is a few lines with hand-worked tests; trl is not a dependency.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from factedge.edge.errors import ConfigError, InputError
from factedge.train.config import OptimSettings
from factedge.train.conversation import encode_reply
from factedge.train.dpo.config import CHOSEN_SOURCES, PAIR_SOURCES, DPOConfig
from factedge.train.dpo.loss import ReferenceTable, pair_step
from factedge.train.dpo.pairs import PrefPair, image_conditional, load_preference_pairs, ranked_pairs
from factedge.train.loop import Plan, Progress
from factedge.train.rl.actor_critic import ActorCritic
from factedge.train.rl.data import load_prompts
from factedge.train.rl.loop import drive, open_session, optimise, run_rl
from factedge.train.rl.rollout import Rollout
from factedge.train.run_dir import RunResult


def check(cfg: DPOConfig) -> None:
    if cfg.pairs not in PAIR_SOURCES:
        raise ConfigError(f"pairs must be one of {', '.join(PAIR_SOURCES)}, not {cfg.pairs!r}")
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be positive, not {cfg.beta}")
    if min(cfg.image_weight, cfg.anchor_weight, cfg.nll_weight) < 0:
        raise ConfigError("image_weight, anchor_weight and nll_weight must be >= 0")
    if cfg.pairs == "offline" and not cfg.preference:
        raise ConfigError("pairs offline needs `preference` (a LLaVA-Human-Preference-10K-format file)")
    if cfg.pairs == "on_policy" and cfg.samples_per_prompt < 2:
        raise ConfigError("on_policy needs samples_per_prompt >= 2 to rank")
    if cfg.chosen not in CHOSEN_SOURCES:
        raise ConfigError(f"chosen must be one of {', '.join(CHOSEN_SOURCES)}, not {cfg.chosen!r}")


def train_pairs(ac: ActorCritic, pairs: list[PrefPair], optimizer: torch.optim.Optimizer, cfg: DPOConfig,
                table: ReferenceTable | None = None, ids: list[int] | None = None) -> dict[str, float]:
    """`cfg.ppo_epochs` passes over `pairs` in shuffled step batches of micro-batches; with a `table`,
    the reference log-probs of pair i come from its row `ids[i]`."""

    def micro(idx: list[int], weight: float) -> dict[str, float]:
        reference = table.lookup(ac, [ids[i] for i in idx]) if table is not None else None
        return pair_step(ac, [pairs[i] for i in idx], cfg, weight, reference)

    return optimise(ac, optimizer, len(pairs), cfg, micro)


@dataclass
class OnPolicyDPO:
    """The on-policy update for rl/loop.run_rl: rank each prompt's samples, train on best vs worst."""

    cfg: DPOConfig
    uses_value: bool = False

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.samples_per_prompt

    def update(self, ac: ActorCritic, ro: Rollout, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        cfg = self.cfg
        rewards = ro.parts.total.tolist()
        references = None
        if cfg.chosen == "reference":
            model = ac.model
            references = [None if it.reference is None else tuple(encode_reply(it.reference, model.tokenizer,
                                                                                model.chat_format))
                          for it in ro.items]
        pairs = ranked_pairs(ro.prompt_ids, [it.image for it in ro.items], ro.responses, rewards,
                             cfg.samples_per_prompt, cfg.min_gap, [it.id for it in ro.items], references)
        n_response = len(pairs)
        if cfg.image_pairs:
            pairs += image_conditional(pairs, f"{cfg.run.seed}:{ro.items[0].id}")
        if not pairs:
            return {"pairs": 0}
        return {**train_pairs(ac, pairs, optimizer, cfg), "pairs": n_response}


def train_dpo(cfg: DPOConfig, progress: Progress | None = None) -> RunResult:
    """Run DPO as configured (module doc); resumes from the run folder."""
    check(cfg)
    if cfg.pairs == "on_policy":
        if cfg.chosen == "reference" and not any(it.reference for it in load_prompts(cfg.data,
                                                                                 image_folder=cfg.image_folder)):
            raise InputError("chosen reference needs the prompts' reference answers (a gpt turn after the human "
                             "one); no item here has one", Path(cfg.data))
        return run_rl(cfg, OnPolicyDPO(cfg), progress)
    pairs: list[PrefPair] = []
    plan: Plan | None = None

    def total_for(ac: ActorCritic) -> int:
        nonlocal plan
        pairs.extend(load_preference_pairs(cfg.preference, ac.model.tokenizer, images=cfg.image_folder,
                                           fmt=ac.model.chat_format))
        if cfg.image_pairs:
            pairs.extend(image_conditional(pairs, cfg.run.seed))
        plan = Plan.make(len(pairs), OptimSettings(epochs=cfg.epochs, max_steps=cfg.max_steps,
                                                   batch_size=cfg.step_batch_size,
                                                   micro_batch_size=cfg.step_micro_batch_size))
        return plan.total_steps

    s = open_session(cfg, total_for, reward=False)
    one_pass = dataclasses.replace(cfg, ppo_epochs=1)
    table = ReferenceTable(pairs, cfg.step_micro_batch_size)

    def step(i: int) -> dict[str, float]:
        ids = plan.batch(i, cfg.run.seed)
        return {**train_pairs(s.ac, [pairs[j] for j in ids], s.optimizer, one_pass, table, ids),
                "epoch": plan.epoch(i + 1)}

    return drive(s, step, progress)
