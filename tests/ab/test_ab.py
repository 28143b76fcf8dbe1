"""Online A/B tests: the always-valid decision rule (closed form, brute force, simulation of many
sequential tests), sticky assignment, the durable state in the registry, and a whole test on an
in-process server (fake engines, real registry, real feedback log): start through HTTP, blind
compare answers from both versions, votes for the candidate, promotion by the rule."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from ab_helpers import VersionedFake, two_versions
from conftest import ADMIN_TOKEN, USER_TOKEN, fake_model

from prefloop.server.ab import decision
from prefloop.server.ab import state as ab_state
from prefloop.server.ab.evidence import tally
from prefloop.server.api.ab_controller import ABController
from prefloop.server.api.auth import AuthConfig
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig
from prefloop.server.errors import FailedPrecondition, InvalidArgument
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.registry import Registry
from prefloop.server.serving.ab_router import ABRouter, assignment_key, goes_to_candidate
from prefloop.server.serving.hot_swap import ModelSwitcher

# ---- the decision rule ---------------------------------------------------------------------------


def test_no_votes_give_the_whole_range_and_keep_running():
    assert decision.one_sided_bounds(0, 0) == (0.0, 1.0)
    assert decision.log_evidence_above(0, 0) == pytest.approx(0.0, abs=1e-12)
    d = decision.decide(0, 0)
    assert d.outcome == decision.RUNNING and d.win_rate is None


def test_binomial_cdf_matches_exact_fractions():
    for n in (1, 7, 60, 400):
        for x in (Fraction(1, 2), Fraction(3, 10), Fraction(77, 100), Fraction(1, 1000)):
            for k in range(-1, n + 1, max(1, n // 23)):
                exact = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(k + 1))
                got = decision.log_binomial_cdf(k, n, float(x))
                if exact > Fraction(1, 10 ** 300):
                    assert math.exp(got) == pytest.approx(float(exact), rel=1e-9, abs=1e-15)
                else:
                    assert got < -600


def test_evidence_is_the_one_sided_mixture_integral():
    """E+(p0) against the integral itself, by the midpoint rule (independent of the closed form)."""
    def integral(wins, losses, p0, steps=20000):
        width = (1 - p0) / steps
        total = 0.0
        for i in range(steps):
            q = p0 + (i + 0.5) * width
            total += math.exp(wins * math.log(q / p0) + losses * math.log((1 - q) / (1 - p0))) \
                * 6 * q * (1 - q) * width
        return total / (1 - (3 * p0 ** 2 - 2 * p0 ** 3))  # Beta(2, 2) mass above p0
    for wins, losses, p0 in ((10, 3, 0.5), (30, 20, 0.4), (5, 9, 0.6), (0, 4, 0.5)):
        assert decision.log_evidence_above(wins, losses, p0) == pytest.approx(
            math.log(integral(wins, losses, p0)), abs=1e-6)
        assert decision.log_evidence_below(losses, wins, 1 - p0) == pytest.approx(
            decision.log_evidence_above(wins, losses, p0))


def test_bounds_are_where_the_evidence_crosses_one_over_alpha():
    """Brute force over a fine grid (an independent check of the bisection)."""
    alpha = 0.05
    for wins, losses in ((12, 3), (30, 30), (5, 40), (100, 70)):
        low, high = decision.one_sided_bounds(wins, losses, 1 - alpha)
        grid = [i / 4000 for i in range(1, 4000)]
        above = [p for p in grid if decision.log_evidence_above(wins, losses, p) < math.log(1 / alpha)]
        below = [p for p in grid if decision.log_evidence_below(wins, losses, p) < math.log(1 / alpha)]
        assert abs(above[0] - low) < 3e-4 and abs(below[-1] - high) < 3e-4
        assert low < wins / (wins + losses) < high


def test_closed_form_all_wins():
    """W wins, 0 losses: E+(1/2) = 2 * 2^W * B(W+2, 2) / B(2, 2) * P(Bin(W+3, 1/2) <= W+1)
    = 12 * 2^W / ((W+2)(W+3)) * (1 - (W+4) / 2^(W+3))."""
    alpha = 0.05
    for wins in (1, 8, 40):
        closed = 12 * 2 ** wins / ((wins + 2) * (wins + 3)) * (1 - (wins + 4) / 2 ** (wins + 3))
        assert decision.log_evidence_above(wins, 0) == pytest.approx(math.log(closed))
    first = next(w for w in range(1, 100)
                 if 12 * 2 ** w / ((w + 2) * (w + 3)) * (1 - (w + 4) / 2 ** (w + 3)) >= 1 / alpha)
    assert first == 8  # a lucky streak of 8: why a promotion needs --min-votes as well
    assert decision.decide(first, 0, min_votes=1).outcome == decision.PROMOTE
    assert decision.decide(first - 1, 0, min_votes=1).outcome == decision.RUNNING
    assert decision.decide(40, 0, min_votes=20).outcome == decision.PROMOTE
    assert decision.decide(40, 0, min_votes=50).outcome == decision.RUNNING  # too few votes
    assert decision.decide(0, 40).outcome == decision.REJECT


def test_coin_flip_record_keeps_running_until_max_duration():
    d = decision.decide(50, 50, elapsed_s=10, max_duration_s=100)
    assert d.outcome == decision.RUNNING and d.low < 0.5 < d.high
    late = decision.decide(50, 50, elapsed_s=101, max_duration_s=100)
    assert late.outcome == decision.REJECT and "undecided" in late.reason


def test_decision_is_exactly_the_evidence_at_one_half_over_threshold_and_agrees_with_the_bounds():
    """decide() promotes iff log E+(1/2) >= log(1/alpha), rejects iff log E-(1/2) does, and the
    one-sided bounds leave 1/2 exactly then (checked on a grid); the promotions form an
    upward-closed set in the wins, so the simulation below may use per-n boundaries."""
    thr = math.log(1 / 0.05)
    for wins in range(0, 61):
        for losses in range(0, 61):
            d = decision.decide(wins, losses, min_votes=1)
            promote = decision.log_evidence_above(wins, losses) >= thr
            assert (d.outcome == decision.PROMOTE) == promote == (d.low > 0.5), (wins, losses)
            reject = decision.log_evidence_below(wins, losses) >= thr
            assert (d.outcome == decision.REJECT) == reject == (d.high < 0.5), (wins, losses)
            if promote and losses:  # more wins of the same number of votes promote too
                assert decision.log_evidence_above(wins + 1, losses - 1) >= thr


def test_the_benchmarks_copy_of_the_rule_decides_as_decide_does():
    """benchmarks/ab_votes.py skips the bounds decide() computes for display; same outcomes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from ab_votes import now_head
    for wins in range(0, 45):
        for losses in range(0, 45):
            assert now_head(wins, losses, 0.05, 20) == decision.decide(
                wins, losses, min_votes=20).outcome, (wins, losses)


