"""The gates' statistics (align/gate.py) against closed-form cases: exact binomial tails computed
here independently (math.comb), Clopper-Pearson ends that have a closed form (all wins, no
wins), coin flips, small n, the minimum sample size and the reasons users read; the verdict's
record (to_record / from_record), including records written before checks were stored."""
from __future__ import annotations

import math

import pytest

from prefloop.align import gate
from prefloop.align.gate import Check, Comparison, GateConfig, GateDecision, Paired
from prefloop.server.errors import InvalidArgument


def tail(k: int, n: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2), by counting."""
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n


@pytest.mark.parametrize("k,n", [(0, 0), (0, 5), (3, 5), (5, 5), (7, 10), (15, 20), (14, 20),
                                 (26, 40), (25, 40), (60, 100)])
def test_sign_test_is_the_exact_binomial_tail(k, n):
    assert gate.sign_test_p(k, n - k) == pytest.approx(tail(k, n), rel=1e-10, abs=1e-15)
    assert gate.binomial_tail(k, n, 0.5) == pytest.approx(tail(k, n), rel=1e-10, abs=1e-15)


def test_binomial_tail_at_other_p():
    n, p = 12, 0.3
    expected = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(4, n + 1))
    assert gate.binomial_tail(4, n, p) == pytest.approx(expected, rel=1e-12)
    assert gate.binomial_tail(13, n, p) == 0.0 and gate.binomial_tail(0, n, p) == 1.0


@pytest.mark.parametrize("n", [1, 3, 5, 10, 29])
@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95])
def test_all_wins_and_no_wins_have_closed_form_ends(n, confidence):
    alpha = (1 - confidence) / 2
    lower, upper = gate.clopper_pearson(n, n, confidence)
    assert upper == 1.0 and lower == pytest.approx(alpha ** (1 / n), abs=1e-9)  # p^n = alpha
    lower, upper = gate.clopper_pearson(0, n, confidence)
    assert lower == 0.0 and upper == pytest.approx(1 - alpha ** (1 / n), abs=1e-9)


@pytest.mark.parametrize("k,n", [(1, 2), (5, 10), (20, 40), (50, 100)])
def test_coin_flips_straddle_one_half_symmetrically_and_never_pass(k, n):
    lower, upper = gate.clopper_pearson(k, n, 0.9)
    assert lower < 0.5 < upper and lower == pytest.approx(1 - upper, abs=1e-9)
    assert not Comparison.of(Paired(k, n - k), 0.9).passed


@pytest.mark.parametrize("k,n", [(4, 9), (15, 20), (21, 29), (18, 29)])
def test_interval_ends_solve_the_binomial_tails(k, n):
    """lower: P(X >= k | lower) = alpha; upper: P(X <= k | upper) = alpha."""
    alpha = 0.05
    lower, upper = gate.clopper_pearson(k, n, 0.9)

    def tail_p(j, p):
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(j, n + 1))
    assert tail_p(k, lower) == pytest.approx(alpha, abs=1e-9)
    assert 1 - tail_p(k + 1, upper) == pytest.approx(alpha, abs=1e-9)


@pytest.mark.parametrize("n", range(1, 41))
def test_passing_is_the_one_sided_sign_test_at_half_the_two_sided_level(n):
    """Lower end of the 90% interval > 1/2 exactly when P(X >= wins | 1/2) < 5%."""
    for wins in range(n + 1):
        assert Comparison.of(Paired(wins, n - wins), 0.9).passed == (tail(wins, n) < 0.05)


def test_small_n_cases():
    # 5 of 5: p = 1/32 < 5% passes; 4 of 4: 1/16 does not; 3 of 3: 1/8 does not
    assert Comparison.of(Paired(5, 0), 0.9).passed
    assert not Comparison.of(Paired(4, 0), 0.9).passed
    assert not Comparison.of(Paired(3, 0, ties=10), 0.9).passed  # ties carry no information
    # 20 pairs need 15 wins at 0.9 (P(X>=15) = 0.0207; P(X>=14) = 0.0577)
    assert Comparison.of(Paired(15, 5), 0.9).passed and not Comparison.of(Paired(14, 6), 0.9).passed
    # 29 differing pairs: 21 wins pass (p 0.012), 18 wins do not (p 0.13)
    assert Comparison.of(Paired(21, 8), 0.9).passed and not Comparison.of(Paired(18, 11), 0.9).passed
    nothing = Comparison.of(Paired(0, 0, ties=7), 0.9)
    assert not nothing.passed and (nothing.lower, nothing.upper) == (0.0, 1.0)


def test_paired_counts_from_differences():
    p = Paired.from_differences([0.3, -0.1, 0.0, 1e-9, 2.0], tol=1e-6)
    assert (p.wins, p.losses, p.ties, p.units, p.differing) == (2, 1, 2, 5, 3)
    assert p.win_rate == pytest.approx(2 / 3)
    assert Paired(0, 0).win_rate is None
    with pytest.raises(InvalidArgument):
        Paired(-1, 0)


def decide(implicit, accuracy=None, kl=0.05, heldout=None, **cfg):
    heldout = implicit.units if heldout is None else heldout
    return gate.decide(implicit=implicit, accuracy=accuracy, candidate_accuracy=0.6,
                       current_accuracy=0.6, current_version="v0001", kl_per_token=kl,
                       heldout_pairs=heldout, config=GateConfig(**cfg))


def test_decide_passes_on_enough_consistent_wins_and_keeps_the_old_keys():
    d = decide(Paired(25, 5), Paired(2, 1, 27))
    assert d.passed, d.reasons
    out = d.to_record()
    for key in ("passed", "reasons", "candidate_accuracy", "current_accuracy", "current_version",
                "kl_per_token", "max_kl"):
        assert key in out
    assert out["wins"] == 25 and out["losses"] == 5 and out["heldout_pairs"] == 30
    assert out["metric"] == "implicit_either" and out["confidence"] == 0.9  # the stated level
    assert out["interval"][0] > 0.5 and out["implicit_reward_accuracy"] == pytest.approx(25 / 30)
    assert out["accuracy_paired"]["wins"] == 2
    text = " ".join(d.reasons)
    # the default metric spends half the level on the sign test: its interval is 95%
    assert "25 wins, 5 losses, 0 ties of 30 pairs" in text and "95% interval [" in text
    assert "reference-free preference accuracy 0.600" in text


def test_decide_says_what_is_missing_on_too_few_pairs():
    d = decide(Paired(5, 0))  # every pair a win, but only 5 of them
    assert not d.passed
    assert d.reasons[0] == ("needs >= 20 held-out pairs, have 5: collect more votes, raise "
                            "--heldout-fraction or lower --min-heldout-pairs")
    # 5 of 5: one-sided p 1/32, under the sign test's 5% but not under the default's 2.5%
    assert decide(Paired(5, 0), min_heldout=5, metric="implicit_reward").passed
    assert not decide(Paired(5, 0), min_heldout=5).passed and decide(Paired(6, 0), min_heldout=5).passed


def test_decide_rejects_coin_flips_drift_and_the_other_metric():
    assert not decide(Paired(12, 10)).passed  # a coin flip's worth of wins
    drift = decide(Paired(30, 0), kl=0.9)
    assert not drift.passed and "> bound 0.5" in drift.reasons[2]
    # the same candidate judged on reference-free accuracy: 1 discordant pair decides nothing
    acc = decide(Paired(30, 0), Paired(1, 0, 29), metric="pref_accuracy")
    assert not acc.passed and acc.to_record()["wins"] == 1
    none = decide(None, heldout=30)
    assert not none.passed and "no held-out implicit reward to compare" in none.reasons
    strict = decide(Paired(25, 5), min_improvement=0.2)  # lower end must clear 0.7
    assert not strict.passed and "<= 0.700" in strict.reasons[1]


def test_gate_config_checks():
    for bad in (dict(confidence=1.0), dict(confidence=0.4), dict(min_heldout=0),
                dict(metric="loss"), dict(min_improvement=0.5), dict(max_kl=0)):
        with pytest.raises(InvalidArgument):
            GateConfig(**bad)


def test_ppo_gate_is_the_reward_models_win_rate_per_prompt():
    cfg = GateConfig(min_heldout=10)
    ok = gate.ppo_gate(per_prompt=Paired(14, 1), candidate_reward=0.4, current_reward=0.1,
                       current_version="v0002", kl_per_token=0.1, heldout_prompts=15,
                       config=cfg)
    assert ok.passed and ok.to_record()["metric"] == "rm_win_rate"
    assert {"candidate_reward", "current_reward", "min_improvement", "max_kl"} <= set(ok.to_record())
    assert "reward-model win rate vs v0002" in ok.reasons[1]
    # a higher mean reward from a few outliers is not enough
    few = gate.ppo_gate(per_prompt=Paired(8, 7), candidate_reward=2.0, current_reward=0.1,
                        current_version="v0002", kl_per_token=0.1, heldout_prompts=15,
                        config=cfg)
    assert not few.passed
    short = gate.ppo_gate(per_prompt=Paired(4, 0), candidate_reward=1.0, current_reward=0.0,
                          current_version="v0", kl_per_token=0.0, heldout_prompts=4, config=cfg)
    assert not short.passed and "needs >= 10 held-out prompts, have 4" in short.reasons[0]


def test_reward_model_gate_on_counts():
    ok = gate.reward_model_gate({"pairs": 30, "accuracy": 0.8, "correct": 24, "wrong": 6,
                                 "ties": 0}, 0.5)
    assert ok.passed and ok.to_record()["heldout_accuracy"] == 0.8
    assert ok.to_record()["min_accuracy"] == 0.5
    few = gate.reward_model_gate({"pairs": 5, "accuracy": 0.4, "correct": 2, "wrong": 3}, 0.5)
    assert not few.passed and few.reasons[0].startswith("needs >= 20 held-out pairs, have 5")
    assert not gate.reward_model_gate({"pairs": 30, "accuracy": 0.6, "correct": 18,
                                       "wrong": 12}, 0.5).passed  # interval reaches below 0.5
    none = gate.reward_model_gate({"pairs": 0}, 0.5)
    assert not none.passed and none.to_record()["heldout_accuracy"] is None


# ---- the implicit-reward margin test (sign flips) -------------------------------------------


def flips_at_least(values: list[float]) -> float:
    """P(sum of randomly signed values >= observed sum), by listing all 2^n sign patterns."""
    import itertools
    observed = sum(values)
    hits = sum(sum(s * v for s, v in zip(signs, values)) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=len(values)))
    return hits / 2 ** len(values)


@pytest.mark.parametrize("values", [[1.0], [1.0] * 5, [1.0, -1.0], [2.0, -1.0, 0.5],
                                    [0.3, 0.1, -0.2, 0.8, -0.05, 0.4], [1.0] * 7 + [-1.0] * 3])
def test_sign_flip_p_is_the_exact_share_of_sign_patterns(values):
    assert gate.sign_flip_p(values) == pytest.approx(flips_at_least(values), abs=1e-12)


def test_sign_flip_p_closed_forms_and_monte_carlo_agrees_with_the_binomial_for_equal_sizes():
    assert gate.sign_flip_p([0.5] * 10) == pytest.approx(2 ** -10)
    assert gate.sign_flip_p([]) == 1.0
    # equal magnitudes: the sum test is the sign test (k wins of n)
    values = [1.0] * 26 + [-1.0] * 14  # n = 40 > 16: Monte Carlo
    assert gate.sign_flip_p(values, draws=40000) == pytest.approx(tail(26, 40), abs=0.006)


def test_sign_flip_test_holds_its_level_on_random_signs():
    import random
    rng = random.Random(7)
    trials, passes = 400, 0
    for t in range(trials):
        margins = [rng.choice((-1, 1)) * rng.expovariate(1.0) for _ in range(35)]
        passes += gate.MarginTest.of(margins, 0.9).passed
    assert passes / trials <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)


def test_margin_test_sees_few_large_moves_the_sign_test_misses():
    # 35 held-out pairs: 13 clear moves towards the voters' choice, 22 noise pairs split 9/13
    margins = [3.0] * 13 + [0.2] * 9 + [-0.2] * 13
    sign = Comparison.of(Paired.from_differences(margins), 0.9)
    assert not sign.passed and sign.p_value == pytest.approx(tail(22, 35))  # 22 of 35: p 0.088
    test = gate.MarginTest.of(margins, 0.9)
    assert test.passed and test.p_value < 0.001 and test.lower > 0
    assert "sign-flip p =" in test.describe("m", "pairs")


def test_decide_on_the_margin_metric_reports_the_sign_test_beside():
    margins = [3.0] * 13 + [0.2] * 9 + [-0.2] * 13
    d = gate.decide(implicit=Paired.from_differences(margins), accuracy=None,
                    candidate_accuracy=0.5, current_accuracy=0.5, current_version="v0000",
                    kl_per_token=0.1, heldout_pairs=35, margins=margins,
                    config=GateConfig(metric="implicit_margin"))
    assert d.passed, d.reasons
    text = "\n".join(d.reasons)
    assert "implicit-reward mean margin vs v0000 +1.091 nats over 35 pairs" in text
    assert "reported: implicit-reward win rate vs v0000 0.629 (22 wins, 13 losses" in text
    out = d.to_record()
    assert out["metric"] == "implicit_margin" and out["margin_pairs"] == 35
    assert out["margin_p_value"] < 0.05 and out["implicit"]["wins"] == 22 and "interval" in out["implicit"]
    # the same margins on the sign-test metric are rejected, the margin test reported
    d2 = gate.decide(implicit=Paired.from_differences(margins), accuracy=None,
                     candidate_accuracy=0.5, current_accuracy=0.5, current_version="v0000",
                     kl_per_token=0.1, heldout_pairs=35, margins=margins,
                     config=GateConfig(metric="implicit_reward"))
    assert not d2.passed and any(r.startswith("reported: implicit-reward mean margin") for r in d2.reasons)


def either(margins, **cfg):
    return gate.decide(implicit=Paired.from_differences(margins), accuracy=None,
                       candidate_accuracy=0.5, current_accuracy=0.5, current_version="v0000",
                       kl_per_token=0.1, heldout_pairs=len(margins), margins=margins,
                       config=GateConfig(metric="implicit_either", **cfg))


def test_either_metric_passes_on_a_few_large_moves_or_on_many_small_ones():
    few_large = [3.0] * 13 + [0.2] * 9 + [-0.2] * 13  # sign test 22/35 (p 0.088), margin p < 0.001
    d = either(few_large)
    assert d.passed, d.reasons
    text = "\n".join(d.reasons)
    assert "implicit reward vs v0000, passed: either test at half the level (one-sided 0.025 each)" in text
    assert "95% interval [" in text and "p = " in text
    assert not any(r.startswith("reported: implicit-reward") for r in d.reasons)  # both in the verdict
    many_small = [0.1] * 26 + [-1.0] * 9  # mean margin negative, sign test 26/35: p 0.0022
    assert gate.sign_test_p(26, 9) < 0.025 and sum(many_small) < 0
    assert either(many_small).passed
    # with a win-rate threshold only the sign test can pass (the margin test has none)
    assert not either(few_large, min_improvement=0.05).passed


def test_either_metric_spends_half_the_level_on_each_test():
    # 23 of 35 with equal magnitudes: both tests at p ≈ 0.045, under 0.05 but not under 0.025
    margins = [1.0] * 23 + [-1.0] * 12
    assert 0.025 < gate.sign_test_p(23, 12) < 0.05
    assert decide(Paired(23, 12), metric="implicit_reward").passed  # the sign test alone, full level
    assert not either(margins).passed


def test_either_metric_holds_its_level_on_random_signs():
    import random
    rng = random.Random(11)
    trials, passes = 400, 0
    for t in range(trials):
        margins = [rng.choice((-1, 1)) * rng.expovariate(1.0) for _ in range(35)]
        passes += either(margins).passed
    assert passes / trials <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)


def test_every_gate_names_the_checks_that_failed():
    ok = decide(Paired(25, 5))
    assert ok.passed and ok.to_record()["failed"] == []
    few_and_drift = decide(Paired(6, 0), kl=0.9)  # 6 of 6 passes its test, too few pairs and KL fail
    assert few_and_drift.failed == [few_and_drift.reasons[0], few_and_drift.reasons[2]]
    assert few_and_drift.failed[0].startswith("needs >= 20") and "> bound" in few_and_drift.failed[1]
    coin = decide(Paired(12, 10))
    assert coin.failed == [coin.reasons[1]] and "failed: either test" in coin.failed[0]
    rm = gate.reward_model_gate({"pairs": 30, "accuracy": 0.5, "correct": 15, "wrong": 15}, 0.5)
    assert not rm.passed and rm.failed == [rm.reasons[1]]
    ppo = gate.ppo_gate(per_prompt=Paired(30, 0), candidate_reward=1.0, current_reward=0.0,
                        current_version="v0000", kl_per_token=0.1, heldout_prompts=30,
                        config=GateConfig())
    assert ppo.passed and ppo.failed == [] and ppo.reasons[-1].startswith("reported: mean reward")


# ---- the verdict's record: one schema for the writer and the readers -------------------------


def verdicts() -> list[GateDecision]:
    """One verdict of every gate kind and metric, passed and failed."""
    margins = [3.0] * 13 + [0.2] * 9 + [-0.2] * 13
    out = [decide(Paired(25, 5), Paired(2, 1, 27)), decide(Paired(6, 0), kl=0.9),
           decide(None, heldout=30), decide(Paired(12, 10), metric="pref_accuracy",
                                            accuracy=Paired(3, 4, 23))]
    for metric in ("implicit_margin", "implicit_reward", "implicit_either"):
        out.append(gate.decide(implicit=Paired.from_differences(margins), accuracy=Paired(5, 1, 29),
                               candidate_accuracy=0.5, current_accuracy=0.25,
                               current_version="v0003", kl_per_token=0.125, heldout_pairs=35,
                               margins=margins, config=GateConfig(metric=metric)))
    cfg = GateConfig(min_heldout=10, max_kl=0.25)
    out.append(gate.ppo_gate(per_prompt=Paired(14, 1, 2), candidate_reward=0.5, current_reward=0.25,
                             current_version="v0002", kl_per_token=0.125, heldout_prompts=17,
                             config=cfg))
    out.append(gate.ppo_gate(per_prompt=None, candidate_reward=None, current_reward=None,
                             current_version="v0002", kl_per_token=None, heldout_prompts=3,
                             config=cfg))
    out.append(gate.reward_model_gate({"pairs": 30, "accuracy": 0.8, "correct": 24, "wrong": 5,
                                       "ties": 1}, 0.5))
    out.append(gate.reward_model_gate({"pairs": 0}, 0.5))
    return out


@pytest.mark.parametrize("i", range(11))
def test_a_verdicts_record_round_trips_through_json(i):
    import json
    d = verdicts()[i]
    record = json.loads(json.dumps(d.to_record()))  # what the manifest / job history hold
    back = GateDecision.from_record(record)
    assert back == d  # every check and every number, typed
    assert back.checks == d.checks and back.paired == d.paired and back.kind == d.kind
    assert back.to_record() == record


def test_the_record_keeps_the_old_keys_and_adds_the_checks():
    d = decide(Paired(6, 0), kl=0.9)  # too few pairs and too much KL fail; the comparison passes
    record = d.to_record()
    assert record["passed"] is False
    assert record["reasons"] == [c.text for c in d.checks] == d.reasons
    assert record["reasons"][0].startswith("needs >= 20 held-out pairs, have 6")
    assert record["reasons"][2] == "KL to the reference 0.9000 nats/token > bound 0.5"
    assert record["reasons"][3] == "reported: reference-free preference accuracy 0.600 vs current v0001's 0.600"
    assert record["failed"] == [record["reasons"][0], record["reasons"][2]]
    assert record["checks"] == [
        {"name": "min_heldout", "passed": False, "text": record["reasons"][0]},
        {"name": "implicit_either", "passed": True, "text": record["reasons"][1]},
        {"name": "max_kl", "passed": False, "text": record["reasons"][2]},
        {"name": "pref_accuracy", "passed": None, "text": record["reasons"][3]}]
    assert (record["wins"], record["losses"], record["heldout_pairs"], record["kl_per_token"]) == (6, 0, 6, 0.9)
    assert d.paired.n == 6 and d.paired.win_rate == 1.0 and d.implicit == d.paired
    assert d.paired.lower == pytest.approx(0.025 ** (1 / 6))  # 95% interval: 6 of 6


@pytest.mark.parametrize("i", range(11))
def test_the_failed_checks_are_exactly_those_that_failed(i):
    d = verdicts()[i]
    assert d.failed == [c.text for c in d.checks if c.passed is False]
    assert d.to_record()["failed"] == d.failed
    assert d.passed == (not d.failed)  # the gates decide on their checks alone
    assert all(c.passed is None for c in d.checks if c.text.startswith("reported: "))
    assert all(c.passed is not None for c in d.checks if not c.text.startswith("reported: "))


def test_every_gate_kind_has_one_failing_example():
    failed = [d for d in verdicts() if not d.passed]
    assert {d.kind for d in failed} == {"policy", "ppo", "reward_model"}
    assert {d.kind for d in verdicts() if d.passed} == {"policy", "ppo", "reward_model"}


def old_record(d: GateDecision, *, with_failed: bool) -> dict:
    """The record as written before checks were stored (and, without `failed`, before that)."""
    record = d.to_record()
    del record["checks"]
    if not with_failed:
        del record["failed"]
    return record


@pytest.mark.parametrize("with_failed", [True, False])
@pytest.mark.parametrize("i", range(11))
def test_an_old_record_reads_back_with_the_right_checks(i, with_failed):
    d = verdicts()[i]
    back = GateDecision.from_record(old_record(d, with_failed=with_failed))
    assert back.passed == d.passed and back.reasons == d.reasons
    assert [c.passed for c in back.checks] == [c.passed for c in d.checks]
    assert back.failed == d.failed
    # named by their wording: the comparison after the record's metric, reported lines "reported"
    assert [c.name for c in back.checks] == [
        "reported" if c.passed is None else c.name if c.name in ("min_heldout", "max_kl", d.metric)
        else "comparison" for c in d.checks]
    assert (back.paired, back.margin, back.implicit, back.kl_per_token, back.heldout) == \
        (d.paired, d.margin, d.implicit, d.kl_per_token, d.heldout)


def test_hand_written_old_records_read_back():
    # passed, reasons only: every check passed
    ok = GateDecision.from_record({"passed": True, "reasons": ["ok", "reported: an aside"],
                                   "win_rate": 0.8, "interval": [0.61, 0.93], "wins": 16,
                                   "losses": 4, "candidate_accuracy": 0.7})
    assert [c.passed for c in ok.checks] == [True, None] and ok.failed == []
    assert (ok.paired.win_rate, ok.paired.n, ok.paired.lower, ok.paired.p_value) == (0.8, 20, 0.61, None)
    assert ok.candidate_accuracy == 0.7 and ok.kind == ""
    # failed, and the record does not say which check: the wording does
    reasons = ["35 held-out pairs (>= 20)", "implicit reward vs v0000, failed: either test",
               "KL to the reference 0.0312 nats/token <= bound 0.5"]
    old = GateDecision.from_record({"passed": False, "reasons": reasons, "metric": "implicit_either"})
    assert old.failed == [reasons[1]] and old.kind == "policy"
    assert [c.name for c in old.checks] == ["min_heldout", "implicit_either", "max_kl"]
    # failed and nothing in the wording: every deciding check counts as failed
    vague = GateDecision.from_record({"passed": False, "reasons": ["accuracy fell", "reported: x"]})
    assert vague.failed == ["accuracy fell"] and not vague.passed
    assert GateDecision.from_record({"passed": True}).checks == []
    # keys this schema does not know are kept
    assert GateDecision.from_record({"passed": True, "note": 1}).to_record()["note"] == 1


def test_a_verdict_cannot_pass_with_a_failed_check():
    with pytest.raises(InvalidArgument):
        GateDecision(True, [Check("max_kl", False, "KL too high")])
    with pytest.raises(InvalidArgument):
        GateDecision.from_record({"passed": "yes", "reasons": []})


def test_the_drift_check_bounds_the_kl_to_the_root_version():
    from prefloop.align.gate import with_drift
    cfg = GateConfig(max_root_kl=1.0)
    passing = GateDecision(True, [Check("min_heldout", True, "20 held-out pairs (>= 20)")], "policy")
    kept = with_drift(passing, 0.4, "v0000", cfg)
    assert kept.passed and kept.checks[-1].passed is True
    assert kept.checks[-1].text == ("KL to the root v0000 0.4000 nats/token <= bound 1 (drift over "
                                    "the chain of versions)")
    assert kept.to_record()["kl_to_root"] == 0.4 and kept.to_record()["root_version"] == "v0000"
    drifted = with_drift(passing, 1.3, "v0000", cfg)
    assert not drifted.passed and drifted.failed == [drifted.checks[-1].text]
    assert GateDecision.from_record(drifted.to_record()).kl_to_root == 1.3
    unmeasured = with_drift(passing, None, "v0000", cfg)
    assert unmeasured.passed and unmeasured.checks[-1].passed is None
