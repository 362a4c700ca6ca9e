"""Soft-label losses: hand-computed values, hard-label limit at p = 1, direction below it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.training.losses import (
    margin_from_soft_label,
    soft_bradley_terry_loss,
    soft_dpo_loss,
)

DELTAS = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_soft_bradley_terry_by_hand():
    # Δ = 1, p = 0.8: −[0.8·logσ(1) + 0.2·logσ(−1)]
    expected = -(0.8 * log_sigmoid(1.0) + 0.2 * log_sigmoid(-1.0))
    got = soft_bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.8]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5132616875, rel=1e-6)
    # p = 0.5 is indifferent to the sign of Δ
    half = soft_bradley_terry_loss(DELTAS, torch.zeros(5), 0.5)
    assert torch.allclose(half, half.flip(0))


def test_soft_equals_hard_at_p_one():
    soft = soft_bradley_terry_loss(DELTAS, torch.zeros(5), torch.ones(5))
    assert torch.allclose(soft, -F.logsigmoid(DELTAS))


def test_soft_differs_in_the_right_direction():
    hard = soft_bradley_terry_loss(DELTAS, torch.zeros(5), 1.0)
    soft = soft_bradley_terry_loss(DELTAS, torch.zeros(5), 0.7)
    confident_right, wrong_way = DELTAS > 0, DELTAS < 0
    assert (soft[confident_right] > hard[confident_right]).all()  # pays for over-confidence
    assert (soft[wrong_way] < hard[wrong_way]).all()  # forgives a pair the judge doubted
    # the minimum sits at Δ = logit(p), not at Δ → ∞
    delta = torch.tensor(math.log(0.7 / 0.3), requires_grad=True)
    soft_bradley_terry_loss(delta, torch.tensor(0.0), 0.7).backward()
    assert delta.grad.abs().item() < 1e-6


def test_margin_is_zero_at_half_and_increasing():
    p = torch.linspace(0.5, 1.0, 11)
    margin = margin_from_soft_label(p, scale=2.0)
    assert margin[0].item() == 0.0 and margin[-1].item() == pytest.approx(2.0)
    assert (margin.diff() > 0).all()
    assert margin_from_soft_label(0.75, scale=1.0).item() == pytest.approx(0.5)


def test_soft_dpo_at_p_one_is_trl_sigmoid():
    beta = 0.1
    policy_c, policy_r = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    ref_c, ref_r = torch.tensor([-10.5, -11.0]), torch.tensor([-10.5, -10.0])
    # TRL 1.16 `sigmoid`: −logσ(β·((π_c − ref_c) − (π_r − ref_r)))
    trl_sigmoid = -F.logsigmoid(beta * ((policy_c - ref_c) - (policy_r - ref_r)))
    got = soft_dpo_loss(policy_c, policy_r, ref_c, ref_r, torch.ones(2), beta)
    assert torch.allclose(got, trl_sigmoid)
    # x = β·(0.5 − (−0.5)) = 0.1 for the first pair
    assert got[0].item() == pytest.approx(-log_sigmoid(0.1), rel=1e-6)


def test_soft_dpo_below_one_is_soft_bce_on_the_implicit_margin():
    beta = 0.5
    policy_c, policy_r = torch.tensor([-4.0, -9.0]), torch.tensor([-8.0, -5.0])
    ref = torch.tensor([-6.0, -6.0])
    p = torch.tensor([0.9, 0.9])
    got = soft_dpo_loss(policy_c, policy_r, ref, ref, p, beta)
    hard = soft_dpo_loss(policy_c, policy_r, ref, ref, 1.0, beta)
    x = beta * (policy_c - policy_r)  # [2, −2]
    assert torch.allclose(got, -(p * F.logsigmoid(x) + (1 - p) * F.logsigmoid(-x)))
    assert got[0] > hard[0] and got[1] < hard[1]
