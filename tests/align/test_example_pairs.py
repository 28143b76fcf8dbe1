"""The gate's pairs for rated answers (thumbs, stars, the two sides of picks): same-prompt pairs
first, the leftovers matched across prompts, and the level of the real decision on them when
the thumbs carry nothing the candidate learned — with mostly thumbs down, as on a chat page."""
from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest
import torch

from prefloop.align import data, evaluate, gate, rating_test
from prefloop.server.feedback.rows import RatedAnswer

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rated(prompt: str, text: str, label: bool, i: int) -> RatedAnswer:
    return RatedAnswer(prompt=[{"role": "user", "content": prompt}],
                       completion=[{"role": "assistant", "content": text}], label=label,
                       feedback_id=f"f{i}", created_at=T0 + dt.timedelta(seconds=i))


def test_same_prompt_pairs_come_first_and_leftovers_are_matched_once_across_prompts():
    examples = [rated("p0", "good", True, 0), rated("p0", "bad", False, 1),  # a pick's two sides
                rated("p0", "good", False, 2),  # same text as a desirable one: no pair with it
                *(rated(f"q{i}", f"a{i}", i % 3 == 0, 3 + i) for i in range(12))]  # lone thumbs
    pairs, same = data.example_pairs(examples)
    assert same == 1 and pairs[0] == (0, 1)
    cross = pairs[same:]
    ups = [i for i, e in enumerate(examples) if e.label and i != 0]
    downs = [i for i, e in enumerate(examples) if not e.label and i != 1]
    assert len(cross) == min(len(ups), len(downs)) == 4
    assert all(examples[g].label and not examples[b].label for g, b in cross)
    used = [i for pair in cross for i in pair]
    assert len(used) == len(set(used)) and not {0, 1} & set(used)
    assert data.example_pairs(examples) == (pairs, same)  # seeded: the same every time
    assert data.example_pairs(examples, seed=1)[0] != pairs


@pytest.mark.parametrize("answers,min_heldout", [(160, 10), (60, 20)])
def test_random_thumbs_do_not_pass_the_gate_when_the_candidate_lowers_every_answer(
        monkeypatch, answers, min_heldout):
    """A candidate trained on mostly-down random thumbs lowers the log-prob of every answer. Signed
    by each answer's own label that is a "win" on every thumb down (the rule this replaced); as
    paired differences of matched up/down answers, and in the randomization test over every
    answer, it is noise, and the real decision passes at most its 5 % level. 60 answers at the
    default minimum: about 15 up make 15 pairs and weigh as 22.5 (`gate.enough_rated`), so most
    of these decisions are taken on fewer matched pairs than the minimum."""
    monkeypatch.setattr(rating_test, "DRAWS", 1000)  # any number of draws keeps the level
    config = gate.GateConfig(min_heldout=min_heldout)
    passed = label_signed_wins = judged_on_weight = 0
    seasons = 300
    for seed in range(seasons):
        rng = random.Random(seed)
        examples = [rated(f"q{i}", f"a{i}", rng.random() < 0.25, i) for i in range(answers)]
        moves = torch.tensor([-0.5 - abs(rng.gauss(0, 1)) for _ in examples], dtype=torch.float64)
        current = evaluate.Scores(torch.full((answers,), -50.0, dtype=torch.float64),
                                  torch.full((answers,), 40.0, dtype=torch.float64))
        candidate = evaluate.Scores(current.logps + moves, current.tokens)
        pairs, _ = data.example_pairs(examples, seed=seed)
        out = evaluate.indexed_pair_outcomes(candidate, current, pairs, beta=0.1)
        decision = gate.decide(implicit=out["implicit"], accuracy=out["accuracy"],
                               candidate_accuracy=None, current_accuracy=None,
                               current_version="v0000", kl_per_token=0.01,
                               heldout_pairs=len(pairs), config=config, margins=out["margins"],
                               ratings=((moves / 40).tolist(), [e.label for e in examples],
                                        [e.prompt[0]["content"] for e in examples]))
        passed += decision.passed
        judged_on_weight += len(pairs) < min_heldout and decision.checks[0].passed
        signed = [m if e.label else -m for m, e in zip(moves.tolist(), examples)]
        label_signed_wins += sum(s > 0 for s in signed) > 0.6 * len(signed)
    assert passed <= 0.05 * seasons + 2 * (0.05 * 0.95 * seasons) ** 0.5  # 5 % + 2 s.e.
    assert label_signed_wins > 0.9 * seasons  # what the old rule would have counted as evidence
    if answers == 60:
        assert judged_on_weight > 0.5 * seasons


