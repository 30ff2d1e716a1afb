"""The arithmetic of Fact-RLHF's PPO and of the group estimators (GRPO, RLOO), as pure tensor functions.

Kept apart from models and I/O so each formula is tested against hand-worked numbers. Shapes: `[B, T]`
per-token tensors over the *response* tokens (right-padded) with a `mask` (1 = a real response token,
the EOS included); `[B]` per-sequence tensors. Where LLaVA-RLHF's code (an AlpacaFarm descendant)
computes over padding too, these functions mask instead: padding never contributes to a mean, a
whitening statistic or an advantage, and the terminal reward lands on the last *real* token (the
reference adds it at the last padded column, which with γ = λ = 1 reaches the same earlier
advantages but credits padding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from factedge.edge.errors import ConfigError, InputError

QUESTION_TYPES = ("yes_no", "multiple_choice", "open", "describe")


# ---------------------------------------------------------------- masked statistics
def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the positions where mask is 1 (0 when the mask is empty, instead of NaN)."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / (std + eps) with the population std over masked positions, as the reference's
    `whiten`; `shift_mean=False` adds the mean back (reward whitening). Padding comes out 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) / (var.sqrt() + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


# ---------------------------------------------------------------- KL and reward shaping
def token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate of π against π_ref at the sampled tokens.

    k1 clamped at 0 (the paper: max(logπ − logπ_ref, 0)) or k3 ((r − 1) − log r, r = π_ref/π).
    """
    if estimator == "k1":
        kl = torch.clamp(logprobs - ref_logprobs, min=0.0)
    elif estimator == "k3":
        log_r = ref_logprobs - logprobs
        kl = torch.exp(log_r) - 1.0 - log_r
    else:
        raise ConfigError(f"unknown KL estimator {estimator!r} (k1 or k3)")
    return kl * mask.to(kl.dtype)


def last_token_index(mask: Tensor) -> Tensor:
    """Column of the last real token of each row (right padding); an empty row gives 0."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.zeros_like(cols)).max(dim=1).values


@dataclass(frozen=True)
class RewardParts:
    """The terminal reward of each sequence, term by term (logged per rollout)."""

    score: Tensor  # reward model
    stop_penalty: Tensor  # penalty_no_eos where the response never emitted EOS
    length: Tensor  # length_score · multiplier · len / max_new_tokens
    correctness: Tensor  # correct_score · correctness
    total: Tensor


def terminal_reward(
    score: Tensor,
    has_eos: Tensor,
    lengths: Tensor,
    correctness: Tensor,
    *,
    max_new_tokens: int,
    length_multiplier: Tensor | float = 1.0,
    penalty_no_eos: float = -8.0,
    length_score: float = -10.0,
    correct_score: float = 2.0,
    bias: float = 0.0,
) -> RewardParts:
    """RM score + (−8 if no EOS) + (−10·m·len/896) + 2·correctness (+ bias), per sequence.

    The defaults are the 7B script's (`penalty_reward_value`, `length_bonus_score`,
    `correct_bonus_score`, relative stop-token penalty); m < 0 turns the length term into a bonus.
    """
    score = score.to(torch.float32)
    stop = (~has_eos.bool()).to(score.dtype) * penalty_no_eos
    m = torch.as_tensor(length_multiplier, dtype=score.dtype)
    length = length_score * m * lengths.to(score.dtype) / float(max_new_tokens)
    correct = correct_score * correctness.to(score.dtype)
    total = score + stop + length + correct + bias
    return RewardParts(score=score, stop_penalty=stop, length=length, correctness=correct, total=total)


def shape_rewards(kl: Tensor, mask: Tensor, terminal: Tensor, beta: float = 0.1) -> Tensor:
    """Per-token rewards: −β·KL everywhere (masked), plus the terminal reward on the last real token."""
    shaped = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(kl.shape[0], device=kl.device)
    shaped[rows, last_token_index(mask)] += terminal.to(shaped.dtype) * mask.any(dim=1).to(shaped.dtype)
    return shaped


def prepare_rewards(shaped: Tensor, mask: Tensor, *, whiten: bool = False, unwhitened_scale: float = 10.0) -> Tensor:
    """What GAE sees: whitened rewards (mean kept) or, as the reference does with whitening off,
    the shaped rewards times 10."""
    if whiten:
        return masked_whiten(shaped, mask, shift_mean=False)
    return shaped * unwhitened_scale


# ---------------------------------------------------------------- correctness
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[.:)]|$)")
_YES = re.compile(r"^\s*yes\b", re.IGNORECASE)
_NO = re.compile(r"^\s*no\b", re.IGNORECASE)


def answer_letter(answer: str) -> str | None:
    """The option letter a ground-truth answer names ("B", "B.", "(B)", "B. a red circle")."""
    m = re.match(r"^\s*\(?([A-Za-z])(?:[.:)]|\s*$)", answer)
    return m.group(1).upper() if m else None


def correctness(response: str, qtype: str, answer: str | None) -> float:
    """The symbolic correctness term (before its ×2), as LLaVA-RLHF scores it.

    multiple_choice: 1 if the response starts with the right letter ("B", "B.", "B)", "(B)") or says
    "correct option is B", else 0. yes_no: only when the truth is No: +0.5 for a "No…" answer, −0.5
    for a "Yes…" answer (the paper gives no symbolic reward when the truth is Yes). open/describe: 0.
    """
    if qtype not in QUESTION_TYPES:
        raise InputError(f"unknown question type {qtype!r} (one of {', '.join(QUESTION_TYPES)})")
    if qtype == "multiple_choice":
        letter = answer_letter(answer or "")
        if letter is None:
            raise InputError(f"multiple-choice answer {answer!r} names no option letter")
        m = _LETTER.match(response)
        said = m.group(1).upper() if m else None
        return 1.0 if said == letter or f"correct option is {letter}" in response else 0.0
    if qtype == "yes_no":
        if answer is None or not _NO.match(answer):
            return 0.0
        if _NO.match(response):
            return 0.5
        return -0.5 if _YES.match(response) else 0.0
    return 0.0


# ---------------------------------------------------------------- advantages
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over masked response tokens -> (advantages, returns).

    values[:, t] is V(state before token t); the value after the last real token is 0 (episode end).
    """
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        nxt_mask = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        nxt_value = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = (delta + gamma * lam * last * nxt_mask) * m[:, t]
        out[:, t] = last
    return out, (out + values) * m


