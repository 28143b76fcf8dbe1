"""A/B tests on a real `prefloop serve` (default model and a perturbed version of it): 16 streams
through start -> promote with zero failures, each answer naming the version that produced it;
simulated users who prefer the candidate's answers drive it to promotion through blind compare
requests over HTTP; indifferent users do not; a restart mid-test resumes it."""
from __future__ import annotations

import socket

import httpx
import pytest
from adapter_helpers import publish_random_adapter
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from registry_helpers import MAX_TOKENS, QUESTION, Streamers, two_version_registry

from prefloop.clients import Client
from prefloop.server.ab import state as ab_state

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp, port):
    return start_server_process(tmp, "--http-port", str(port), "--registry-poll", "0.3",
                                "--max-concurrent", "32")


@pytest.fixture
def ab_real(tmp_path):
    registry, v1 = two_version_registry(tmp_path)
    port = free_port()
    server = start(tmp_path, port)
    yield tmp_path, registry, v1, server, f"http://127.0.0.1:{port}", port
    server.terminate()


def compare(url: str, i: int) -> list[dict]:
    res = httpx.post(url + "/v1/chat/completions", timeout=120,
                     headers={"Authorization": f"Bearer {USER_TOKEN}"},
                     json={"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "compare": True, "session_id": f"s{i}"})
    assert res.status_code == 200, res.text
    return res.json()["choices"]


def vote(url: str, chosen: dict, rejected: dict) -> None:
    res = httpx.post(url + "/v1/feedback/preference", timeout=30,
                     headers={"Authorization": f"Bearer {USER_TOKEN}"},
                     json={"chosen_response_id": chosen["response_id"],
                           "rejected_response_id": rejected["response_id"]})
    assert res.status_code == 200, res.text


def test_streams_through_start_and_promote_and_users_who_prefer_the_candidate(ab_real):
    tmp, registry, v1, server, url, _ = ab_real
    with Client(server.target, token=ADMIN_TOKEN) as admin, Streamers(server.target, 16) as load:
        assert wait_until(lambda: len(load.results) >= 16, timeout=300)
        status = admin.ab_start(v1, traffic=0.5, min_votes=10, force=True)
        assert status["running"] and status["candidate"] == v1
        # blind compare answers come one from each version; users prefer the candidate's text
        candidate_text = None
        for i in range(40):
            choices = compare(url, i)
            assert {c["model_version"] for c in choices} == {"v0000", v1}
            chosen = next(c for c in choices if c["model_version"] == v1)
            rejected = next(c for c in choices if c["model_version"] == "v0000")
            candidate_text = candidate_text or chosen["message"]["content"]
            assert chosen["message"]["content"] == candidate_text  # greedy: one answer per version
            vote(url, chosen, rejected)
            if registry.current() == v1:
                break
        assert wait_until(lambda: registry.current() == v1, timeout=60), admin.ab_status()
        assert wait_until(lambda: admin.model_info().model_version == v1, timeout=120)
        at_promotion = len(load.results)
        assert wait_until(lambda: len(load.results) >= at_promotion + 16, timeout=300)
    assert load.failures == []
    served = [v for v, _ in load.results]
    assert set(served) == {"v0000", v1} and served[-1] == v1  # every answer names its version
    assert ab_state.read_state(registry).status == ab_state.PROMOTED
    assert "candidate preferred" in registry.history()[-1].reason


def test_indifferent_users_do_not_promote_and_a_restart_resumes_the_test(ab_real):
    tmp, registry, v1, server, url, port = ab_real
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        admin.ab_start(v1, min_votes=10, force=True)
    for i in range(24):  # indifferent in aggregate: as many votes for each version
        choices = compare(url, i)
        by_version = {c["model_version"]: c for c in choices}
        pick, other = (v1, "v0000") if i % 2 else ("v0000", v1)
        vote(url, by_version[pick], by_version[other])
    assert server.terminate() == 0
    restarted = start(tmp, port)
    try:
        with Client(restarted.target, token=ADMIN_TOKEN) as admin:
            status = admin.ab_status()
            assert status["running"] and (status["wins"], status["losses"]) == (12, 12)
            assert status["decision"] == "running" and registry.current() == "v0000"
        versions = {c["model_version"] for c in compare(url, 99)}
        assert versions == {"v0000", v1}  # the candidate is loaded again after the restart
    finally:
        restarted.terminate()


def rate(url: str, user: str, better: str | None, seen: dict[str, int]) -> str:
    """One user chats (sticky by user id, so each user stays on one arm) and rates the answer;
    `seen` counts the answers of each version so far. With `better` set: 👍 when the candidate
    `better` answered, and from the other version 👎 three times in four (greedy answers: one text
    per version, so liking a version is liking its text). With None: 👍 and 👎 in turn within each
    version, whatever answered (exactly indifferent on both arms). Returns the version."""
    res = httpx.post(url + "/v1/chat/completions", timeout=120,
                     headers={"Authorization": f"Bearer {USER_TOKEN}"},
                     json={"messages": QUESTION, "max_tokens": 4, "temperature": 0, "user": user})
    assert res.status_code == 200, res.text
    answer = res.json()["choices"][0]
    version = answer["model_version"]
    k = seen[version] = seen.get(version, 0) + 1
    if better is None:
        score = 1 if k % 2 else -1
    else:
        score = 1 if version == better or k % 4 == 0 else -1
    voted = httpx.post(url + "/v1/feedback/rating", timeout=30,
                       headers={"Authorization": f"Bearer {USER_TOKEN}"},
                       json={"response_id": answer["response_id"], "score": score,
                             "user_id": user})
    assert voted.status_code == 200, voted.text
    return version


def test_thumbs_only_traffic_rejects_nothing_it_cannot_tell_and_promotes_a_liked_candidate(
        ab_real):
    """Issue 28's scripted run: no compare votes at all. Indifferent thumbs from 40 users do not
    promote; then, in a new test, users who like the candidate's answers promote it through the
    ratings test, while 8 streams run through the start, the decision and the swap unfailed.
    The candidate is a LoRA adapter over the served version (what a LoRA job publishes), so it
    runs on the served engine during the test and at once after its promotion (its merged weights
    are then loaded in the background: tests/serving/test_hot_swap.py)."""
    tmp, registry, _, server, url, _ = ab_real
    v1, _ = publish_random_adapter(registry, "v0000", seed=5, scale=0.2)
    with Client(server.target, token=ADMIN_TOKEN) as admin:
        admin.ab_start(v1, traffic=0.5, min_votes=20, force=True)
        flat: dict[str, int] = {}
        served = [rate(url, f"flat-{i}", None, flat) for i in range(40)]
        assert set(served) == {"v0000", v1}
        status = admin.ab_status()
        assert status["running"] and status["decision"] == "running", status
        assert registry.current() == "v0000"  # indifferent thumbs promoted nothing
        admin.ab_stop(reason="indifferent: no decision")
        with Streamers(server.target, 8) as load:
            assert wait_until(lambda: len(load.results) >= 8, timeout=300)
            admin.ab_start(v1, traffic=0.5, min_votes=20, force=True)
            fans: dict[str, int] = {}
            for i in range(400):
                rate(url, f"fan-{i}", v1, fans)
                if registry.current() == v1:
                    break
            assert wait_until(lambda: registry.current() == v1, timeout=60), admin.ab_status()
            assert wait_until(lambda: admin.model_info().model_version == v1, timeout=120)
            at_swap = len(load.results)
            assert wait_until(lambda: len(load.results) >= at_swap + 8, timeout=300)
    assert load.failures == []
    assert [v for v, _ in load.results][-1] == v1
    assert "ratings (thumbs / stars)" in registry.history()[-1].reason
    assert f"{v1} serves as a LoRA adapter on the engine of v0000" in server.log_text()
    assert f"now serving {v1} (an adapter on the engine of v0000)" in server.log_text()
    print(f"thumbs-only A/B: promoted after {i + 1} rated answers from {i + 1} users; "
          f"{len(load.results)} streamed answers, 0 failed")
