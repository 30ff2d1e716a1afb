"""GRPO and RLOO with Fact-RLHF's reward: k samples per prompt, the group is the baseline.

Same rollout machinery, reward model and shaping as PPO (rl_loop, rollout, rl_math) — only the
advantage differs and there is no value model:
- GRPO: A = (r − mean_group) / (std_group + 1e-4) (or centred only, `scale_rewards: false`);
- RLOO: A = r − mean of the other k − 1 rewards of the prompt.
Each sample's reward is the terminal reward (RM score, −8 without EOS, length, 2·correctness); the
KL to the reference is either folded in as −β·Σ max(logπ − logπ_ref, 0) (`kl_in: reward`, as RLOO
does and as PPO's per-token penalty sums to) or added to the loss as β·mean k3 (`kl_in: loss`, as
the GRPO paper). The sequence advantage is broadcast to every response token of the clipped
surrogate. `rollout.batch_size` counts samples, so a PPO run and a group run with the same batch
size see the same number of responses per step.

Why not trl's GRPOTrainer / RLOOTrainer (trl 1.16): they drive a transformers `PreTrainedModel`
whose `generate()` takes `input_ids` (+ processor `pixel_values`) and whose forward takes
`labels=..., fused_lm_head=True` and returns `.log_probs`; our LLaVA is a custom module that
splices projected CLIP features into `inputs_embeds` at IMAGE_TOKEN_INDEX (−200, not a token id a
tokenizer or processor can produce), with a linear projector and pad-to-square preprocessing that
`LlavaForConditionalGeneration` + `LlavaProcessor` do not express.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from factedge.edge.errors import ConfigError
from factedge.train.rl.actor_critic import POLICY, ActorCritic
from factedge.train.loop import Progress
from factedge.train.rl.config import GroupRLConfig
from factedge.train.rl.loop import optimise, run_rl
from factedge.train.rl.maths import group_advantages, masked_mean, policy_loss, rloo_advantages, token_kl
from factedge.train.rl.rollout import Rollout
from factedge.train.run_dir import RunResult

ESTIMATORS = ("grpo", "rloo")


def sequence_rewards(ro: Rollout, cfg: GroupRLConfig) -> Tensor:
    """[B] terminal reward, minus β·Σ KL when the KL is folded into the reward."""
    r = ro.parts.total.float()
    if cfg.kl_in == "reward":
        r = r - cfg.reward.kl_coef * ro.kl.sum(1)
    return r


def sequence_advantages(rewards: Tensor, cfg: GroupRLConfig) -> Tensor:
    if cfg.estimator == "grpo":
        return group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards)
    return rloo_advantages(rewards, cfg.group_size)


@dataclass
class GroupRL:
    """The GRPO / RLOO update (rl_loop.Algorithm)."""

    cfg: GroupRLConfig
    uses_value: bool = False

    def __post_init__(self) -> None:
        if self.cfg.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be grpo or rloo, not {self.cfg.estimator!r}")
        if self.cfg.kl_in not in ("reward", "loss"):
            raise ConfigError(f"kl_in must be reward or loss, not {self.cfg.kl_in!r}")
        if self.cfg.group_size < 2:
            raise ConfigError("group_size must be >= 2: the group is the baseline")

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.group_size

    def update(self, ac: ActorCritic, ro: Rollout, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        cfg = self.cfg
        rewards = sequence_rewards(ro, cfg)
        adv = sequence_advantages(rewards, cfg)
        device = ac.model.device

        def micro(idx: list[int], weight: float) -> dict[str, float]:
            sub = ro.select(idx)
            mask = sub.mask.to(device)
            batch = ac.response_batch(sub.prompt_ids, sub.responses, ac.image_embeds([it.image for it in sub.items]))
            logp, _ = ac.logprobs(batch, POLICY, cfg.rollout.temperature)
            a = adv[torch.as_tensor(idx)].to(device)[:, None] * mask
            pl = policy_loss(logp, sub.logprobs.to(device), a, mask, cfg.cliprange)
            loss = pl.loss
            stats = {"policy_loss": float(pl.loss.detach()), "approx_kl": float(pl.approx_kl),
                     "clip_frac": float(pl.clip_frac)}
            if cfg.kl_in == "loss":
                k3 = masked_mean(token_kl(logp, sub.ref_logprobs.to(device), mask, "k3"), mask)
                loss = loss + cfg.reward.kl_coef * k3
                stats["kl_k3"] = float(k3.detach())
            (loss * weight).backward()
            return stats

        stats = optimise(ac, optimizer, len(ro), cfg, micro)
        groups = rewards.reshape(-1, cfg.group_size)
        stats.update({"group_reward_std": float(groups.std(dim=1).mean()), "advantage_abs": float(adv.abs().mean())})
        return stats


def train_group_rl(cfg: GroupRLConfig, progress: Progress | None = None) -> RunResult:
    """Run GRPO or RLOO (cfg.estimator) with the Fact-RLHF reward; resumes from the run folder."""
    return run_rl(cfg, GroupRL(cfg), progress)


def train_grpo(cfg: GroupRLConfig, progress: Progress | None = None) -> RunResult:
    return train_group_rl(replace(cfg, estimator="grpo"), progress)


def train_rloo(cfg: GroupRLConfig, progress: Progress | None = None) -> RunResult:
    return train_group_rl(replace(cfg, estimator="rloo"), progress)
