"""PPO loss pieces against values worked out by hand (closed form), on tiny tensors.

Every expected number below is written out from the formulas in the docstrings of
align/ppo_losses.py, not produced by the code under test. Padded entries hold absurd values (99,
nan-free) so any leak of padding into a result changes it.
"""
from __future__ import annotations

import math

import pytest
import torch

from prefloop.align import ppo_losses as L

PAD = 99.0


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- KL estimators -------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    # token 1: pi = 0.5, ref = 0.25 -> r = ref/pi = 0.5; token 2: pi = 0.2, ref = 0.4 -> r = 2
    logps = t([[math.log(0.5), math.log(0.2)]])
    ref = t([[math.log(0.25), math.log(0.4)]])
    k1 = L.kl_per_token(logps, ref, "k1")
    k3 = L.kl_per_token(logps, ref, "k3")
    assert k1.tolist()[0] == pytest.approx([math.log(2), -math.log(2)], abs=1e-12)
    # k3 = (r - 1) - log r
    assert k3.tolist()[0] == pytest.approx([-0.5 + math.log(2), 1.0 - math.log(2)], abs=1e-12)
    assert (k3 >= 0).all()


def test_kl_estimators_are_unbiased_in_expectation():
    # E_{a~p}[k(a)] over a 3-token vocabulary equals KL(p || q) = sum p log(p/q) for k1 and k3
    p = [0.5, 0.3, 0.2]
    q = [0.2, 0.2, 0.6]
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logps = t([[math.log(x) for x in p]])
    ref = t([[math.log(x) for x in q]])
    weights = t([p])
    for est in ("k1", "k3"):
        expectation = float((L.kl_per_token(logps, ref, est) * weights).sum())
        assert expectation == pytest.approx(exact, abs=1e-12), est
    assert exact == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(1.5)
                                  + 0.2 * math.log(1 / 3), abs=1e-12)


def test_unknown_kl_estimator():
    with pytest.raises(ValueError):
        L.kl_per_token(t([[0.0]]), t([[0.0]]), "k2")


# ---- per-token reward ----------------------------------------------------------------------------

def test_per_token_rewards_kl_penalty_everywhere_score_at_last_token():
    # log pi - log ref per token; row 1 has 2 real tokens and one pad
    diff = t([[0.5, -0.2, 1.0], [0.3, 0.4, PAD]])
    ref = torch.zeros_like(diff)
    mask = t([[1, 1, 1], [1, 1, 0]])
    scores = t([2.0, -1.0])
    rewards, kl = L.per_token_rewards(scores, diff, ref, mask, beta=0.1, estimator="k1")
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.02, -0.1 + 2.0], abs=1e-12)
    assert rewards.tolist()[1] == pytest.approx([-0.03, -0.04 - 1.0, 0.0], abs=1e-12)
    assert kl.tolist()[1] == pytest.approx([0.3, 0.4, 0.0], abs=1e-12)  # pad masked out


def test_per_token_rewards_with_k3():
    logps = t([[math.log(0.5)]])
    ref = t([[math.log(0.25)]])
    rewards, kl = L.per_token_rewards(t([1.0]), logps, ref, t([[1]]), beta=0.5, estimator="k3")
    k3 = -0.5 + math.log(2)
    assert kl.item() == pytest.approx(k3, abs=1e-12)
    assert rewards.item() == pytest.approx(1.0 - 0.5 * k3, abs=1e-12)


# ---- GAE -----------------------------------------------------------------------------------------

def test_gae_recursion_by_hand():
    rewards = t([[0.0, 0.0, 1.0, PAD], [2.0, PAD, PAD, PAD]])
    values = t([[0.5, 0.2, 0.4, PAD], [0.5, PAD, PAD, PAD]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, right to left (gamma*lam = 0.72):
    # d2 = 1 - 0.4 = 0.6                A2 = 0.6
    # d1 = 0.9*0.4 - 0.2 = 0.16         A1 = 0.16 + 0.72*0.6 = 0.592
    # d0 = 0.9*0.2 - 0.5 = -0.32        A0 = -0.32 + 0.72*0.592 = 0.10624
    assert adv.tolist()[0] == pytest.approx([0.10624, 0.592, 0.6, 0.0], abs=1e-12)
    assert ret.tolist()[0] == pytest.approx([0.60624, 0.792, 1.0, 0.0], abs=1e-12)
    # row 1: one token, nothing after it: A0 = 2 - 0.5
    assert adv.tolist()[1] == pytest.approx([1.5, 0, 0, 0], abs=1e-12)
    assert ret.tolist()[1] == pytest.approx([2.0, 0, 0, 0], abs=1e-12)


def test_gae_with_gamma_lambda_one_is_monte_carlo():
    rewards = t([[0.1, -0.2, 1.0]])
    values = t([[0.5, 0.2, 0.4]])
    adv, ret = L.gae(rewards, values, t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    # returns = reward-to-go: 0.9, 0.8, 1.0
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0], abs=1e-12)
    assert adv.tolist()[0] == pytest.approx([0.4, 0.6, 0.6], abs=1e-12)


def test_gae_lambda_zero_is_one_step_td():
    rewards = t([[0.1, -0.2, 1.0]])
    values = t([[0.5, 0.2, 0.4]])
    adv, _ = L.gae(rewards, values, t([[1, 1, 1]]), gamma=0.5, lam=0.0)
    # delta_t = r_t + 0.5 V_{t+1} - V_t
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.1 - 0.5, -0.2 + 0.2 - 0.2, 1.0 - 0.4],
                                            abs=1e-12)


# ---- whitening -----------------------------------------------------------------------------------