def test_randomization_p_values_match_exact_counts():
    # four answers alone in their prompts, one liked: the chance that the like falls on the
    # answer that moved most is 1/4
    p = rating_test.permutation_p([3.0, 1.0, 0.0, -1.0], [True, False, False, False], list("abcd"))
    assert abs(p - 0.25) < 0.015
    # a pick's two answers only swap: the liked one moved more in half of the arrangements
    assert abs(rating_test.permutation_p([1.0, -1.0], [True, False], ["q", "q"]) - 0.5) < 0.015
    # labels shuffle within a prompt, not across: prompt q's pair (up moved more) cannot borrow
    # prompt r's, so only q's swap and the lone answers' shuffle count
    moves = [5.0, 4.0, -3.0, -4.0, 0.5, 0.1]
    labels = [True, False, True, False, True, False]
    groups = ["q", "q", "r", "r", "s", "t"]
    def auc(lab):  # share of (liked, disliked) pairs whose liked answer moved more
        ups = [m for m, x in zip(moves, lab) if x]
        downs = [m for m, x in zip(moves, lab) if not x]
        return sum((u > d) + 0.5 * (u == d) for u in ups for d in downs) / (len(ups) * len(downs))
    exact = 0.0
    for q in (0, 1):  # q, r and the lone pair s / t each as labelled (1) or swapped (0)
        for r in (0, 1):
            for t in (0, 1):
                exact += auc([bool(q), not q, bool(r), not r, bool(t), not t]) >= auc(labels) - 1e-9
    exact /= 8
    assert abs(rating_test.permutation_p(moves, labels, groups) - exact) < 0.015
    assert rating_test.permutation_p([1.0, 2.0], [True, True], ["a", "b"]) == 1.0  # one label


def test_the_randomization_test_sees_many_small_moves_that_a_few_large_ones_would_hide():
    """Liked answers move up a little more, consistently; three disliked answers of one prompt
    moved far up. A mean difference is swamped; the AUC of the ranks is not."""
    rng = random.Random(0)
    labels = [rng.random() < 0.3 for _ in range(60)] + [False] * 3
    moves = [(0.01 if lab else -0.01) + rng.gauss(0, 0.005) for lab in labels[:60]] + [5.0] * 3
    test = rating_test.PermutationTest.of(moves, labels, [f"q{i}" for i in range(60)] + ["z"] * 3,
                                          0.95)
    ups = [m for m, x in zip(moves, labels) if x]
    downs = [m for m, x in zip(moves, labels) if not x]
    assert sum(ups) / len(ups) < sum(downs) / len(downs)  # the mean says "worse"
    assert test.passed and test.p_value < 0.001 and 0.5 < test.lower <= test.mean <= test.upper
    margin = test.result()  # as a margin: the AUC minus 1/2
    assert margin.mean == test.mean - 0.5 and margin.lower > 0
    assert "every held-out answer (" in test.describe("", "pairs")


def test_ranks_share_ties():
    assert rating_test._ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def _tiny_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def test_centered_moves_average_zero_over_the_current_versions_answers_where_raw_moves_do_not():
    """Exact oracle: over EVERY 3-token answer (6^3 of them) weighted by the current version's
    probability of it, the centered move sums to 0 (each token's term has mean 0 given its
    prefix), while the raw log-ratio sums to minus the sequence KL(current ‖ candidate) < 0."""
    import itertools
    from types import SimpleNamespace
    candidate, current = _tiny_lm(1), _tiny_lm(2)
    items = [evaluate.Encoded([1, 2], list(y)) for y in itertools.product(range(6), repeat=3)]
    scores = evaluate.score_encoded(candidate, SimpleNamespace(pad_token_id=0), items,
                                    reference=current, batch_size=64, back_kl=True)
    weights = scores.ref_logps.exp()
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    centered = torch.tensor(evaluate.centered_moves(scores), dtype=torch.float64)
    raw = scores.logps - scores.ref_logps
    assert float((weights * centered).sum()) == pytest.approx(0.0, abs=1e-6)
    sequence_kl = float((weights * -raw).sum())
    assert sequence_kl > 0.005  # 0.011 for these two random models
    # the back KL is KL(current ‖ candidate) token by token: its mean over current's answers is
    # the same sequence KL
    assert float((weights * scores.back_kl_sum).sum()) == pytest.approx(sequence_kl, rel=1e-4)