def promotion_boundaries(max_votes: int, alpha: float) -> list[int]:
    """For each n, the fewest wins of n votes that the rule promotes on (n + 1 if none)."""
    thr, out = math.log(1 / alpha), []
    for n in range(max_votes + 1):
        lo, hi = 0, n + 1  # bisection: promote(lo) is False or lo == 0 ... promote(hi) True
        while lo < hi:
            mid = (lo + hi) // 2
            if decision.log_evidence_above(mid, n - mid) >= thr:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def simulate(p: float, tests: int, max_votes: int, seed: int, min_votes: int = 20,
             alpha: float = 0.05) -> tuple[int, int]:
    """(promotions, rejections) over `tests` sequential tests looking after every vote. A
    rejection is a promotion with wins and losses swapped, so one table serves both."""
    rng = random.Random(seed)
    bound = promotion_boundaries(max_votes, alpha)
    promoted = rejected = 0
    for _ in range(tests):
        wins = losses = 0
        for n in range(1, max_votes + 1):
            if rng.random() < p:
                wins += 1
            else:
                losses += 1
            if wins >= bound[n] and n >= min_votes:
                promoted += 1
                break
            if losses >= bound[n]:
                rejected += 1
                break
    return promoted, rejected


def test_candidates_no_better_promote_at_most_alpha_of_the_time_despite_looking_after_every_vote():
    for p, seed in ((0.5, 1), (0.45, 5)):  # the null is "win rate <= 1/2", not only "= 1/2"
        promoted, _ = simulate(p, tests=2000, max_votes=400, seed=seed)
        assert promoted / 2000 <= 0.05, (p, promoted)
    # a fixed-n 95% interval looked at after every vote would promote far more often
    naive = 0
    rng = random.Random(1)
    for _ in range(2000):
        wins = 0
        for n in range(1, 401):
            wins += rng.random() < 0.5
            if n >= 20 and (wins / n - 0.5) / math.sqrt(0.25 / n) > 1.96:
                naive += 1
                break
    assert naive / 2000 > 0.10, naive  # why the always-valid sequence is needed


def test_clear_winner_promotes_and_clear_loser_is_rejected():
    promoted, _ = simulate(0.75, tests=300, max_votes=400, seed=2)
    assert promoted / 300 >= 0.95
    _, rejected = simulate(0.25, tests=300, max_votes=400, seed=3)
    assert rejected / 300 >= 0.95


