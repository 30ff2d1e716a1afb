"""rl_math against numbers worked out by hand (in the comments), float64 so the comparison is tight."""

from __future__ import annotations

import math

import pytest
import torch

from factedge.edge.errors import ConfigError, InputError
from factedge.train.rl import maths as rm

D = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def close(a: torch.Tensor, expected, atol: float = 1e-9) -> None:
    assert torch.allclose(a.to(D), t(expected), atol=atol, rtol=0), (a, expected)


MASK = t([[1, 1, 1, 0]])


# ---------------------------------------------------------------- statistics
def test_masked_mean_and_whiten():
    x = t([[1.0, 2.0, 3.0, 100.0]])  # the 100 is padding
    assert rm.masked_mean(x, MASK).item() == 2.0
    # mean 2, population var (1 + 0 + 1)/3 = 2/3, std 0.81649658; 1/std = 1.22474487
    # (eps 1e-8 on the std moves the 8th decimal)
    close(rm.masked_whiten(x, MASK), [[-1.224744871, 0.0, 1.224744871, 0.0]], atol=1e-7)
    # shift_mean=False adds the mean back: 2 - 1.2247, 2, 2 + 1.2247
    close(rm.masked_whiten(x, MASK, shift_mean=False), [[0.775255129, 2.0, 3.224744871, 0.0]], atol=1e-7)
    assert rm.masked_mean(x, torch.zeros_like(x)).item() == 0.0  # empty mask: 0, not NaN


# ---------------------------------------------------------------- KL, shaping
def test_token_kl_k1_clamped_and_k3():
    lp = t([[-1.0, -2.0, -0.5, -3.0]])
    ref = t([[-1.5, -1.0, -0.5, -9.0]])
    # k1: lp - ref = 0.5, -1 (clamped to 0), 0, (masked)
    close(rm.token_kl(lp, ref, MASK), [[0.5, 0.0, 0.0, 0.0]])
    # k3: log r = ref - lp = -0.5, 1, 0 -> e^-0.5 - 1 + 0.5 = 0.1065306597, e - 2 = 0.7182818285, 0
    close(rm.token_kl(lp, ref, MASK, "k3"), [[0.1065306597, 0.7182818285, 0.0, 0.0]], atol=1e-10)
    with pytest.raises(ConfigError):
        rm.token_kl(lp, ref, MASK, "k2")


def test_terminal_reward_parts():
    parts = rm.terminal_reward(
        score=t([1.5, -0.5]), has_eos=torch.tensor([True, False]), lengths=torch.tensor([3, 448]),
        correctness=t([1.0, -0.5]), max_new_tokens=896, length_multiplier=t([1.0, -1.0]),
    )
    # row 0: 1.5 + 0 + (-10·1·3/896 = -0.0334821429) + 2·1 = 3.4665178571
    # row 1: -0.5 - 8 + (-10·(-1)·448/896 = +5) + 2·(-0.5) = -4.5
    close(parts.stop_penalty, [0.0, -8.0])
    close(parts.length, [-0.0334821429, 5.0], atol=1e-7)
    close(parts.correctness, [2.0, -1.0])
    close(parts.total, [3.4665178571, -4.5], atol=1e-6)


def test_shape_rewards_terminal_on_last_real_token():
    kl = t([[0.5, 0.0, 0.0, 0.0], [0.2, 0.1, 0.3, 0.4]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    shaped = rm.shape_rewards(kl, mask, t([3.0, -4.5]), beta=0.1)
    # row 0: -0.1·0.5, 0, 0 + 3 (last real token is column 2), padding 0
    # row 1: -0.02, -0.01, -0.03, -0.04 - 4.5
    close(shaped, [[-0.05, 0.0, 3.0, 0.0], [-0.02, -0.01, -0.03, -4.54]], atol=1e-7)
    close(rm.prepare_rewards(shaped, mask), [[-0.5, 0.0, 30.0, 0.0], [-0.2, -0.1, -0.3, -45.4]], atol=1e-6)
    # whitening instead (mean kept): row values over 7 real tokens
    w = rm.prepare_rewards(shaped, mask, whiten=True)
    assert w[0, 3].item() == 0.0
    assert rm.masked_mean(w, mask).item() == pytest.approx(rm.masked_mean(shaped, mask).item(), abs=1e-9)


def test_last_token_index():
    assert rm.last_token_index(t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])).tolist() == [1, 3, 0]


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize(
    "response,qtype,answer,expected",
    [
        ("B", "multiple_choice", "B", 1.0),
        ("B. a red circle", "multiple_choice", "B", 1.0),
        (" (B) red", "multiple_choice", "B. red", 1.0),
        ("b)", "multiple_choice", "(B)", 1.0),
        ("The correct option is B.", "multiple_choice", "B", 1.0),
        ("A. blue", "multiple_choice", "B", 0.0),
        ("A red circle.", "multiple_choice", "A", 0.0),  # "A" the article, not the option
        ("Blue", "multiple_choice", "B", 0.0),
        ("No, there is no square.", "yes_no", "No", 0.5),
        ("no", "yes_no", "no", 0.5),
        ("Yes, there is.", "yes_no", "No", -0.5),
        ("Not sure.", "yes_no", "No", 0.0),
        ("There is a square.", "yes_no", "No", 0.0),
        ("Yes", "yes_no", "Yes", 0.0),  # no symbolic reward when the truth is Yes
        ("No", "yes_no", "Yes", 0.0),
        ("Two circles.", "open", "2", 0.0),
        ("A red circle.", "describe", None, 0.0),
    ],
)
def test_correctness(response, qtype, answer, expected):
    assert rm.correctness(response, qtype, answer) == expected


