"""A/B tests decided by ratings too (server/ab/decision.py RatingEvidence, decide_combined;
evidence.tally): each user's first thumbs / stars on an arm's answer, each candidate user against
the control users who rated since the candidate user before (a block), a mixture of betting
martingales read at every look. The blocks in closed form, the exchangeability their level rests
on (by enumeration), their level under indifferent raters by simulation (looking again and
again; also while the thumbs-up rate drifts, where pairs in arrival order lose it), their power
at realistic effects, one heavy user counting once, and the combined rule (the product of the
head-to-head and the ratings e-values, its level by simulation); then the same through an
in-process server: users rate the answers they were served, the controller promotes on thumbs
alone."""
from __future__ import annotations

import itertools
import math
import random
import sys
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN
from test_ab import ab_server, post  # noqa: F401 (the in-process A/B server fixture)

from prefloop.align.gate import clopper_pearson
from prefloop.cli.models import format_ab
from prefloop.server.ab import decision
from prefloop.server.ab import state as ab_state
from prefloop.server.ab.evidence import status as ab_status
from prefloop.server.ab.evidence import tally
from prefloop.server.feedback.store import FeedbackStore, StoreConfig


def alternating(candidate: list[float], control: list[float]) -> list[tuple[bool, float]]:
    """Users in arrival order, control first, then candidate, and so on: every block is one pair
    (d = x_candidate - x_control); the users left over of the longer arm come last."""
    users = []
    for i in range(max(len(candidate), len(control))):
        users += [(False, control[i])] if i < len(control) else []
        users += [(True, candidate[i])] if i < len(candidate) else []
    return users


def sequential_test(rng: random.Random, up_candidate: float, up_control: float, *,
                    users: int = 300, every: int = 10, alpha: float = 0.05,
                    traffic: float = 0.5) -> str:
    """Users rate one answer each (thumbs), a share `traffic` on the candidate's arm; a look
    every `every` users."""
    bets = decision.RatingBets()
    for i in range(1, users + 1):
        arm = rng.random() < traffic
        bets.add(arm, 1.0 if rng.random() < (up_candidate if arm else up_control) else 0.0)
        if i % every == 0:
            outcome = decision.decide_ratings(bets.evidence(), alpha=alpha)
            if outcome != decision.RUNNING:
                return outcome
    return decision.RUNNING


def test_indifferent_raters_promote_at_most_alpha_however_often_the_test_looks():
    for traffic, seed in ((0.5, 3), (0.1, 5)):
        rng = random.Random(seed)
        outcomes = [sequential_test(rng, 0.6, 0.6, traffic=traffic, users=600)
                    for _ in range(200)]
        promoted = outcomes.count(decision.PROMOTE)
        assert clopper_pearson(promoted, len(outcomes), 0.95)[0] <= 0.05, (traffic, promoted)
        assert outcomes.count(decision.REJECT) <= 10


def test_a_block_is_a_candidate_user_against_the_control_users_since_the_one_before():
    """Control users 0, 1, 0, then a candidate user's 1: d = 1 - 1/3. Then a candidate user (no
    control user yet: the block stays open), a control user, a candidate user: the two candidate
    users' mean 1/2 against 0. A control user after the last candidate user waits."""
    ev = decision.RatingEvidence.of([(False, 0.0), (False, 1.0), (False, 0.0), (True, 1.0),
                                     (True, 1.0), (False, 0.0), (True, 0.0), (False, 1.0)])
    assert (ev.blocks, ev.candidate_users, ev.control_users) == (2, 3, 5)
    assert ev.mean_difference == pytest.approx((2 / 3 + 1 / 2) / 2)
    bets = decision.RATING_LAMBDAS
    assert ev.e_better == pytest.approx(sum((1 + b * 2 / 3) * (1 + b / 2) for b in bets)
                                        / len(bets))
    assert ev.e_worse == pytest.approx(sum((1 - b * 2 / 3) * (1 - b / 2) for b in bets)
                                       / len(bets))
    with pytest.raises(ValueError, match=r"a rating must be in \[0, 1\]"):
        decision.RatingEvidence.of([(True, 1.5)])


