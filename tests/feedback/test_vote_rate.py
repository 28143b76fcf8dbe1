"""The per-voter and per-caller rate limits of feedback (server/feedback/vote_rate.py): the token
bucket against a fake clock, and the store's use of it (who a voter is, retries not charged,
refused votes not written)."""
from __future__ import annotations

import pytest
from test_feedback_store import gen_row, open_store

from prefloop.server.errors import ResourceExhausted
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table
from prefloop.server.feedback.vote_rate import ANONYMOUS, VoteRateLimiter, caller_of_token, voter_of


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_the_rate_and_says_when_to_retry():
    clock = Clock()
    limiter = VoteRateLimiter(per_minute=6, burst=3, clock=clock)  # one vote per 10 s
    for _ in range(3):
        limiter.charge("u")
    with pytest.raises(ResourceExhausted, match=r"6 per minute .*try again in 10\.0 s"):
        limiter.charge("u")
    limiter.charge("v")  # another voter has its own bucket
    clock.t += 9.9
    with pytest.raises(ResourceExhausted, match=r"try again in 0\.1 s"):
        limiter.charge("u")
    clock.t += 0.1
    limiter.charge("u")  # refilled one vote in 10 s
    clock.t += 3600
    for _ in range(3):  # a long pause refills to the burst, never beyond
        limiter.charge("u")
    with pytest.raises(ResourceExhausted):
        limiter.charge("u")
    assert limiter.refused == 3


def test_zero_rate_is_no_limit_and_bad_settings_are_refused():
    limiter = VoteRateLimiter(per_minute=0)
    for _ in range(10_000):
        limiter.charge("u")
    assert not limiter.enabled
    with pytest.raises(ValueError, match="per_minute"):
        VoteRateLimiter(per_minute=-1)


def test_forgotten_voters_are_bounded():
    limiter = VoteRateLimiter(per_minute=1, max_voters=100)
    for i in range(1000):
        limiter.charge(f"u{i}")
    assert len(limiter._buckets) == 100


def test_voter_names_never_contain_the_token():
    caller = caller_of_token("secret-token-123")
    assert "secret" not in caller and caller.startswith("token:")
    assert caller_of_token(None) == caller_of_token("") == ANONYMOUS
    assert voter_of(caller, "alice", "tab-1") == f"{caller} user alice"
    assert voter_of(caller, None, "tab-1") == f"{caller} session tab-1"
    assert voter_of(caller, None, None) == caller


def test_store_limits_each_voter_and_the_caller_and_never_charges_a_retry(tmp_path):
    store = open_store(tmp_path / "data", votes_per_minute=2, caller_votes_per_minute=5)
    try:
        for rid in ("a1", "a2", "a3"):
            store.record_generation(gen_row(rid))
        acked = [store.submit_rating(response_id="a1", score=1, user_id="alice",
                                     idempotency_key=f"alice-{i}", caller="token:x")
                 for i in range(2)]
        again = store.submit_rating(response_id="a1", score=1, user_id="alice",
                                    idempotency_key="alice-0", caller="token:x")
        assert again.duplicate and again.feedback_id == acked[0].feedback_id  # not charged
        with pytest.raises(ResourceExhausted, match="user alice"):
            store.submit_rating(response_id="a2", score=-1, user_id="alice", caller="token:x")
        # bob and a browser session behind the same token have their own buckets ...
        store.submit_rating(response_id="a2", score=1, user_id="bob", caller="token:x")
        store.submit_rating(response_id="a2", score=1, session_id="tab-1", caller="token:x")
        store.submit_rating(response_id="a3", score=1, session_id="tab-2", caller="token:x")
        # ... until the token's own bucket (5 a minute, all its voters) is empty
        with pytest.raises(ResourceExhausted, match="token:x"):
            store.submit_rating(response_id="a3", score=1, user_id="carol", caller="token:x")
        store.submit_rating(response_id="a3", score=1, user_id="carol", caller="token:y")
        # carol's refused vote through token:x did not take from her bucket (2 a minute)
        store.submit_rating(response_id="a1", score=1, user_id="carol", caller="token:y")
        store.flush()
        rows = load_table(store.data_dir, logschema.FEEDBACK).to_pylist()
        assert len(rows) == 7  # 2 alice, bob, 2 sessions, 2 carol via token:y; no refused vote
    finally:
        store.close()


def test_a_vote_the_disk_refused_costs_its_voter_nothing(tmp_path):
    import errno
    import os

    from prefloop.server.errors import Unavailable
    store = open_store(tmp_path / "data", votes_per_minute=1)
    try:
        store.record_generation(gen_row("a1"))
        real_write = store.wal._write

        def full(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        store.wal._write = full
        for _ in range(3):  # refused by the disk, not by the limit (one vote a minute)
            with pytest.raises(Unavailable, match="disk full"):
                store.submit_rating(response_id="a1", score=1, user_id="alice")
        store.wal._write = real_write
        store.submit_rating(response_id="a1", score=1, user_id="alice")  # the minute's vote
        with pytest.raises(ResourceExhausted):
            store.submit_rating(response_id="a1", score=1, user_id="alice")
    finally:
        store.close()
