"""The gate's answer-shift test (align/answer_shift.py): the mean token-frequency shift of the
candidate's answers, each held-out answer's resemblance to it, and the randomization test's level
and power on those scores."""
from __future__ import annotations

import numpy as np
import pytest

from prefloop.align.answer_shift import AnswerShift
from prefloop.align.rating_test import PermutationTest, permutation_p


def test_the_shift_is_the_mean_frequency_difference_over_prompts():
    shift = AnswerShift.of([[1, 1, 2, 3], [4]], [[2, 2], [4, 4]], vocab=6)
    # prompt 0: (0, .5, .25, .25, 0, 0) - (0, 0, 1, 0, 0, 0); prompt 1: equal frequencies
    assert shift.prompts == 2
    np.testing.assert_allclose(shift.shift, [0, 0.25, -0.375, 0.125, 0, 0])


def test_an_answers_score_is_the_mean_shift_of_its_tokens():
    shift = AnswerShift(np.array([0.0, 0.4, -0.2, 0.1]), 1)
    assert shift.scores([[1, 1, 2], [3], [], [9]]) == pytest.approx([0.2, 0.1, 0.0, 0.0])


def test_top_names_what_the_candidate_writes_more_and_less_of():
    shift = AnswerShift(np.array([0.0, 0.4, -0.2, 0.1, -0.3]), 1)
    assert shift.top(2) == ([1, 3], [4, 2])
    assert shift.describe_top(lambda t: f"t{t}", 1) == "the candidate writes more 't1'; less 't4'"


def test_the_top_tokens_name_a_piece_of_an_emoji_by_its_bytes_with_the_default_tokenizer():
    from transformers import AutoTokenizer

    from prefloop.align.answer_shift import token_text
    from prefloop.server.model.loader import resolve_model_dir
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    ids = tok(" love 😀", add_special_tokens=False).input_ids
    decode = token_text(tok)
    names = [decode(t) for t in ids]
    assert names[0] == " love"
    assert all(isinstance(n, bytes) for n in names[1:])  # the emoji is split over tokens
    assert b"".join(names[1:]) == " 😀".encode()
    one = np.zeros(len(tok))
    one[ids[1]] = 1.0
    shift = AnswerShift(one, 1)
    assert "more b' \\xf0" in shift.describe_top(decode, k=1)


def test_a_byte_fallback_piece_is_named_by_its_byte():
    from types import SimpleNamespace as NS

    from prefloop.align.answer_shift import token_text
    tok = NS(decode=lambda t: "\ufffd", convert_ids_to_tokens=lambda t: "<0xF0>")  # SentencePiece
    assert token_text(tok)(7) == b"\xf0"


def test_one_answer_list_per_version_is_required():
    with pytest.raises(ValueError, match="one answer per prompt"):
        AnswerShift.of([[1]], [], vocab=4)


def _held_out(rng, n: int, vocab: int) -> list[list[int]]:
    return [list(rng.integers(0, vocab, size=rng.integers(20, 60))) for _ in range(n)]


def test_labels_that_follow_the_shift_pass_and_random_labels_keep_the_level():
    """A candidate that writes token 7 more; held-out answers liked when they use token 7 often
    (users who want what it learned) pass at 1 %; labels drawn at random pass at about the
    nominal rate (300 label sets, one shift: the level is exact for any fixed scores)."""
    rng = np.random.default_rng(0)
    vocab = 50
    cand = [list(rng.integers(0, vocab, 40)) + [7] * 8 for _ in range(16)]
    cur = [list(rng.integers(0, vocab, 48)) for _ in range(16)]
    shift = AnswerShift.of(cand, cur, vocab)
    assert shift.top(1)[0] == [7]
    held = _held_out(rng, 60, vocab)
    for ids in held[::2]:
        ids += [7] * int(rng.integers(3, 8))  # half the answers use token 7 more
    groups = [f"p{i}" for i in range(60)]
    scores = shift.scores(held)
    liked = [7 in ids and ids.count(7) >= 3 for ids in held]
    assert PermutationTest.of(scores, liked, groups, 0.98).passed
    passes = sum(permutation_p(scores, list(rng.random(60) < 0.3), groups, draws=400, seed=k)
                 < 0.05 for k in range(300))
    assert passes <= 27  # 5 % of 300 is 15; 27 is above its 99.9 % binomial quantile


def _evidence(liked_use_token: bool, n: int = 60, against: bool = False):
    """A shift towards token 7; held-out answers, half of them using token 7 often, labelled
    liked exactly when they do (or at random when `liked_use_token` is False; `against`: liked
    exactly when they do not)."""
    from prefloop.align.answer_shift import ShiftEvidence
    rng = np.random.default_rng(1)
    shift = AnswerShift.of([[7] * 10 + [1] * 10] * 16, [[1] * 20] * 16, vocab=50)
    held = _held_out(rng, n, 50)
    for ids in held[::2]:
        ids += [7] * 6
    labels = ([(i % 2 == 0) != against for i in range(n)] if liked_use_token
              else [bool(x) for x in rng.permutation([i % 2 == 0 for i in range(n)])])
    return ShiftEvidence(shift, held, labels, [f"p{i}" for i in range(n)], "more '7'")