def test_a_blocks_difference_has_mean_zero_over_every_arrangement_of_its_values():
    """The level rests on this: with the arms rated alike, the values of a closed block are
    exchangeable, so d's mean over every assignment of the block's values to its users is 0
    (exact fractions; blocks of 1 + 3, 2 + 1 and 1 + 1 users, thumbs and stars)."""
    for arms, values in ((["ctrl"] * 3 + ["cand"], [1, 0, 0, 1]),
                         (["cand", "ctrl", "cand"], [Fraction(3, 4), 0, 1]),
                         (["ctrl", "cand"], [Fraction(1, 4), 1])):
        ds = []
        for order in itertools.permutations(values):
            cand = [v for a, v in zip(arms, order) if a == "cand"]
            ctrl = [v for a, v in zip(arms, order) if a == "ctrl"]
            ds.append(Fraction(sum(cand), len(cand)) - Fraction(sum(ctrl), len(ctrl)))
            ev = decision.RatingEvidence.of([(a == "cand", float(v)) for a, v in zip(arms, order)])
            assert ev.blocks == 1 and ev.mean_difference == pytest.approx(float(ds[-1]))
        assert sum(ds) == 0


def test_a_drifting_thumbs_up_rate_keeps_the_blocks_level_and_breaks_the_pairs():
    """Both arms rated alike, the rate drifting 0.15 -> 0.55 over 1,500 users, 10 % of them on
    the candidate: pairing the i-th candidate user with the i-th control user compares a late
    candidate user with an early control user, so it promotes far more often than alpha; the
    blocks compare users of the same stretch and stay at it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from ab_votes import ArrivalPairs  # the pairing benchmarks/ab_votes.py compares with

    def run(seed: int, paired: bool) -> str:
        rng, bets = random.Random(seed), ArrivalPairs() if paired else decision.RatingBets()
        for i in range(1500):
            arm = rng.random() < 0.1
            bets.add(arm, float(rng.random() < 0.15 + 0.4 * i / 1500))
            if i % 25 == 24:
                outcome = decision.decide_ratings(bets.evidence(), alpha=0.05)
                if outcome != decision.RUNNING:
                    return outcome
        return decision.RUNNING
    blocks = [run(seed, False) for seed in range(150)].count(decision.PROMOTE)
    pairs = [run(seed, True) for seed in range(150)].count(decision.PROMOTE)
    assert clopper_pearson(blocks, 150, 0.95)[0] <= 0.05, blocks
    assert clopper_pearson(pairs, 150, 0.95)[0] > 0.05, pairs


def test_a_clearly_better_candidate_promotes_and_a_worse_one_is_rejected():
    rng = random.Random(4)
    better = [sequential_test(rng, 0.75, 0.5, users=400) for _ in range(30)]
    worse = [sequential_test(rng, 0.35, 0.6, users=400) for _ in range(30)]
    assert better.count(decision.PROMOTE) >= 27 and decision.REJECT not in better
    assert worse.count(decision.REJECT) >= 27 and decision.PROMOTE not in worse


def test_e_values_in_closed_form():
    ev = decision.RatingEvidence.of(alternating([1.0, 1.0], [0.0, 0.0, 1.0]))
    assert ev.blocks == 2 and ev.mean_difference == 1.0
    bets = decision.RATING_LAMBDAS
    assert ev.e_better == pytest.approx(sum((1 + b) ** 2 for b in bets) / len(bets))
    assert ev.e_worse == pytest.approx(sum((1 - b) ** 2 for b in bets) / len(bets))
    assert decision.RatingEvidence.of([(False, 1.0)]).e_better == 1.0


def test_a_long_one_sided_ratings_record_keeps_its_e_values_in_logs():
    """20,000 blocks all against the candidate: the products would underflow to 0 as floats."""
    ev = decision.RatingEvidence.of(alternating([0.0] * 20000, [1.0] * 20000))
    assert ev.log_e_better < -1000 and ev.e_better == 0.0 and ev.log_e_worse > 5000
    assert decision.decide_combined(0, 0, ev).outcome == decision.REJECT


def test_the_combined_rule_multiplies_the_evidence_and_names_what_decided():
    strong = decision.RatingEvidence.of(alternating([1.0] * 40, [0.0] * 40))
    by_thumbs = decision.decide_combined(3, 3, strong, confidence=0.95, min_votes=20)
    assert by_thumbs.outcome == decision.PROMOTE
    assert by_thumbs.decided_by == "ratings (thumbs / stars)"
    assert "e-values" in by_thumbs.reason and "threshold 20" in by_thumbs.reason
    # head-to-head alone at the whole level: 20 of 20 is enough
    by_votes = decision.decide_combined(20, 0, decision.NO_RATINGS, confidence=0.95, min_votes=20)
    assert by_votes.outcome == decision.PROMOTE and by_votes.decided_by == "head-to-head votes"
    assert "one-sided 95% always-valid bounds" in by_votes.reason
    # neither kind alone reaches 1/alpha = 20 (nor 40, half the level each), their product does
    some = decision.RatingEvidence.of(alternating([1.0] * 8 + [0.0] * 8, [0.0] * 16))
    head = math.exp(decision.log_evidence_above(14, 4))
    assert 5 < head < 20 and 5 < some.e_better < 20
    both = decision.decide_combined(14, 4, some, confidence=0.95, min_votes=20)
    assert both.outcome == decision.PROMOTE
    assert both.decided_by == "head-to-head votes and ratings together"
    assert math.exp(both.log_e_better) == pytest.approx(head * some.e_better)
    worse = decision.RatingEvidence.of(alternating([0.0] * 40, [1.0] * 40))
    conflict = decision.decide_combined(40, 0, worse, confidence=0.95, min_votes=20)
    assert conflict.outcome == decision.RUNNING and "disagree" in conflict.reason
    # the vote minimum counts votes and blocks of ratings together: 8 straight wins are not enough
    streak = decision.decide_combined(8, 0, decision.NO_RATINGS, confidence=0.95, min_votes=20)
    assert streak.outcome == decision.RUNNING
    assert "needs >= 20 votes and rating blocks" in streak.reason
    neutral = decision.RatingEvidence.of(alternating([1.0] * 12, [1.0] * 12))  # d = 0: e = 1
    assert decision.decide_combined(8, 0, neutral, confidence=0.95,
                                    min_votes=20).outcome == decision.PROMOTE


def test_the_product_promotes_an_indifferent_candidate_at_most_alpha_however_often_it_looks():
    """Users who neither prefer the candidate head to head nor rate it higher; a quarter compare,
    the rest rate one answer of their arm; a look every 10 events through decide_combined."""
    rng, alpha, promoted, tests = random.Random(11), 0.05, 0, 300
    for _ in range(tests):
        wins = losses = 0
        arrived = []
        for event in range(1, 301):
            if rng.random() < 0.25:
                if rng.random() < 0.5:
                    wins += 1
                else:
                    losses += 1
            else:
                arrived.append((rng.random() < 0.5, float(rng.random() < 0.3)))
            if event % 10 == 0:
                outcome = decision.decide_combined(
                    wins, losses, decision.RatingEvidence.of(arrived),
                    confidence=1 - alpha).outcome
                if outcome != decision.RUNNING:
                    promoted += outcome == decision.PROMOTE
                    break
    assert promoted / tests <= alpha, promoted


def test_a_heavy_user_counts_once(tmp_path):
    from ab_helpers import two_versions
    registry, v1 = two_versions(tmp_path)
    state = ab_state.start(registry, v1, force=True)
    with FeedbackStore(StoreConfig(data_dir=tmp_path / "data")) as store:
        for i in range(3):
            store.record_generation({"response_id": f"c{i}", "prompt": "p", "completion": "x",
                                     "model_version": v1})
            store.record_generation({"response_id": f"k{i}", "prompt": "p", "completion": "y",
                                     "model_version": "v0000"})
        store.flush()
        for _ in range(50):  # one user, fifty thumbs up on the candidate's answer
            store.submit_rating(response_id="c0", score=1, user_id="fan")
        store.submit_rating(response_id="k0", score=-1, user_id="ann")
        store.submit_rating(response_id="c1", score=4, scale="stars", user_id="bob")
        store.submit_rating(response_id="k1", score=1, session_id="s-9")
    counts = tally(tmp_path / "data", state)
    assert counts.thumbs[v1]["up"] == 50  # shown as given
    assert counts.first_ratings == [(v1, 1.0), ("v0000", 0.0), (v1, 0.75), ("v0000", 1.0)]
    # in arrival order: fan's 1 opens a block that ann's 0 and bob's 0.75 close (d = 0.875 - 0);
    # s-9's 1 waits for the next candidate user
    shown = ab_status(registry, tmp_path / "data")
    assert shown["ratings"]["blocks"] == 1
    assert shown["ratings"]["mean_difference"] == pytest.approx(0.875)
    text = format_ab(shown)
    assert ("ratings: 2 / 2 users rated candidate / control (first rating each); 1 block of "
            "users who rated at about the same time, mean difference +0.875") in text


def test_a_flood_of_compare_votes_counts_only_its_first_five(tmp_path):
    from ab_helpers import one_answer_each, two_versions

    from prefloop.server.ab.allowance import FLOOR
    from prefloop.server.ab.evidence import verdict
    registry, v1 = two_versions(tmp_path)
    state = ab_state.start(registry, v1, force=True)
    with one_answer_each(tmp_path, v1) as store:
        for _ in range(200):  # one user picks the candidate's answer 200 times
            store.submit_preference(chosen_response_id="c", rejected_response_id="k",
                                    user_id="fan")
        for i in range(10):  # ten other users pick the candidate's too, three the control's
            store.submit_preference(chosen_response_id="c", rejected_response_id="k",
                                    session_id=f"tab-{i}")
        for i in range(3):
            store.submit_preference(chosen_response_id="k", rejected_response_id="c",
                                    user_id=f"other-{i}")
    counts = tally(tmp_path / "data", state)
    assert (counts.wins, counts.losses) == (FLOOR + 10, 3)
    assert counts.over_cap == 200 - FLOOR
    now = verdict(state, counts)  # 18 counted votes: under the minimum of 20
    assert now.outcome == decision.RUNNING and "needs >= 20 votes" in now.reason
    assert decision.decide(212, 3).outcome == decision.PROMOTE  # what 200 of one user would do


def test_thumbs_alone_decide_a_test_on_a_live_server(ab_server):  # noqa: F811
    """Users chat (each sticks to one arm) and rate the answer they got; no compare votes.
    The status decides for the candidate on its users' thumbs once 20 blocks of ratings are in
    (looked at every 5 users from 40 on; the blocks per user vary with the users' arms), and the
    controller promotes it."""
    url, registry, v1, controller, call = ab_server
    started = post(url, "/v1/admin/ab/start", {"candidate": v1, "traffic": 0.5, "min_votes": 20},
                   ADMIN_TOKEN)
    assert started.status_code == 200, started.text
    rated = {v1: 0, "v0000": 0}
    status: dict = {}
    for i in range(400):
        reply = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2, "user": f"user-{i}"}).json()
        answer = reply["choices"][0]
        version = answer["model_version"]
        rated[version] += 1
        score = 1 if version == v1 else (1 if i % 4 == 0 else -1)  # candidate liked by all
        vote = post(url, "/v1/feedback/rating", {"response_id": answer["response_id"],
                                                 "score": score, "user_id": f"user-{i}"})
        assert vote.status_code == 200, vote.text
        if i >= 40 and i % 5 == 0:
            status = httpx.get(url + "/v1/admin/ab",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            if status["decision"] != "running":
                break
    assert min(rated.values()) >= 20, rated  # both arms served and rated
    assert (status["wins"], status["losses"]) == (0, 0)  # no head-to-head votes at all
    assert status["decision"] == "promote" and status["decided_by"] == "ratings (thumbs / stars)"
    assert status["ratings"]["blocks"] >= 20, status["ratings"]
    call(controller.check())
    assert registry.current() == v1
    assert "ratings (thumbs / stars)" in registry.history()[-1].reason


def test_the_incremental_reader_counts_what_one_full_read_counts_across_looks_and_compaction(
        tmp_path):
    """The controller's EvidenceReader reads only what the log gained at each look: votes in the
    WAL, then compacted into Parquet, then more, count once each, as one full read counts them."""
    from ab_helpers import two_versions

    from prefloop.server.ab.evidence import EvidenceReader
    registry, v1 = two_versions(tmp_path)
    state = ab_state.start(registry, v1, force=True)
    reader = EvidenceReader(tmp_path / "data")
    with FeedbackStore(StoreConfig(data_dir=tmp_path / "data")) as store:
        store.record_generation({"response_id": "c", "prompt": "p", "completion": "x",
                                 "model_version": v1})
        store.record_generation({"response_id": "k", "prompt": "p", "completion": "y",
                                 "model_version": "v0000"})
        looks = []
        for batch in range(3):
            for i in range(4):
                store.submit_preference(chosen_response_id="c", rejected_response_id="k",
                                        user_id=f"u{batch}-{i}")
                store.submit_rating(response_id="k", score=-1, user_id=f"u{batch}-{i}")
            looks.append(reader.tally(state))
            if batch == 1:
                store.flush()  # compacted: the same rows now in Parquet, the segments gone
        full = tally(tmp_path / "data", state)
    assert [look.wins for look in looks] == [4, 8, 12]
    assert (looks[-1].wins, looks[-1].losses, looks[-1].thumbs) == (full.wins, full.losses,
                                                                     full.thumbs)
    assert looks[-1].thumbs["v0000"] == {"up": 0, "down": 12}