def _designs():
    """(labels, prompts) of held-out answers: lone thumbs; lone thumbs with picks (one up, one
    down per prompt) and prompts whose three answers were all disliked (never reshuffled)."""
    lone = ([True] * 19 + [False] * 41, [f"q{i}" for i in range(60)])
    labels = [True] * 15 + [False] * 30 + [True, False] * 10 + [False] * 15
    prompts = ([f"q{i}" for i in range(45)] + [f"pick{i // 2}" for i in range(20)]
               + [f"down{i // 3}" for i in range(15)])
    return {"lone": lone, "mixed": (labels, prompts)}


@pytest.mark.parametrize("design", ["lone", "mixed"])
def test_balanced_pairs_match_the_auc_variance_under_the_tests_own_shuffles(design):
    """The oracle: the AUC's variance over label arrangements shuffled as the test shuffles them
    (within each prompt of several answers, and across the lone answers), averaged over random
    moves, against (2n + 1) / (12n²), the Mann-Whitney variance of n liked and n disliked lone
    answers, for n = balanced_pairs."""
    labels, prompts = _designs()[design]
    n = rating_test.balanced_pairs(labels, prompts)
    lab = np.array(labels)
    up, down = int(lab.sum()), int((~lab).sum())
    counts = {p: prompts.count(p) for p in prompts}
    blocks = [[i for i, p in enumerate(prompts) if counts[p] == 1]]
    blocks += [[i for i, p in enumerate(prompts) if p == q] for q in counts if counts[q] > 1]
    rng = np.random.default_rng(0)
    variances = []
    for _ in range(100):
        ranks = np.argsort(np.argsort(rng.normal(size=lab.size))) + 1.0
        arranged = np.tile(lab, (300, 1))
        for b in blocks:
            arranged[:, b] = rng.permuted(arranged[:, b], axis=1)
        auc = ((arranged * ranks).sum(1) - up * (up + 1) / 2) / (up * down)
        variances.append(auc.var())
    assert (2 * n + 1) / (12 * n * n) == pytest.approx(np.mean(variances), rel=0.05)
    if design == "lone":  # about the harmonic mean of the two counts
        assert n == pytest.approx(2 * 19 * 41 / 60, rel=0.01)


def test_balanced_pairs_are_zero_when_no_arrangement_can_differ():
    assert rating_test.balanced_pairs([False] * 9, list("abcdefghi")) == 0.0
    assert rating_test.balanced_pairs([True, True, False, False], ["a", "a", "b", "b"]) == 0.0


def _kto_decision(up: int, down: int, metric: str = "implicit_either", wins: int | None = None,
                  min_improvement: float = 0.0):
    """The KTO gate on `up` liked and `down` disliked lone answers (moves unrelated to labels),
    whose `up` matched pairs the candidate won `wins` of (default: half)."""
    labels = [True] * up + [False] * down
    moves = list(np.random.default_rng(0).normal(size=len(labels)))
    wins = up // 2 if wins is None else wins
    return gate.decide(implicit=gate.Paired(wins, up - wins), accuracy=None,
                       candidate_accuracy=None, current_accuracy=None, current_version="v0000",
                       kl_per_token=0.01, heldout_pairs=up,
                       config=gate.GateConfig(metric=metric, min_improvement=min_improvement),
                       ratings=(moves, labels, [f"q{i}" for i in range(len(labels))]))


