"""The midpoint test (align/train/midpoint.py, rating_test.CombinedTest): the plan splits the
training rows in time and scores the whole newer half; the checkpoint's scores do not depend on
how the newer half's labels fall; the joined p-value is Stouffer's and keeps its level when the
labels carry nothing."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from align_helpers import banana_pairs, tiny_policy

from prefloop.align.rating_test import CombinedTest, PermutationTest, stouffer_p
from prefloop.align.train.midpoint import MidpointScorer, plan
from prefloop.align.train.preference import TrainConfig, train
from prefloop.server.errors import InvalidArgument
from prefloop.server.feedback.rows import RatedAnswer

T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LOOP = "They're so good. They're so good. They're so good."


def pick_rows(n: int, loop_at: tuple[int, ...] = (),
              rejected_loop_at: tuple[int, ...] = ()) -> list[RatedAnswer]:
    """Both sides of n banana picks as rated answers, one timestamp per pick; the picks in
    `loop_at` have a looping chosen answer, those in `rejected_loop_at` a looping rejected one."""
    rows = []
    for i, p in enumerate(banana_pairs(n, seed=5)):
        at = T + dt.timedelta(minutes=i)
        chosen = LOOP if i in loop_at else p["chosen"]
        rejected = LOOP if i in rejected_loop_at else p["rejected"]
        for text, label in ((chosen, True), (rejected, False)):
            rows.append(RatedAnswer(p["prompt"], [{"role": "assistant", "content": text}], label,
                                    f"f{i}", at, source="preference"))
    return rows


def test_the_plan_splits_in_time_keeps_a_pick_together_and_scores_the_whole_newer_half():
    rows = pick_rows(11, loop_at=(1, 7))
    halves = plan(list(reversed(rows)), drop_looping=True, seed=0)
    assert max(r.created_at for r in halves.older) < min(r.created_at for r in halves.scored)
    # 22 rows: the half falls between the two answers of pick 5, which go newer together
    assert halves.older_rows == 10 and len(halves.scored) == 12
    assert not {r.feedback_id for r in halves.older} & {r.feedback_id for r in halves.scored}
    assert [r.created_at for r in halves.scored] == sorted(r.created_at for r in halves.scored)
    # the looping liked answers (picks 1 and 7) do not train, but the newer one is scored
    assert len(halves.older) == 9 and len(halves.newer) == 11
    assert all(r.text != LOOP for r in halves.rows)
    assert sum(r.text == LOOP for r in halves.scored) == 1
    assert halves.label_free == halves.older + halves.scored
    assert halves.trained_share == pytest.approx(10 / 22)
    assert plan(pick_rows(1), drop_looping=True) is None  # one timestamp: no newer half


def test_stouffer_joins_two_p_values_of_0_05_into_0_01_and_skips_a_weightless_part():
    # z(0.05) = 1.6449; two of them, equal weights: 2 * 1.6449 / sqrt(2) = 2.3262 = z(0.01)
    assert stouffer_p([0.05, 0.05], [1.0, 1.0]) == pytest.approx(0.0100, abs=2e-5)
    assert stouffer_p([0.05, 0.9], [1.0, 0.0]) == pytest.approx(0.05, abs=1e-9)
    # weights 3:4 -> (3 z1 + 4 z2) / 5
    z = (3 * 1.6449 + 4 * 1.2816) / 5
    assert stouffer_p([0.05, 0.10], [3.0, 4.0]) == pytest.approx(
        0.5 * math.erfc(z / math.sqrt(2)), abs=2e-4)
    assert stouffer_p([], []) == 1.0


def _joined(rng, effect: float, n_held: int = 30, n_mid: int = 60) -> CombinedTest:
    def part(n):
        labels = [bool(x) for x in rng.random(n) < 0.35]
        moves = (rng.standard_normal(n) + effect * np.asarray(labels)).tolist()
        groups = [str(i) for i in range(n)]
        return PermutationTest.of(moves, labels, groups, 0.9, draws=400), labels, groups
    from prefloop.align.rating_test import balanced_pairs
    (held, hl, hg), (mid, ml, mg) = part(n_held), part(n_mid)
    return CombinedTest.of(held, balanced_pairs(hl, hg), mid, balanced_pairs(ml, mg), 0.5)


def test_the_joined_test_keeps_its_level_when_the_labels_carry_nothing_and_gains_when_they_do():
    rng = np.random.default_rng(7)
    trials = 300
    null = [_joined(rng, 0.0) for _ in range(trials)]
    rate = sum(t.passed for t in null) / trials  # level 0.05
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials), rate
    moved = [_joined(rng, 0.6) for _ in range(trials // 3)]
    joined = sum(t.passed for t in moved)
    alone = sum(t.heldout.passed for t in moved)
    assert joined > alone + 5, (joined, alone)
    record = moved[0].result()
    assert record.p_value == moved[0].p_value and record.parts["midpoint_answers"] == 60
    assert record.parts["heldout_p_value"] == moved[0].heldout.p_value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tiny") / "model")


def _train_with_midpoint(tiny, rows: list[RatedAnswer]):
    halves = plan(rows, drop_looping=True, seed=0)
    cfg = TrainConfig(method="kto", lr=5e-2, batch_size=4, lora=True, lora_r=4, bf16=False,
                      stop_kl=10.0, unlikelihood=1.0)
    scorer = MidpointScorer(halves, cfg.batch_size, cfg.max_length)
    trained = train(tiny, [r.to_trl() for r in halves.rows], cfg, midpoint=scorer)
    return halves, trained


def test_the_checkpoint_scores_the_newer_half_the_same_however_its_labels_fall(tiny):
    # some rejected answers loop, in both halves: KTO's unlikelihood on disliked loops
    # (align/train/unlikelihood.py) reads labels too, and must not carry newer ones over
    rows = pick_rows(12, rejected_loop_at=(1, 4, 7, 10))
    newer_swapped = [RatedAnswer(r.prompt, r.completion, not r.label, r.feedback_id,
                                 r.created_at, source=r.source) if i >= 12 else r
                     for i, r in enumerate(rows)]  # each newer pick's sides swap labels
    halves, first = _train_with_midpoint(tiny, rows)
    _, second = _train_with_midpoint(tiny, newer_swapped)
    record = first.midpoint
    assert record.step == 3 and record.trained_rows == 12 and first.steps == 6
    assert any(h.get("unlikelihood", 0) > 0 for h in first.log_history)  # the term was on
    assert not record.candidate and halves.weight_share(record) == halves.trained_share == 0.5
    assert len(record.moves) == len(halves.scored) == 12 and record.kl_per_token > 0
    # the checkpoint had seen only the older half: the newer labels did not reach it ...
    np.testing.assert_allclose(second.midpoint.moves, record.moves, rtol=0, atol=1e-9)
    # ... and the rest of training did read them
    differ = [float((a - b).abs().max()) for a, b in
              zip(first.model.state_dict().values(), second.model.state_dict().values())]
    assert max(differ) > 1e-6


def test_a_dpo_run_refuses_the_midpoint_scorer(tiny):
    halves = plan(pick_rows(4), drop_looping=True)
    with pytest.raises(InvalidArgument, match="kto runs only"):
        train(tiny, [{"prompt": r.prompt, "chosen": r.completion, "rejected": r.completion}
                     for r in halves.rows[:2]], TrainConfig(method="dpo", bf16=False),
              midpoint=MidpointScorer(halves, 4, 1024))


def test_a_run_the_kl_stop_ends_before_the_midpoint_scores_the_newer_half_with_the_candidate(tiny):
    from prefloop.align import evaluate as ev
    from prefloop.align.train.common import load_causal_lm
    halves = plan(pick_rows(24), drop_looping=True, seed=0)
    cfg = TrainConfig(method="kto", lr=5e-2, batch_size=4, lora=True, lora_r=4, bf16=False,
                      stop_kl=1e-5)
    scorer = MidpointScorer(halves, cfg.batch_size, cfg.max_length)
    trained = train(tiny, [r.to_trl() for r in halves.rows], cfg, midpoint=scorer)
    record = trained.midpoint
    assert scorer.step == 6 and trained.steps == 4 == record.step and record.candidate
    assert halves.weight_share(record) == 1.0 and record.trained_rows == 16
    # the scores are the returned candidate's, against the base
    oracle = ev.score_examples(trained.model.float().eval(), trained.tokenizer, halves.scored,
                               reference=load_causal_lm(tiny))
    np.testing.assert_allclose(record.moves, (oracle.logps - oracle.ref_logps).tolist(),
                               rtol=1e-4, atol=1e-4)