def test_futility_is_the_likelihood_ratio_of_one_half_against_the_stated_win_rate():
    for wins, losses in ((0, 0), (23, 24), (30, 10), (5, 40)):
        expected = math.log(0.5 ** (wins + losses) / (0.65 ** wins * 0.35 ** losses))
        assert decision.log_futility(wins, losses, 0.65) == pytest.approx(expected)
    with pytest.raises(ValueError, match="futility win rate"):
        decision.log_futility(1, 1, 0.5)


def test_a_test_ends_for_futility_once_the_votes_are_ten_times_likelier_at_one_half():
    need = math.log(1 / decision.FUTILITY_LEVEL)
    still = decision.decide(20, 20, confidence=0.99, futility_win=0.65)  # ratio 6.6: runs on
    assert decision.log_futility(20, 20, 0.65) < need and still.outcome == decision.RUNNING
    ended = decision.decide(25, 25, confidence=0.99, futility_win=0.65)  # 10.6
    assert decision.log_futility(25, 25, 0.65) >= need
    assert (ended.outcome, ended.decided_by) == (decision.REJECT, decision.FUTILE)
    assert "10.6 times likelier at a win rate of 1/2 than at 0.65" in ended.reason
    assert "the current version stays" in ended.reason
    assert decision.decide(25, 25, confidence=0.99).outcome == decision.RUNNING  # off by default
    # ratings that lean the candidate's way keep it running: they may still promote it
    leaning = decision.RatingEvidence.of([(True, 1.0), (False, 0.0)] * 6)
    assert leaning.log_e_better > 0
    kept = decision.decide_combined(25, 25, leaning, confidence=0.99, futility_win=0.65)
    assert kept.outcome == decision.RUNNING


def test_a_candidate_winning_the_stated_rate_is_ended_for_futility_at_most_a_tenth_of_the_time():
    """Ville's bound for the likelihood ratio, looked at after every vote: at the win rate the
    test looks for at most FUTILITY_LEVEL of tests end for futility; above it fewer (at 0.72,
    under half of that on these seeds); at one half nearly all do, within a few hundred votes."""
    def futile_share(p: float, seed: int, tests: int = 2000, votes: int = 400) -> float:
        rng, ended = random.Random(seed), 0
        for _ in range(tests):
            wins = losses = 0
            for _ in range(votes):
                if rng.random() < p:
                    wins += 1
                else:
                    losses += 1
                if decision.log_futility(wins, losses, 0.65) >= math.log(10):
                    ended += 1
                    break
        return ended / tests
    assert futile_share(0.65, 1) <= decision.FUTILITY_LEVEL
    assert futile_share(0.72, 2) <= decision.FUTILITY_LEVEL / 2
    assert futile_share(0.5, 3, tests=300) >= 0.99


# ---- sticky assignment ---------------------------------------------------------------------------

def test_sticky_assignment_is_stable_and_splits_by_traffic():
    assert assignment_key("user", "alice", "s1") == "alice"
    assert assignment_key("session", "alice", "s1") == "s1"
    assert assignment_key("user", "", "s1") == "s1"
    assert assignment_key("request", "alice", "s1") is None
    picks = [goes_to_candidate(f"user-{i}", 0.2, "salt") for i in range(10000)]
    assert abs(sum(picks) / 10000 - 0.2) < 0.02
    assert picks == [goes_to_candidate(f"user-{i}", 0.2, "salt") for i in range(10000)]
    assert picks != [goes_to_candidate(f"user-{i}", 0.2, "other") for i in range(10000)]


# ---- durable state ---------------------------------------------------------------------------------

def test_start_needs_a_gate_pass_unless_forced(tmp_path):
    registry, v1 = two_versions(tmp_path, gate_passed=False)
    with pytest.raises(FailedPrecondition, match="--force"):
        ab_state.start(registry, v1)
    state = ab_state.start(registry, v1, force=True, traffic=0.3)
    assert (state.candidate, state.control, state.traffic) == (v1, "v0000", 0.3)
    with pytest.raises(FailedPrecondition, match="running"):
        ab_state.start(registry, v1, force=True)
    with pytest.raises(InvalidArgument):
        ab_state.ABState(candidate=v1, control="v0000", traffic=1.5)