def group_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO: (r − group mean) / (group std + eps), samples of one prompt consecutive in `rewards`.

    The std is the unbiased sample std (as trl's GRPOTrainer); `scale=False` only centres (Dr. GRPO).
    """
    g = _groups(rewards, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: r_i minus the mean of the other k − 1 rewards of its prompt."""
    if group_size < 2:
        raise ConfigError("RLOO needs group_size >= 2 (a leave-one-out baseline)")
    g = _groups(rewards, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size).to(torch.float32)


# ---------------------------------------------------------------- losses
@dataclass(frozen=True)
class PolicyLoss:
    loss: Tensor
    approx_kl: Tensor  # 0.5·mean((logπ − logπ_old)²), the reference's statistic
    clip_frac: Tensor


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip: float = 0.2) -> PolicyLoss:
    """PPO's clipped surrogate, mean over real tokens: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return PolicyLoss(loss=loss, approx_kl=approx_kl, clip_frac=clip_frac)


@dataclass(frozen=True)
class ValueLoss:
    loss: Tensor  # coef · vf_loss: what is back-propagated
    vf_loss: Tensor  # 0.5 · mean(max(unclipped², clipped²))
    clip_frac: Tensor


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2,
               coef: float = 0.1) -> ValueLoss:
    """Clipped value loss: 0.5·max((v − R)², (clip(v, v_old ± c) − R)²), scaled by coef."""
    clipped_v = torch.maximum(torch.minimum(values, old_values + clip), old_values - clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_v - returns) ** 2
    vf = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLoss(loss=coef * vf, vf_loss=vf, clip_frac=clip_frac)


@dataclass(frozen=True)
class PreferenceLoss:
    loss: Tensor  # [P] per pair, what is averaged and back-propagated
    chosen_reward: Tensor  # [P] β·(logπ(y_w) − logπ_ref(y_w)), the implicit reward
    rejected_reward: Tensor  # [P]
    accuracy: Tensor  # [P] 1 where the chosen side's implicit reward is the higher


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO (Rafailov et al., 2023) on sequence log-probs [P]: −log σ(β·(Δ_w − Δ_l)), Δ = logπ − logπ_ref;
    `label_smoothing` ε gives the conservative form (1−ε)·that + ε·(−log σ(−β·(Δ_w − Δ_l))).
    The sides may differ in the response (plain pairs) or only in the image (mDPO's conditional pairs)."""
    if beta <= 0:
        raise ConfigError(f"beta must be positive, not {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), not {label_smoothing}")
    w = beta * (chosen - ref_chosen)
    lo = beta * (rejected - ref_rejected)
    logits = w - lo
    loss = -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(logits) \
        - label_smoothing * torch.nn.functional.logsigmoid(-logits)
    return PreferenceLoss(loss=loss, chosen_reward=w.detach(), rejected_reward=lo.detach(),
                          accuracy=(logits.detach() > 0).to(chosen.dtype))


def anchor_loss(chosen: Tensor, ref_chosen: Tensor, beta: float = 0.1, delta: float = 0.0) -> Tensor:
    """mDPO's reward anchor [P]: −log σ(β·(logπ(y_w) − logπ_ref(y_w)) − δ), keeping the chosen
    response's likelihood from falling while both sides of a pair fall together."""
    return -torch.nn.functional.logsigmoid(beta * (chosen - ref_chosen) - delta)
