"""Sampling functions against closed-form expectations on small hand-made logits."""
import math

import torch

from prefloop.server.engine.sampler import apply_repetition_penalty, apply_top_k, apply_top_p, sample_row


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [True, False, False, False]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_temperature_sampling_frequencies_match_softmax():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75] at temperature 1
    g = torch.Generator().manual_seed(0)
    draws = [sample_row(logits, 1.0, 0, 1.0, g) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.75) < 0.03
    # temperature 0.5 squares the odds: p1 = 9 / 10
    draws = [sample_row(logits, 0.5, 0, 1.0, g) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.9) < 0.02


def test_seeded_generators_reproduce():
    logits = torch.randn(100)
    a = [sample_row(logits, 1.0, 0, 0.9, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1