def test_state_survives_a_restart_and_conclusions_write_history(tmp_path):
    registry, v1 = two_versions(tmp_path)
    ab_state.start(registry, v1)
    again = Registry(tmp_path / "data")  # a restarted server reads it back
    assert ab_state.running_state(again).candidate == v1
    ab_state.conclude(again, ab_state.REJECTED, "candidate worse: [0.1, 0.4]")
    assert registry.current() == "v0000" and ab_state.running_state(registry) is None
    assert registry.served_stack() == ["v0000"]  # the reject line does not touch rollbacks
    ab_state.start(registry, v1)
    ab_state.conclude(registry, ab_state.PROMOTED, "candidate preferred: [0.6, 0.9] over 40 votes",
                      wins=30, losses=10)
    assert registry.current() == v1
    lines = [(e.action, e.version) for e in registry.history()]
    assert lines[-2:] == [("ab-reject", "v0000"), ("promote", v1)]
    assert "0.6, 0.9" in registry.history()[-1].reason
    assert ab_state.read_state(registry).status == ab_state.PROMOTED


def test_the_states_futility_win_is_validated_kept_and_decides_its_verdict(tmp_path):
    from prefloop.server.ab.evidence import Tally, verdict
    registry, v1 = two_versions(tmp_path)
    with pytest.raises(InvalidArgument, match="futility_win must be in"):
        ab_state.start(registry, v1, futility_win=0.5)
    ab_state.start(registry, v1, futility_win=0.65, confidence=0.99)
    state = ab_state.running_state(Registry(tmp_path / "data"))  # read back as a server would
    assert state.futility_win == 0.65
    assert verdict(state, Tally(wins=25, losses=25)).decided_by == decision.FUTILE
    assert verdict(dataclasses.replace(state, futility_win=None),  # a state written before it
                   Tally(wins=25, losses=25)).outcome == decision.RUNNING


def test_duration_parsing():
    assert ab_state.parse_duration("7d") == 7 * 86400
    assert ab_state.parse_duration("90m") == 5400
    with pytest.raises(InvalidArgument):
        ab_state.parse_duration("soon")


# ---- a whole test on an in-process server -------------------------------------------------------------

@pytest.fixture
def ab_server(tmp_path):
    registry, v1 = two_versions(tmp_path)
    control = VersionedFake("v0000", "ctrl")
    store = FeedbackStore(StoreConfig(data_dir=tmp_path / "data"))
    router = ABRouter(control, registry.version_dir)
    controller = ABController(registry, router, tmp_path / "data", poll_s=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = ServerConfig(port=0, http_port=0, data_dir=tmp_path / "data",
                       auth=AuthConfig(user_tokens=(USER_TOKEN,), admin_tokens=(ADMIN_TOKEN,)))

    async def build():
        server = PrefloopServer(control, cfg, recorder=store, feedback_store=store,
                                router=router, ab=controller,
                                switcher=ModelSwitcher(control, registry, poll_interval_s=0))
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    url = f"http://127.0.0.1:{server.http_port}"

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)
    call.grpc_target = f"127.0.0.1:{server.port}"  # the same server's gRPC API

    yield url, registry, v1, controller, call
    call(server.shutdown(0))
    call(controller.close())
    store.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def post(url, path, body, token=USER_TOKEN):
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                      timeout=30)