def test_correctness_bad_items():
    with pytest.raises(InputError):
        rm.correctness("B", "counting", "B")
    with pytest.raises(InputError):
        rm.correctness("B", "multiple_choice", "blue")


# ---------------------------------------------------------------- GAE
def test_gae_gamma_lambda_one():
    rewards = t([[0.0, 0.0, 1.0, 9.0]])  # 9 and 7 are padding: must not leak in
    values = t([[0.5, 0.2, 0.4, 7.0]])
    adv, ret = rm.gae(rewards, values, MASK, 1.0, 1.0)
    # t=2: δ = 1 + 0 - 0.4 = 0.6 -> A = 0.6
    # t=1: δ = 0 + 0.4 - 0.2 = 0.2 -> A = 0.8
    # t=0: δ = 0 + 0.2 - 0.5 = -0.3 -> A = 0.5 ; returns = A + V = 1, 1, 1
    close(adv, [[0.5, 0.8, 0.6, 0.0]])
    close(ret, [[1.0, 1.0, 1.0, 0.0]])


def test_gae_discounted():
    rewards = t([[0.0, 0.0, 1.0, 9.0]])
    values = t([[0.5, 0.2, 0.4, 7.0]])
    adv, ret = rm.gae(rewards, values, MASK, 0.9, 0.5)
    # γλ = 0.45. t=2: δ = 0.6, A = 0.6
    # t=1: δ = 0.9·0.4 - 0.2 = 0.16, A = 0.16 + 0.45·0.6 = 0.43
    # t=0: δ = 0.9·0.2 - 0.5 = -0.32, A = -0.32 + 0.45·0.43 = -0.1265
    close(adv, [[-0.1265, 0.43, 0.6, 0.0]])
    close(ret, [[0.3735, 0.63, 1.0, 0.0]])


