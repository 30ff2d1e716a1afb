"""The DPO objective of a micro-batch of pairs on the actor-critic's adapters.

Both sides of every pair are scored in one batch: the policy LoRA with gradients, the reference (the
policy's start: the SFT model when the LoRA is fresh, as PPO's reference) without. Sequence
log-probabilities are sums over the reply tokens, `</s>` included, as DPO's. For a fixed pair list
(offline DPO) the reference's values are kept in a `ReferenceTable`, so later epochs do not recompute
them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from factedge.train.dpo.config import DPOConfig
from factedge.train.dpo.pairs import IMAGE, RESPONSE, PrefPair
from factedge.train.rl.actor_critic import POLICY, REFERENCE, ActorCritic
from factedge.train.rl.maths import anchor_loss, dpo_loss


def side_logprobs(ac: ActorCritic, pairs: Sequence[PrefPair], adapter: str) -> tuple[Tensor, Tensor, Tensor]:
    """([P] chosen, [P] rejected sequence log-probs, [P] chosen reply lengths) under `adapter`."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.prompt for p in pairs] * 2
    batch = ac.response_batch(prompts, [s.reply for s in sides], ac.image_embeds([s.image for s in sides]))
    logp, _ = ac.logprobs(batch, adapter)
    seq = logp.sum(1)
    n = len(pairs)
    return seq[:n], seq[n:], batch.mask[:n].sum(1)


class ReferenceTable:
    """The reference's (chosen, rejected) log-probs of a fixed pair list, each chunk of `chunk` pairs
    computed once, when one of them is first needed. The reference is frozen, so the values never
    change; computing by fixed chunks rather than by the step's batch gives a resumed run exactly the
    values the uninterrupted one used."""

    def __init__(self, pairs: Sequence[PrefPair], chunk: int):
        self.pairs, self.chunk = list(pairs), max(1, chunk)
        self.chosen = torch.zeros(len(self.pairs))
        self.rejected = torch.zeros(len(self.pairs))
        self.done: set[int] = set()

    def lookup(self, ac: ActorCritic, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        for k in sorted({i // self.chunk for i in idx} - self.done):
            part = slice(k * self.chunk, (k + 1) * self.chunk)
            with torch.no_grad():
                c, r, _ = side_logprobs(ac, self.pairs[part], REFERENCE)
            self.chosen[part], self.rejected[part] = c.cpu(), r.cpu()
            self.done.add(k)
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return self.chosen[ix], self.rejected[ix]


def pair_step(ac: ActorCritic, pairs: Sequence[PrefPair], cfg: DPOConfig, weight: float,
              reference: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Backward of `weight` × the micro-batch's mean objective; returns its figures. `reference`: the
    pairs' reference log-probs when already known (ReferenceTable), else computed here."""
    device = ac.model.device
    if reference is None:
        with torch.no_grad():
            ref_c, ref_r, _ = side_logprobs(ac, pairs, REFERENCE)
    else:
        ref_c, ref_r = (t.to(device) for t in reference)
    pol_c, pol_r, lengths = side_logprobs(ac, pairs, POLICY)
    terms = dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.label_smoothing)
    is_image = torch.tensor([p.kind == IMAGE for p in pairs], device=device)
    w = torch.where(is_image, torch.full_like(terms.loss, cfg.image_weight), torch.ones_like(terms.loss))
    loss = (w * terms.loss).mean()
    resp = ~is_image
    if cfg.anchor_weight > 0 and resp.any():
        loss = loss + cfg.anchor_weight * anchor_loss(pol_c[resp], ref_c[resp], cfg.beta).sum() / len(pairs)
    if cfg.nll_weight > 0 and resp.any():
        loss = loss + cfg.nll_weight * (-pol_c[resp] / lengths[resp].clamp(min=1)).sum() / len(pairs)
    (loss * weight).backward()
    stats = {"loss": float(loss.detach()), "dpo_loss": float(terms.loss.detach().mean())}
    for name, sel in ((RESPONSE, resp), (IMAGE, is_image)):
        if sel.any():
            prefix = "" if name == RESPONSE else "image_"
            stats[f"{prefix}accuracy"] = float(terms.accuracy[sel].mean())
            stats[f"{prefix}margin"] = float((terms.chosen_reward - terms.rejected_reward)[sel].mean())
    stats["chosen_reward"] = float(terms.chosen_reward.mean())
    stats["rejected_reward"] = float(terms.rejected_reward.mean())
    return stats
