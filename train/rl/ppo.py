"""Fact-RLHF PPO (LLaVA-RLHF's recipe) on one base hosting the policy/reference/value/reward adapters.

Per RL step (rl_loop): sample `rollout.batch_size` responses at temperature 1; score them (policy
and reference log-probs, values, the fact-augmented reward model); shape per-token rewards
(−β·max(logπ − logπ_ref, 0) everywhere, the terminal reward on the last token), ×10 (or whiten),
GAE with γ = λ = 1, whiten the advantages; then `ppo_epochs` passes of clipped policy loss
(ε 0.2) and clipped value loss (0.5·max, clip 0.2, coefficient 0.1), each backpropagated right after
its own forward (policy adapter, then value adapter), grad-norm clip 1.0 over both, AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from factedge.edge.errors import ConfigError
from factedge.train.rl.actor_critic import POLICY, ActorCritic
from factedge.train.loop import Progress
from factedge.train.rl.config import PPOConfig
from factedge.train.rl.loop import optimise, run_rl
from factedge.train.rl.maths import gae, masked_mean, masked_whiten, policy_loss, prepare_rewards, shape_rewards
from factedge.train.rl.maths import value_loss
from factedge.train.rl.rollout import Rollout
from factedge.train.run_dir import RunResult


def ppo_advantages(ro: Rollout, cfg: PPOConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(shaped rewards, advantages, returns), all [B, R], from a scored rollout."""
    if ro.values is None:
        raise ConfigError("a PPO rollout needs values")
    shaped = shape_rewards(ro.kl, ro.mask, ro.parts.total, beta=cfg.reward.kl_coef)
    rewards = prepare_rewards(shaped, ro.mask, whiten=cfg.reward.whiten_rewards,
                              unwhitened_scale=cfg.reward.unwhitened_scale)
    adv, ret = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, ro.mask)
    return shaped, adv, ret


def _rows(t: Tensor, idx: list[int], width: int, device) -> Tensor:
    return t[torch.as_tensor(idx)][:, :width].to(device)


@dataclass
class PPO:
    """The PPO update (rl_loop.Algorithm)."""

    cfg: PPOConfig
    uses_value: bool = True
    samples_per_prompt: int = 1

    def update(self, ac: ActorCritic, ro: Rollout, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        cfg = self.cfg
        shaped, adv, ret = ppo_advantages(ro, cfg)
        device = ac.model.device

        def micro(idx: list[int], weight: float) -> dict[str, float]:
            sub = ro.select(idx)
            width = sub.mask.shape[1]
            mask = sub.mask.to(device)
            batch = ac.response_batch(sub.prompt_ids, sub.responses, ac.image_embeds([it.image for it in sub.items]))
            logp, _ = ac.logprobs(batch, POLICY, cfg.rollout.temperature)
            pl = policy_loss(logp, sub.logprobs.to(device), _rows(adv, idx, width, device), mask, cfg.cliprange)
            (pl.loss * weight).backward()
            values = ac.values(batch)
            vl = value_loss(values, sub.values.to(device), _rows(ret, idx, width, device), mask,
                            cfg.cliprange_value, cfg.vf_coef)
            (vl.loss * weight).backward()
            return {"policy_loss": float(pl.loss.detach()), "approx_kl": float(pl.approx_kl),
                    "clip_frac": float(pl.clip_frac), "value_loss": float(vl.vf_loss.detach()),
                    "value_clip_frac": float(vl.clip_frac)}

        stats = optimise(ac, optimizer, len(ro), cfg, micro)
        stats.update({"shaped_reward_sum": float(shaped.sum(1).mean()),
                      "return_mean": float(masked_mean(ret, ro.mask)),
                      "value_mean": float(masked_mean(ro.values, ro.mask))})
        return stats


def train_ppo(cfg: PPOConfig, progress: Progress | None = None) -> RunResult:
    """Run Fact-RLHF PPO as configured (see the module doc); resumes from the run folder."""
    return run_rl(cfg, PPO(cfg), progress, value_adapter=cfg.value_adapter)