def test_votes_for_the_candidate_promote_it(ab_server):
    url, registry, v1, controller, call = ab_server
    assert post(url, "/v1/admin/ab/start", {"candidate": v1}, USER_TOKEN).status_code == 403
    started = post(url, "/v1/admin/ab/start", {"candidate": v1, "traffic": 0.5, "min_votes": 10},
                   ADMIN_TOKEN)
    assert started.status_code == 200, started.text
    assert started.json()["running"] and started.json()["candidate"] == v1
    # sticky: one user always sees one version, and both versions get users (the hash is salted
    # with the test's start time, so 24 users make "all on one side" a 2^-23 event, not 2^-7)
    seen = {}
    for user in (f"user{i}" for i in range(24)):
        versions = {post(url, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                          "user": user}).json()["model_version"] for _ in range(2)}
        assert len(versions) == 1
        seen[user] = versions.pop()
    assert set(seen.values()) == {"v0000", v1}
    # blind compare: one answer from each version, votes for the candidate's
    for i in range(30):
        reply = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}],
                                                   "max_tokens": 2, "compare": True}).json()
        choices = reply["choices"]
        assert {c["model_version"] for c in choices} == {"v0000", v1}
        assert all(("cand" in c["message"]["content"]) == (c["model_version"] == v1) for c in choices)
        chosen = next(c for c in choices if c["model_version"] == v1)
        rejected = next(c for c in choices if c["model_version"] == "v0000")
        vote = post(url, "/v1/feedback/preference", {"chosen_response_id": chosen["response_id"],
                                                     "rejected_response_id": rejected["response_id"]})
        assert vote.status_code == 200
    status = httpx.get(url + "/v1/admin/ab", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert (status["wins"], status["losses"], status["decision"]) == (30, 0, "promote")
    call(controller.check())  # one look of the controller
    assert registry.current() == v1
    assert ab_state.read_state(registry).status == ab_state.PROMOTED
    assert "candidate preferred" in registry.history()[-1].reason
    assert controller.router.candidate is None  # the losing engine is unloaded


def test_grpc_compare_requests_get_a_blind_pair_during_a_test_and_one_answer_without(ab_server):
    """gRPC Chat / ChatStream with compare=True: during an A/B test one answer from each version
    (each completion and chunk names its version), whose preference vote counts head-to-head;
    compare with n > 1 is refused; without a test, one answer as usual."""
    from prefloop.clients import Client
    from prefloop.clients.errors import InvalidArgument as InvalidArgumentError
    url, registry, v1, controller, call = ab_server
    hi = [{"role": "user", "content": "hi"}]
    with Client(call.grpc_target, token=USER_TOKEN) as client:
        alone = client.chat(hi, max_tokens=2, compare=True)
        assert [c.model_version for c in alone.completions] == ["v0000"]
        assert post(url, "/v1/admin/ab/start", {"candidate": v1, "min_votes": 10},
                    ADMIN_TOKEN).status_code == 200
        orders = set()
        for i in range(12):
            pair = client.chat([{"role": "user", "content": f"q{i}"}], max_tokens=2, compare=True,
                               user_id=f"u{i}")
            versions = [c.model_version for c in pair.completions]
            assert sorted(versions) == sorted(["v0000", v1]), versions
            assert all(("cand" in c.text) == (c.model_version == v1) for c in pair.completions)
            orders.add(tuple(versions))
            cand = next(c for c in pair.completions if c.model_version == v1)
            ctrl = next(c for c in pair.completions if c.model_version == "v0000")
            vote = post(url, "/v1/feedback/preference",  # (this server's feedback is HTTP)
                        {"chosen_response_id": cand.response_id,
                         "rejected_response_id": ctrl.response_id, "user_id": f"u{i}"})
            assert vote.status_code == 200, vote.text
        assert len(orders) == 2  # random order: 2^-11 to see one order twelve times
        chunks = list(client.chat_stream(hi, max_tokens=2, compare=True))
        by_index = {c.index: c.model_version for c in chunks}
        assert sorted(by_index.values()) == sorted(["v0000", v1])
        with pytest.raises(InvalidArgumentError, match="one answer per version"):
            client.chat(hi, max_tokens=2, compare=True, n=2)
    status = httpx.get(url + "/v1/admin/ab", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert (status["wins"], status["losses"]) == (12, 0)


def test_a_damaged_state_file_serves_current_alone_until_a_forced_start(ab_server):
    url, registry, v1, controller, call = ab_server
    started = post(url, "/v1/admin/ab/start", {"candidate": v1, "traffic": 0.5}, ADMIN_TOKEN)
    assert started.status_code == 200 and controller.router.candidate is not None
    (registry.root / ab_state.AB_FILE).write_text('{"candidate": "v00')  # torn by hand
    with pytest.raises(FailedPrecondition, match="A/B state .* is damaged"):
        ab_state.read_state(registry)
    call(controller.check())  # no exception: the damaged test is not followed
    assert controller.router.candidate is None
    versions = {post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 2, "user": u}).json()["model_version"]
                for u in ("ann", "bob", "cid", "dan", "eve", "fay")}
    assert versions == {"v0000"}
    refused = post(url, "/v1/admin/ab/start", {"candidate": v1}, ADMIN_TOKEN)
    assert refused.status_code == 409 and "damaged" in refused.json()["error"]["message"]
    again = post(url, "/v1/admin/ab/start", {"candidate": v1, "force": True}, ADMIN_TOKEN)
    assert again.status_code == 200 and ab_state.read_state(registry).running


def test_indifferent_votes_do_not_promote_and_stop_keeps_current(ab_server):
    url, registry, v1, controller, call = ab_server
    assert post(url, "/v1/admin/ab/start", {"candidate": v1, "min_votes": 10}, ADMIN_TOKEN).status_code == 200
    rng = random.Random(0)
    for i in range(40):
        choices = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}],
                                                     "max_tokens": 2, "compare": True}).json()["choices"]
        a, b = rng.sample(choices, 2)
        post(url, "/v1/feedback/preference", {"chosen_response_id": a["response_id"],
                                              "rejected_response_id": b["response_id"]})
    state = call(controller.check())
    assert state.running and registry.current() == "v0000"
    counts = tally(controller.data_dir, state)
    assert counts.wins + counts.losses == 40
    stopped = post(url, "/v1/admin/ab/stop", {"outcome": "reject", "reason": "enough"}, ADMIN_TOKEN)
    assert stopped.json()["status"] == ab_state.REJECTED and registry.current() == "v0000"
    assert post(url, "/v1/admin/ab/stop", {}, ADMIN_TOKEN).status_code == 404  # none running