# ---------------------------------------------------------------- losses
def test_policy_loss_clipping():
    old = t([[-1.0, -2.0, -0.7, -4.0]])
    ratios = t([[1.0, 1.5, 0.5, 3.0]])
    lp = old + ratios.log()
    adv = t([[1.0, 2.0, -1.0, 5.0]])
    out = rm.policy_loss(lp, old, adv, MASK, clip=0.2)
    # tok0: ρ=1,   A=1:  max(-1, -1)        = -1
    # tok1: ρ=1.5, A=2:  max(-3, -2·1.2)    = -2.4 (clipped)
    # tok2: ρ=0.5, A=-1: max(0.5, 1·0.8)    = 0.8  (clipped)
    # mean = (-1 - 2.4 + 0.8)/3 = -0.8666666667; clip fraction 2/3
    assert out.loss.item() == pytest.approx(-2.6 / 3, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(2 / 3, abs=1e-12)
    # approx KL = 0.5·(0 + ln²1.5 + ln²0.5)/3 = 0.5·(0.1644019977 + 0.4804530139)/3 = 0.1074758280
    assert out.approx_kl.item() == pytest.approx(0.1074758280, abs=1e-9)


def test_policy_loss_gradient_only_through_unclipped():
    old = t([[-1.0, -1.0]])
    lp = (old + t([[1.5, 1.0]]).log()).requires_grad_(True)
    out = rm.policy_loss(lp, old, t([[2.0, 2.0]]), t([[1, 1]]))
    out.loss.backward()
    # clipped token has no gradient; the other: d/dlp (-A·e^(lp-old))/2 = -2·1/2 = -1
    close(lp.grad, [[0.0, -1.0]])


def test_value_loss_clipping():
    values = t([[0.5, 1.0, 0.0]])
    old = t([[0.4, 0.5, 0.1]])
    returns = t([[0.6, 2.0, -1.0]])
    out = rm.value_loss(values, old, returns, t([[1, 1, 1]]), clip=0.2, coef=0.1)
    # tok0: clip(0.5, 0.2, 0.6) = 0.5: 0.01 vs 0.01 -> 0.01
    # tok1: clip(1.0, 0.3, 0.7) = 0.7: (1-2)² = 1 vs (0.7-2)² = 1.69 -> 1.69 (clipped)
    # tok2: clip(0.0, -0.1, 0.3) = 0: 1 vs 1 -> 1
    # vf = 0.5·(0.01 + 1.69 + 1)/3 = 0.45 ; loss = 0.1·0.45 = 0.045
    assert out.vf_loss.item() == pytest.approx(0.45, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.045, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(1 / 3, abs=1e-12)


# ---------------------------------------------------------------- group estimators
def test_grpo_group_advantages():
    r = t([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 3, unbiased std sqrt((4+1+0+9)/3) = 2.1602468995; A = (r-3)/(std + 1e-4)
    # group 2: all equal -> 0
    adv = rm.group_advantages(r, 4)
    close(adv, [-0.9257772446, -0.4628886223, 0.0, 1.3886658669, 0, 0, 0, 0], atol=1e-6)
    close(rm.group_advantages(r, 4, scale=False), [-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0], atol=1e-6)
    with pytest.raises(ConfigError):
        rm.group_advantages(r, 3)


def test_rloo_leave_one_out():
    r = t([1.0, 2.0, 3.0, 6.0, 0.0, 4.0])
    # group of 4: baselines 11/3, 10/3, 3, 2 -> -8/3, -4/3, 0, 4
    adv = rm.rloo_advantages(r[:4], 4)
    close(adv, [-8 / 3, -4 / 3, 0.0, 4.0], atol=1e-6)
    # k = 2: pairs (1,2), (3,6), (0,4): r_i - r_other
    close(rm.rloo_advantages(r, 2), [-1.0, 1.0, -3.0, 3.0, -4.0, 4.0], atol=1e-6)
    with pytest.raises(ConfigError):
        rm.rloo_advantages(r, 1)
    assert math.isclose(float(rm.rloo_advantages(r[:4], 4).sum()), 0.0, abs_tol=1e-6)


# ---------------------------------------------------------------- DPO
def test_dpo_loss_by_hand():
    from factedge.train.rl.maths import anchor_loss, dpo_loss

    chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -2.0])
    ref = torch.tensor([-2.0, -2.0])
    t = dpo_loss(chosen, rejected, ref, ref, beta=0.5)
    # pair 0: 0.5·(−1+2) − 0.5·(−3+2) = 1 → −log σ(1) = 0.31326; pair 1: 0.5·(−2) − 0 = −1 → 1.31326
    assert t.loss.tolist() == pytest.approx([0.313262, 1.313262], abs=1e-5)
    assert t.chosen_reward.tolist() == pytest.approx([0.5, -1.0])
    assert t.rejected_reward.tolist() == pytest.approx([-0.5, 0.0])
    assert t.accuracy.tolist() == [1.0, 0.0]
    t.loss.sum().backward()
    assert (chosen.grad < 0).all()  # lowering the loss raises the chosen side's log-prob
    # conservative DPO: (1 − ε)·(−log σ(x)) + ε·(−log σ(−x)), x = 1
    smooth = dpo_loss(chosen.detach(), rejected, ref, ref, beta=0.5, label_smoothing=0.1)
    assert float(smooth.loss[0]) == pytest.approx(0.9 * 0.313262 + 0.1 * 1.313262, abs=1e-5)
    # mDPO's anchor on pair 0: −log σ(0.5·(−1+2)) = −log σ(0.5) = 0.474077
    assert float(anchor_loss(chosen.detach(), ref, beta=0.5)[0]) == pytest.approx(0.474077, abs=1e-5)
    with pytest.raises(ConfigError):
        dpo_loss(chosen, rejected, ref, ref, beta=0.0)
    with pytest.raises(ConfigError):
        dpo_loss(chosen, rejected, ref, ref, label_smoothing=0.5)
