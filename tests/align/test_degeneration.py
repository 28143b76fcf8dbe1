"""The gate's degeneration check (align/degeneration.py): loops, repeated words and answer
length of the candidate's answers against the current version's on the same prompts."""
from __future__ import annotations

from prefloop.align.degeneration import Degeneration, answer_stats, degeneration_check

FINE = "The cat sat on the warm mat and looked at the garden for a while."
LOOP = "They're so good. They're so good. They're so good. They're so good."


def test_answer_stats():
    fine, loop = answer_stats(FINE), answer_stats(LOOP)
    assert not fine.loops and fine.words == 15 and fine.distinct_ratio == 13 / 15
    assert loop.loops and loop.words == 12 and loop.distinct_ratio == 3 / 12
    assert answer_stats("").distinct_ratio == 1.0 and not answer_stats("").loops


def test_a_candidate_that_loops_where_the_current_does_not_is_rejected_with_its_numbers():
    d = Degeneration.of([LOOP] * 8 + [FINE] * 2, [FINE] * 10)
    assert (d.candidate_loops, d.current_loops, d.only_candidate_loops) == (8, 0, 8)
    check = degeneration_check(d)
    assert check.passed is False and check.name == "degeneration"
    assert "loops 8 vs current 0" in check.text and "loops in more prompts (p 0.004" in check.text
    assert "distinct-word ratio dropped by" in check.text


def test_the_same_answers_or_a_modest_change_pass():
    assert degeneration_check(Degeneration.of([FINE] * 10, [FINE] * 10)).passed
    shorter = "The cat sat on the mat."
    assert degeneration_check(Degeneration.of([shorter] * 10, [FINE] * 10)).passed  # 0.4x
    one_loop = Degeneration.of([LOOP] + [FINE] * 9, [FINE] * 10)  # p 0.5: not measurably more
    assert degeneration_check(one_loop).passed


def test_collapsed_or_runaway_length_is_rejected():
    collapsed = degeneration_check(Degeneration.of(["Yes."] * 10, [FINE] * 10))
    assert not collapsed.passed and "mean length 0.07x" in collapsed.text
    runaway = degeneration_check(Degeneration.of([" ".join([FINE] * 5)] * 10, [FINE] * 10))
    assert not runaway.passed and "outside [1/4, 4]" in runaway.text


def test_a_longer_natural_answer_keeps_its_distinct_ratio():
    long = ("The cat sat on the warm mat and looked at the garden for a while, then it "
            "walked to the kitchen where the dog was sleeping near the door, and the two of "
            "them waited there until the evening came and the lights went on in the house.")
    assert answer_stats(long).distinct_ratio > 0.75  # the first 32 words only
    assert degeneration_check(Degeneration.of([long] * 10, [FINE] * 10)).passed  # 3.2x longer