def test_an_admin_test_with_a_futility_win_ends_rejected_on_even_votes(ab_server):
    url, registry, v1, controller, call = ab_server
    for bad, why in (({"futility_win": "high"}, "futility_win must be a number"),
                     ({"futility_win": 0.5}, "futility_win must be in (0.5, 1)")):
        refused = post(url, "/v1/admin/ab/start", {"candidate": v1, **bad}, ADMIN_TOKEN)
        assert refused.status_code == 400 and why in refused.json()["error"]["message"]
    assert ab_state.read_state(registry) is None  # nothing started
    started = post(url, "/v1/admin/ab/start", {"candidate": v1, "futility_win": 0.7},
                   ADMIN_TOKEN)
    assert started.status_code == 200 and started.json()["futility_win"] == 0.7
    for i in range(40):  # 20-20: 33 times likelier at 1/2 than at 0.7 (10 from 13-14 on)
        choices = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}],
                                                     "max_tokens": 2, "compare": True,
                                                     "user": f"u{i}"}).json()["choices"]
        by_version = {c["model_version"]: c["response_id"] for c in choices}
        chosen, rejected = (v1, "v0000") if i % 2 else ("v0000", v1)
        post(url, "/v1/feedback/preference", {"chosen_response_id": by_version[chosen],
                                              "rejected_response_id": by_version[rejected]})
    state = call(controller.check())
    assert state.status == ab_state.REJECTED and registry.current() == "v0000"
    assert "ended for futility" in state.reason and "at 0.7" in state.reason
    assert registry.history()[-1].action == "ab-reject"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefloop.cli", "models", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_starts_shows_and_stops_a_test_on_the_data_dir(tmp_path):
    registry, v1 = two_versions(tmp_path, gate_passed=False)
    data = str(tmp_path / "data")
    refused = cli("ab", "start", v1, "--data-dir", data)
    assert refused.returncode == 1 and "--force" in refused.stderr
    started = cli("ab", "start", v1, "--data-dir", data, "--force", "--traffic", "0.5",
                  "--futility-win", "0.7", "--json")
    assert started.returncode == 0, started.stderr
    status = json.loads(started.stdout)
    assert (status["running"], status["candidate"], status["traffic"], status["futility_win"]) \
        == (True, v1, 0.5, 0.7)
    text = cli("ab", "status", "--data-dir", data).stdout
    assert "ends for futility below win rate 0.7" in text
    assert "futility: the head-to-head votes are 1 times likelier at a win rate of 1/2 than at " \
        "0.7; ends at 10" in text
    assert "0 wins, 0 losses" in text and "decision now: running" in text
    assert "one-sided 95% always-valid bounds [0.000, 1.000]; e-value 1" in text
    assert "together (head-to-head x ratings): e-value 1, promotes at 20" in text
    stopped = cli("ab", "stop", "--reject", "--data-dir", data, "--reason", "not better")
    assert stopped.returncode == 0 and "rejected" in stopped.stdout
    assert registry.current() == "v0000" and registry.history()[-1].action == "ab-reject"
    promote = cli("promote", v1, "--data-dir", data)
    assert promote.returncode == 1 and "pass --force" in promote.stderr


def test_a_job_promoting_via_ab_starts_a_test_instead_of_promoting(tmp_path):
    from prefloop.align.gate import Check, GateDecision
    from prefloop.align.jobs import runner

    registry, v1 = two_versions(tmp_path, gate_passed=True)
    result = runner.JobResult(job_id="job-1", status="running", version=v1)
    runner.conclude(result, GateDecision(True, [Check("test", True, "accuracy up")]), registry,
                    "job-1", "dpo",
                    promote=True, promote_via="ab")
    assert result.status == runner.PUBLISHED and "A/B test started against v0000" in result.reason
    assert registry.current() == "v0000"
    state = ab_state.running_state(registry)
    assert state.candidate == v1 and state.control == "v0000"
    other = runner.JobResult(job_id="job-2", status="running", version=v1)
    ab_state.conclude(registry, ab_state.STOPPED, "test over")
    runner.conclude(other, GateDecision(True, [Check("test", True, "ok")]), registry, "job-2",
                    "dpo", promote=True)
    assert other.status == runner.PROMOTED and registry.current() == v1  # via the gate: at once


