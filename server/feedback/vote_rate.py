"""Rate limits of feedback: a token bucket per voter and one per caller, so one person or script
cannot flood the log (and through it the training set and the A/B evidence) with votes.

The caller is the bearer token (a fingerprint of it, never the token; "anonymous" with
authentication off): the only identity the server checks. The voter is the caller together with
the vote's `user_id`, else its `session_id` (the web page sends one per browser tab), so many
people behind one shared token (the page) each get their own bucket, while the caller's bucket
bounds what any one token sends however it varies the ids. `serve` defaults: 60 votes per minute
per voter, 1200 per caller (`--votes-per-minute`, `--token-votes-per-minute`).

Each bucket allows `per_minute` votes per minute on average, with bursts of up to `burst`
(default: a minute's worth) at once; a vote over the limit is refused with `ResourceExhausted` (HTTP 429, gRPC
RESOURCE_EXHAUSTED) saying when the next one is allowed. It is checked after validation and
before the write, and a retry of an already acknowledged idempotency key is never charged.
At most `max_voters` buckets are kept (the least recently used go first; a forgotten voter starts
again with a full bucket). `per_minute` 0 turns the limit off.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

from prefloop.server.errors import ResourceExhausted

ANONYMOUS = "anonymous"


def caller_of_token(token: str | None) -> str:
    """A voter name for a bearer token that never reveals it (the token is a secret)."""
    if not token:
        return ANONYMOUS
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def voter_of(caller: str, user_id: str | None, session_id: str | None) -> str:
    """The voter's bucket name: the caller, with the user id (else the session id) it gave."""
    if user_id:
        return f"{caller} user {user_id}"
    if session_id:
        return f"{caller} session {session_id}"
    return caller


class VoteRateLimiter:
    def __init__(self, per_minute: float, burst: int | None = None,
                 max_voters: int = 100_000, clock=time.monotonic) -> None:
        if per_minute < 0:
            raise ValueError(f"per_minute must be >= 0, got {per_minute}")
        self.per_minute = float(per_minute)
        self.burst = float(burst if burst is not None else max(1.0, per_minute))
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.max_voters = max_voters
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # voter -> (level, t)
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def charge(self, voter: str) -> None:
        """Take one vote from `voter`'s bucket; ResourceExhausted when it is empty."""
        if not self.enabled:
            return
        rate = self.per_minute / 60.0
        with self._lock:
            now = self._clock()
            level, then = self._buckets.pop(voter, (self.burst, now))
            level = min(self.burst, level + (now - then) * rate)
            if level < 1.0:
                self._buckets[voter] = (level, now)
                self.refused += 1
                wait = (1.0 - level) / rate
                raise ResourceExhausted(
                    f"too many votes from {voter}: the limit is {self.per_minute:g} per minute "
                    f"(bursts of {self.burst:g}); try again in {wait:.1f} s")
            self._buckets[voter] = (level - 1.0, now)
            while len(self._buckets) > self.max_voters:
                self._buckets.popitem(last=False)

    def refund(self, voter: str) -> None:
        """Give back the vote `charge` just took (another limit refused the same vote)."""
        if not self.enabled:
            return
        with self._lock:
            if voter in self._buckets:
                level, then = self._buckets[voter]
                self._buckets[voter] = (min(self.burst, level + 1.0), then)