def test_masked_whiten_by_hand():
    values = t([[1.0, 2.0, 3.0], [4.0, PAD, PAD]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # real entries 1, 2, 3, 4: mean 2.5, unbiased variance (2.25+0.25+0.25+2.25)/3 = 5/3
    sd = math.sqrt(5 / 3)
    out = L.masked_whiten(values, mask)
    assert out.tolist()[0] == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd], abs=1e-6)
    assert out.tolist()[1] == pytest.approx([1.5 / sd, 0.0, 0.0], abs=1e-6)
    kept = L.masked_whiten(values, mask, shift_mean=False)
    assert kept.tolist()[0][0] == pytest.approx(-1.5 / sd + 2.5, abs=1e-6)
    assert L.masked_mean(values, mask).item() == pytest.approx(2.5)
    assert L.masked_var(values, mask, unbiased=False).item() == pytest.approx(1.25)


# ---- clipped surrogate ---------------------------------------------------------------------------

def _policy_case():
    ratios = [1.5, 0.5, 1.1, 0.5, 7.0]  # the last entry is padding
    advantages = t([[1.0, -1.0, 2.0, 1.0, PAD]])
    old = t([[0.1, -0.3, 0.2, 0.0, 0.0]])
    logps = (old + t([[math.log(r) for r in ratios]])).requires_grad_(True)
    mask = t([[1, 1, 1, 1, 0]])
    return logps, old, advantages, mask


def test_policy_loss_clip_active_and_inactive():
    logps, old, adv, mask = _policy_case()
    loss, metrics = L.policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # token: ratio, A -> max(-A r, -A clip(r))
    # 1: 1.5,  1 -> max(-1.5, -1.2) = -1.2   (clipped: ratio above 1+eps with A > 0)
    # 2: 0.5, -1 -> max( 0.5,  0.8) =  0.8   (clipped: ratio below 1-eps with A < 0)
    # 3: 1.1,  2 -> max(-2.2, -2.2) = -2.2   (inside the clip range)
    # 4: 0.5,  1 -> max(-0.5, -0.8) = -0.5   (outside the range but the pessimistic bound
    #                                          keeps the unclipped term: not clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4, abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 0.5)) / 4
    assert metrics["approx_kl"] == pytest.approx(expected_kl, abs=1e-12)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5) / 4, abs=1e-12)
    loss.backward()
    # d/dlogp of -A r / 4 is -A r / 4 where unclipped, 0 where clipped and at the pad
    assert logps.grad.tolist()[0] == pytest.approx([0.0, 0.0, -2.2 / 4, -0.5 / 4, 0.0], abs=1e-12)


def test_policy_loss_ignores_padding():
    logps, old, adv, mask = _policy_case()
    short, _ = L.policy_loss(logps[:, :4], old[:, :4], adv[:, :4], mask[:, :4])
    padded, _ = L.policy_loss(logps, old, adv, mask)
    assert padded.item() == pytest.approx(short.item(), abs=1e-12)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = t([[0.3, -0.1], [2.0, PAD]])
    mask = t([[1, 1], [1, 0]])
    logps = torch.zeros(2, 2, dtype=torch.float64)
    loss, m = L.policy_loss(logps, logps, adv, mask)
    assert loss.item() == pytest.approx(-(0.3 - 0.1 + 2.0) / 3, abs=1e-12)
    assert m["clip_fraction"] == 0.0


# ---- clipped value loss --------------------------------------------------------------------------

def test_value_loss_clip_active_and_inactive():
    values = t([[0.5, 0.1, -0.3, 0.5, PAD]]).requires_grad_(True)
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 1.0, -1.0, 0.3, PAD]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, metrics = L.value_loss(values, old, returns, mask, clip_range=0.2)
    # token: V, V_clip, R -> max((V-R)^2, (V_clip-R)^2)
    # 1:  0.5,  0.2,  1.0 -> max(0.25, 0.64) = 0.64  (clipped term larger)
    # 2:  0.1,  0.1,  1.0 -> 0.81                    (inside the range)
    # 3: -0.3, -0.2, -1.0 -> max(0.49, 0.64) = 0.64  (clipped term larger)
    # 4:  0.5,  0.2,  0.3 -> max(0.04, 0.01) = 0.04  (unclipped term larger)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.64 + 0.04) / 4, abs=1e-12)
    assert metrics["value_clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # gradient: 0 where the clipped term wins (its V_clip is constant in V), (V-R)/4 elsewhere
    assert values.grad.tolist()[0] == pytest.approx([0.0, (0.1 - 1.0) / 4, 0.0, (0.5 - 0.3) / 4,
                                                     0.0], abs=1e-12)


# ---- entropy and log-probs -----------------------------------------------------------------------

def test_token_logps_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0],
                            [math.log(0.5), math.log(0.25), math.log(0.25), -1e9]]])
    tokens = torch.tensor([[2, 1]])
    logps, entropy = L.token_logps_and_entropy(logits, tokens)
    assert logps.tolist()[0] == pytest.approx([-math.log(4), math.log(0.25)], abs=1e-6)
    assert entropy.tolist()[0] == pytest.approx([math.log(4), 1.5 * math.log(2)], abs=1e-6)


# ---- adaptive KL coefficient ---------------------------------------------------------------------

def test_adaptive_kl_coef_by_hand():
    # error clipped to +0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert L.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=100) == \
        pytest.approx(0.1002, abs=1e-15)
    # error -0.1: 0.1 * (1 - 0.1 * 100 / 10000)
    assert L.adaptive_kl_coef(0.1, kl=5.4, target=6.0, horizon=10000, n_steps=100) == \
        pytest.approx(0.0999, abs=1e-15)
    # on target: unchanged; far below: error clipped to -0.2
    assert L.adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=10, n_steps=5) == pytest.approx(0.1)
    assert L.adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=10, n_steps=5) == \
        pytest.approx(0.1 * (1 - 0.2 * 0.5))