def test_promote_via_auto_tests_an_inconclusive_but_safe_candidate_on_live_traffic(tmp_path):
    """--promote-via auto: a clear offline win promotes at once; a candidate that failed only the
    comparison, and not measurably worse, starts an A/B test at 10 % traffic (or --ab-traffic);
    a worse one, or one over a KL bound or short of held-out pairs, is rejected."""
    from prefloop.align.gate import Check, GateConfig, GateDecision, PairedResult
    from prefloop.align.jobs import runner

    def verdict(comparison_passed: bool, upper: float, *failed_extra: str) -> GateDecision:
        checks = [Check("min_heldout", "min_heldout" not in failed_extra, "held-out"),
                  Check("implicit_either", comparison_passed, "comparison"),
                  Check("max_kl", "max_kl" not in failed_extra, "kl"),
                  Check("max_root_kl", "max_root_kl" not in failed_extra, "root kl"),
                  Check("degeneration", "degeneration" not in failed_extra, "loops"),
                  Check("season", None, "reported: decision 1")]
        passed = all(c.passed is not False for c in checks)
        return GateDecision(passed, checks, "policy", "implicit_either", "v0000", 30,
                            paired=PairedResult(14, 12, 4, 0.34, upper))

    assert runner.inconclusive_but_safe(verdict(False, 0.72))
    assert not runner.inconclusive_but_safe(verdict(False, 0.45))  # measurably worse
    assert not runner.inconclusive_but_safe(verdict(False, 0.72, "max_kl"))
    assert not runner.inconclusive_but_safe(verdict(False, 0.72, "max_root_kl"))
    assert not runner.inconclusive_but_safe(verdict(False, 0.72, "min_heldout"))
    assert not runner.inconclusive_but_safe(verdict(False, 0.72, "degeneration"))
    assert not runner.inconclusive_but_safe(verdict(True, 0.9))  # a pass promotes instead
    unchanged = dataclasses.replace(verdict(False, 1.0), paired=PairedResult(0, 0, 30, 0.0, 1.0))
    assert not runner.inconclusive_but_safe(unchanged)  # every pair tied: nothing to A/B test

    registry, v1 = two_versions(tmp_path, gate_passed=None)  # the manifest's gate: the verdicts'
    worse = runner.JobResult(job_id="job-0", status="running", version=v1)
    runner.conclude(worse, verdict(False, 0.45), registry, "job-0", "dpo", promote=True,
                    promote_via="auto")
    assert worse.status == runner.REJECTED and ab_state.running_state(registry) is None
    result = runner.JobResult(job_id="job-1", status="running", version=v1)
    runner.conclude(result, verdict(False, 0.72), registry, "job-1", "dpo", promote=True,
                    promote_via="auto")
    assert result.status == runner.PUBLISHED and registry.current() == "v0000"
    assert "inconclusive offline but safe: A/B test started against v0000 at 10% traffic" \
        in result.reason
    state = ab_state.running_state(registry)
    assert (state.candidate, state.traffic, state.futility_win) == (v1, 0.1, 0.7)
    assert "it ends for futility if the candidate looks to win fewer than 0.7" in result.reason
    ab_state.conclude(registry, ab_state.STOPPED, "test over")
    no_stop = runner.JobResult(job_id="job-1a", status="running", version=v1)
    runner.conclude(no_stop, verdict(False, 0.72), registry, "job-1a", "dpo", promote=True,
                    promote_via="auto", stated=GateConfig(ab_futility_win=0.0))
    assert ab_state.running_state(registry).futility_win is None  # --ab-futility-win 0
    assert "futility" not in no_stop.reason
    ab_state.conclude(registry, ab_state.STOPPED, "test over")
    # in a season (align/season.py) the test shares the job's decision: the rest of its level,
    # spread by the offline p-value (here 2 x the sign test's 0.2: the default metric's two tests)
    from prefloop.align import season
    leaning = dataclasses.replace(verdict(False, 0.72), season_decision=2,
                                  paired=PairedResult(14, 12, 4, 0.34, 0.72, p_value=0.2))
    seasoned = runner.JobResult(job_id="job-1b", status="running", version=v1, gate={})
    runner.conclude(seasoned, leaning, registry, "job-1b", "dpo", promote=True,
                    promote_via="auto", stated=GateConfig(ab_traffic=0.3))
    level = season.ab_level(GateConfig(), 2, 0.4)  # tests/align/test_season.py checks b(p)
    assert season.ab_level(GateConfig(), 2, 1.0) < level < season.ab_level(GateConfig(), 2, 0.2)
    seasoned_state = ab_state.running_state(registry)
    assert seasoned_state.confidence == pytest.approx(1 - level)
    assert seasoned_state.traffic == 0.3  # --ab-traffic
    assert seasoned.gate == {"ab_decision": 2, "ab_confidence": pytest.approx(1 - level)}
    assert (f"at 30% traffic, the season's decision 2 (its share for the offline p-value 0.4) "
            f"at confidence {1 - level:.4g}") in seasoned.reason
    ab_state.conclude(registry, ab_state.STOPPED, "test over")
    # --season-spending separate (the rule before 2026-12-06): the test is the next decision
    apart = runner.JobResult(job_id="job-1c", status="running", version=v1, gate={})
    runner.conclude(apart, leaning, registry, "job-1c", "dpo", promote=True, promote_via="auto",
                    stated=GateConfig(spending="separate"))
    assert apart.gate == {"ab_decision": 3, "ab_confidence": pytest.approx(1 - 0.05 / (3 * 4))}
    assert "the season's decision 3 at confidence 0.9958" in apart.reason
    ab_state.conclude(registry, ab_state.STOPPED, "test over")
    win = runner.JobResult(job_id="job-2", status="running", version=v1)
    runner.conclude(win, verdict(True, 0.9), registry, "job-2", "dpo", promote=True,
                    promote_via="auto")
    assert win.status == runner.PROMOTED and registry.current() == v1