def _decide(evidence, moves=None):
    """The KTO gate on `evidence`'s held-out answers: matched pairs flat (15 of 30), the
    candidate's moves `moves` (default: unrelated to the labels)."""
    from prefloop.align import gate
    from prefloop.align.gate import GateConfig, Paired
    n = len(evidence.labels)
    moves = list(np.random.default_rng(2).normal(size=n)) if moves is None else moves
    return gate.decide(implicit=Paired(15, 15), accuracy=None, candidate_accuracy=0.5,
                       current_accuracy=0.5, current_version="v0000", kl_per_token=0.1,
                       heldout_pairs=30, config=GateConfig(),
                       ratings=(moves, evidence.labels, evidence.groups), answer_shift=evidence)


def test_joint_scores_average_each_answers_two_ranks():
    from prefloop.align.rating_test import joint_scores
    out = joint_scores(np.array([0.1, 0.3, 0.2]), np.array([5.0, 1.0, 1.0]))
    np.testing.assert_allclose(out, [(1 + 3) / 2, (3 + 1.5) / 2, (2 + 1.5) / 2])
    with pytest.raises(ValueError, match="same answers"):
        joint_scores(np.zeros(3), np.zeros(2))


def test_the_answer_shift_is_reported_beside_the_rating_test_and_decides_nothing():
    """Labels that follow the shift and moves that carry nothing: the shift's own test is
    reported (AUC 1.0) and the rating test, on the moves alone, rejects. Moves that follow the
    labels pass even where the labels run against the shift (the join of 2026-12-05 averaged
    those two ranks to chance and failed)."""
    ev = _evidence(True)
    d = _decide(ev)
    assert not d.passed, d.reasons
    text = "\n".join(d.reasons)
    assert "either test at half the level (one-sided 0.025 each)" in text
    assert "(AUC of the summed moves)" in text and "ranks averaged" not in text
    assert "reported: the answers it writes (16 held-out prompts; more '7'): a liked held-out " \
           "answer resembles the shift more than a disliked one in 1.000" in text
    assert d.answer_shift.auc == 1.0 and d.margin.p_value > 0.025
    back = type(d).from_record(d.to_record())
    assert back.answer_shift == d.answer_shift and not back.passed
    against = _evidence(True, against=True)
    following = [1.0 if liked else -1.0 for liked in against.labels]
    d = _decide(against, moves=following)
    assert d.passed and d.answer_shift.auc == 0.0 and d.margin.p_value < 0.025, d.reasons


def test_the_joint_statistic_keeps_its_level_on_random_labels_within_prompts():
    """Two rated answers per prompt (a pick's sides, or a 👍 and a 👎), labels shuffled within
    each prompt at random: the joint test of moves and shift scores passes at 5 % about 5 % of
    the time (300 label sets on one fixed set of scores)."""
    rng = np.random.default_rng(3)
    n = 80
    moves, also = rng.normal(size=n), rng.normal(size=n)
    groups = [f"p{i // 2}" for i in range(n)]
    passes = 0
    for k in range(300):
        first = rng.random(n // 2) < 0.5
        labels = [bool(x) for pair in zip(first, ~first) for x in pair]
        t = PermutationTest.of(list(moves), labels, groups, 0.9, also=list(also), draws=400)
        passes += t.p_value < 0.05
    assert passes <= 27  # 5 % of 300 is 15; 27 is above its 99.9 % binomial quantile


def test_the_shift_record_reads_back_and_old_records_have_none():
    from prefloop.align.gate import ShiftResult
    r = ShiftResult(10, 16, float("nan"), float("nan"), float("nan"), 1.0, "", True)
    rec = r.to_record()
    assert rec["answer_shift"]["auc"] is None and rec["answer_shift"]["interval"] is None
    back = ShiftResult.from_record(rec)
    assert back.joined and back.prompts == 16 and back.p_value == 1.0
    assert ShiftResult.from_record({"passed": False}) is None


class _Tok:
    """Words as token ids (a unit test of the evidence's bookkeeping, not of a tokenizer)."""

    words = ["<pad>", "a", "b", "c", "d", "."]

    def __len__(self):
        return len(self.words)

    def __call__(self, texts, add_special_tokens=False):
        class Out:
            input_ids = [[self.words.index(w) for w in t.split()] for t in texts]
        return Out()

    def decode(self, t):
        return self.words[t]


def test_the_jobs_evidence_scores_a_kto_jobs_rated_answers_in_order_and_both_sides_of_pairs():
    from types import SimpleNamespace as NS

    from prefloop.align.jobs.preference import _shift_evidence
    written = (["a a .", "a b", ""], ["b b", "b c", "d"])  # the third prompt: an empty answer
    rows = [NS(text="a a", label=True, prompt=[{"role": "user", "content": "x"}]),
            NS(text="b", label=False, prompt=[{"role": "user", "content": "x"}]),
            NS(text="c .", label=False, prompt=[{"role": "user", "content": "y"}])]
    ev = _shift_evidence(_Tok(), written, [], rows)
    assert ev.labels == [True, False, False] and ev.shift.prompts == 2
    assert ev.groups[0] == ev.groups[1] != ev.groups[2]
    assert ev.answers == [[1, 1], [2], [3, 5]] and ev.scores()[0] > ev.scores()[1]
    assert "more 'a'" in ev.top
    pairs = [NS(chosen_text="a", rejected_text="b"), NS(chosen_text="c", rejected_text="d")]
    ev = _shift_evidence(_Tok(), written, pairs, [])
    assert ev.labels == [True, False, True, False]
    assert ev.groups == ["0", "0", "1", "1"] and ev.answers == [[1], [2], [3], [4]]
    assert _shift_evidence(_Tok(), written, [], []) is None
