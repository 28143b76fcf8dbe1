"""Sampling functions against closed-form expectations on small hand-made logits."""
import math
from types import SimpleNamespace

import torch

from prefloop.server.engine.sampler import (
    apply_frequency_presence_penalties,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    request_generator,
    sample,
    sample_row,
)
from prefloop.server.engine.sampling_params import SamplingParams


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


def test_frequency_penalty_counts_occurrences_and_presence_counts_once():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = apply_frequency_presence_penalties(logits, [1, 1, 1, 2], frequency=0.5, presence=0.25)
    # token 1: 1 - 3 * 0.5 - 0.25; token 2: 1 - 0.5 - 0.25; tokens 0 and 3 never occurred
    assert out.tolist() == [1.0, -0.75, 0.25, 1.0]
    encouraged = apply_frequency_presence_penalties(logits, [3], frequency=0.0, presence=-1.0)
    assert encouraged.tolist() == [1.0, 1.0, 1.0, 2.0]
    assert apply_frequency_presence_penalties(logits, [], 1.0, 1.0) is logits


def test_frequency_penalty_counts_the_completion_not_the_prompt():
    """Greedy rows: token 0 leads by 1; the prompt repeats it (no effect, as in OpenAI's and
    vLLM's penalties), the completion's two occurrences at 0.6 each hand the lead to token 1."""
    logits = torch.tensor([[2.0, 1.0, 0.0]] * 3)

    def row(token_ids, prompt_len, frequency):
        return SimpleNamespace(params=SamplingParams(temperature=0, frequency_penalty=frequency),
                               generator=None, token_ids=token_ids, prompt_len=prompt_len)
    rows = [row([0, 0, 0, 0], 4, 0.6),  # all four in the prompt: not penalized
            row([0, 0, 0, 0], 2, 0.6),  # two in the completion: 2 - 1.2 < 1
            row([0, 0, 0, 0], 2, 0.0)]  # penalty off: plain argmax
    assert sample(logits, rows) == [0, 1, 0]


def test_temperature_sampling_frequencies_match_softmax():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75] at temperature 1
    g = torch.Generator().manual_seed(0)
    draws = [sample_row(logits, 1.0, 0, 1.0, g) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.75) < 0.03
    # temperature 0.5 squares the odds: p1 = 9 / 10
    draws = [sample_row(logits, 0.5, 0, 1.0, g) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.9) < 0.02


def _row(seed, index=0):
    """A sequence as `sample` sees it: its params and its own per-request generator."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    return SimpleNamespace(params=params, generator=request_generator(seed, index), token_ids=[],
                           prompt_len=0)


def test_same_seed_in_one_batch_gives_the_same_tokens_and_other_seeds_differ():
    rows = [_row(5), _row(5), _row(6), _row(5, index=1)]  # two requests seeded 5, one 6, a 2nd candidate
    logits = torch.zeros(len(rows), 1000)  # uniform: every draw depends on the generator only
    drawn = [sample(logits, rows) for _ in range(20)]  # 20 steps of one batch
    per_row = list(zip(*drawn))
    assert per_row[0] == per_row[1]  # same seed, same batch: same tokens
    assert per_row[0] != per_row[2]  # another seed: other tokens
    assert per_row[0] != per_row[3]  # the request's second candidate: seed + 1
    alone = _row(5)
    assert tuple(sample(logits[:1], [alone])[0] for _ in range(20)) == per_row[0]  # alone: the same


def test_unseeded_requests_get_independent_generators():
    logits = torch.zeros(2, 1000)
    rows = [_row(None), _row(None)]
    draws = list(zip(*[sample(logits, rows) for _ in range(20)]))
    assert draws[0] != draws[1]