def test_the_versions_route_shows_the_live_votes_verdict(ab_server):
    url, registry, v1, controller, call = ab_server
    ab_state.start(registry, v1, min_votes=10)
    ab_state.record_tally(registry, 7, 3)
    res = httpx.get(url + "/v1/admin/versions", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    (cand,) = [v for v in res.json()["versions"] if v["version"] == v1]
    assert cand["metrics"]["ab"] == {"status": "running", "wins": 7, "losses": 3,
                                     "win_rate": 0.7, "against": "v0000"}
    assert cand["summary"]["ab_win_rate"] == 0.7  # what the page plots


def test_models_trend_and_list_show_gate_numbers_with_intervals(tmp_path):
    registry = Registry(tmp_path / "data")
    registry.ensure_base(fake_model(tmp_path / "base"))
    with registry.stage() as stage:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (stage.path / name).write_bytes((tmp_path / "base" / name).read_bytes() + b" ")
        gate = {"passed": True, "reasons": ["ok"], "win_rate": 0.8, "interval": [0.61, 0.93],
                "wins": 16, "losses": 4, "candidate_accuracy": 0.7}
        v1 = stage.publish(kind="policy", method="dpo", parent="v0000", gate=gate).version
    registry.promote(v1)
    data = str(tmp_path / "data")
    listing = cli("list", "--data-dir", data)
    assert "0.800 [0.61, 0.93] 20" in listing.stdout, listing.stdout
    trend = cli("trend", "--data-dir", data, "--plot", str(tmp_path / "trend.png"))
    assert trend.returncode == 0, trend.stderr
    rows = trend.stdout.splitlines()[1:]
    assert [r.split()[1] for r in rows] == ["v0000", v1]
    assert "0.800 [0.61, 0.93] 20" in rows[1] and "0.700" in rows[1]
    assert (tmp_path / "trend.png").read_bytes()[:4] == b"\x89PNG"


def test_align_jobs_shows_each_jobs_gate_numbers_with_interval_and_kl(tmp_path):
    from prefloop.align.jobs import runner
    registry = Registry(tmp_path / "data")
    reasons = ["35 held-out pairs (>= 20)", "implicit reward vs v0000, failed: either test",
               "KL to the reference 0.0312 nats/token <= bound 0.5", "reported: an aside"]
    gate = {"passed": False, "reasons": reasons, "failed": [reasons[1]], "win_rate": 0.6,
            "interval": [0.44, 0.74], "wins": 21, "losses": 14}
    runner.record_job(registry, {"job_id": "job-a", "status": "rejected", "method": "dpo",
                                 "base": "v0000", "gate": gate, "reason": "; ".join(reasons),
                                 "data": {"rows": {"train": 141, "heldout": 35}},
                                 "metrics": {"heldout": {"kl_per_token": 0.0312}}})
    out = subprocess.run([sys.executable, "-m", "prefloop.cli", "align", "jobs", "--data-dir",
                          str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("job-a")]
    assert "0.600 [0.44, 0.74] 35" in row and "0.0312" in row and "141/35" in row
    assert row.rstrip().endswith("implicit reward vs v0000, failed: either test")  # the failed check