def test_lone_thumbs_mostly_down_meet_the_minimum_as_the_balanced_pairs_the_rating_test_weighs():
    # 19 up and 41 down match into 19 pairs; the rating test ranks all 60, as precise as 26
    check = next(c for c in _kto_decision(19, 41).checks if c.name == gate.CHECK_HELDOUT)
    assert check.passed and check.text == ("19 held-out pairs; the rating test's 60 answers (19 "
                                           "up, 41 down) weigh as 26.0 balanced pairs (>= 20)")
    few = next(c for c in _kto_decision(8, 52).checks if c.name == gate.CHECK_HELDOUT)
    assert few.passed is False and few.text.startswith(
        "needs >= 20 held-out pairs, have 8; the rating test's 60 answers (8 up, 52 down) weigh "
        "as 14.1 balanced pairs: collect more votes")
    # where the sign test alone can pass (its metric, or a win-rate bar the rating test has
    # not), the pairs are what it has
    for decision in (_kto_decision(19, 41, "implicit_reward"),
                     _kto_decision(19, 41, min_improvement=0.05)):
        signs = next(c for c in decision.checks if c.name == gate.CHECK_HELDOUT)
        assert signs.passed is False and signs.text.startswith("needs >= 20 held-out pairs, have 19")


def test_a_minimum_met_by_the_answers_weight_lets_only_the_rating_test_pass():
    # 19 of 19 matched pairs won: the sign test alone would pass, on fewer pairs than the minimum
    decision = _kto_decision(19, 41, wins=19)
    assert decision.checks[0].passed and not decision.passed
    assert "(fewer pairs than the minimum: reported, it cannot pass the candidate)" in \
        " ".join(decision.reasons)
    assert _kto_decision(20, 40, wins=20).passed  # at the minimum the sign test counts again


def test_a_kto_job_of_lone_thumbs_trains_when_its_answers_weigh_enough_and_says_what_is_missing(
        tmp_path):
    from prefloop.align.jobs import runner
    from prefloop.align.jobs.preference import JobConfig, _too_few_to_judge
    from prefloop.align.train.preference import TrainConfig
    cfg = JobConfig(data_dir=tmp_path, train=TrainConfig(method="kto"), keep_rejected=False)

    def split(up, down):
        held = [rated(f"q{i}", f"a{i}", i < up, 1000 + i) for i in range(up + down)]
        return data.Split([rated("t", "x", True, 0)] * 240, held, None)
    result = runner.JobResult(job_id="j", status="running")
    assert not _too_few_to_judge(cfg, split(19, 41), result)  # 19 pairs, weighs 26: it trains
    assert _too_few_to_judge(cfg, split(8, 52), result) and result.status == runner.SKIPPED
    assert ("the window's 60 held-out answers (8 up, 52 down) make 8 and the rating test weighs "
            "them as 14.1: more feedback (the rarer of up and down counts most") in result.reason
    weigh_not = JobConfig(data_dir=tmp_path, train=TrainConfig(method="kto"), keep_rejected=False,
                          gate=gate.GateConfig(min_improvement=0.05))  # the sign test decides
    assert _too_few_to_judge(weigh_not, split(19, 41), result)


def test_a_dpo_job_too_small_for_the_gate_is_skipped_by_its_pairs(tmp_path):
    from prefloop.align.jobs import runner
    from prefloop.align.jobs.preference import JobConfig, _too_few_to_judge
    from prefloop.server.feedback.rows import PreferencePair

    def pair(i):
        return PreferencePair(prompt=[{"role": "user", "content": f"q{i}"}],
                              chosen=[{"role": "assistant", "content": "a"}],
                              rejected=[{"role": "assistant", "content": "b"}],
                              feedback_id=f"f{i}", created_at=T0 + dt.timedelta(seconds=i))
    cfg = JobConfig(data_dir=tmp_path, keep_rejected=False)  # train: dpo
    result = runner.JobResult(job_id="j", status="running")
    assert _too_few_to_judge(cfg, data.Split([pair(0)] * 60, [pair(i) for i in range(19)], None),
                             result)
    assert "the gate needs >= 20 held-out pairs and this window holds 19" in result.reason
    assert not _too_few_to_judge(cfg, data.Split([], [pair(i) for i in range(20)], None), result)
