"""The evidence of an A/B test in the feedback log, and the status `ab status` shows.

Head-to-head: form-1 preferences between an answer of each version (`model_versions` of the feedback
row = [chosen's version, rejected's version]); a win when the candidate's answer was chosen. Each
rater's first 5 such votes count, and later ones while the rater holds at most a quarter of the
counted votes and at most 4 times the median other rater's (server/ab/allowance.py); the rest are
shown (`over_cap`) but decide nothing, so one user flooding compare votes cannot decide a test
(alone, a rater cannot reach the default 20 votes a promotion needs) and a small team's test does
not stop growing; which votes count depends only on their order, never on their outcome, so the
sequential rule keeps its level. Per version: thumbs up / down and stars on its answers, and each
user's first rating (thumbs 1 / 0, stars (s - 1) / 4) with its version, in arrival order — what the
ratings test reads (decision.RatingEvidence: one value per user, so a heavy user counts once; a
rating without a user id counts as its session's, else as its own). Only rows since the test started
count; a vote logged twice under one idempotency key (by two replicas at once) counts once.

`EvidenceReader` reads the log incrementally (server/feedback/peers.py following every log of the
data root): each look reads only the records and parts added since the last one and keeps just
the test's rows. Reading the whole log again at every look (every registry poll, 2 s) cost
0.18 s of CPU per look on a 14,500-row log and raised the server's RSS with the log's size
(2026-12-04, the adapter soak of docs/reliability.md). `tally(data_dir, state)` is one full read
(the CLI and `ab status`).
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from prefloop.server.ab import decision
from prefloop.server.ab import state as ab_state
from prefloop.server.ab.allowance import RaterAllowance
from prefloop.server.ab.state import ABState
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.peers import PeerLogs
from prefloop.server.registry import Registry


@dataclass(slots=True)
class Tally:
    wins: int = 0  # head-to-head: candidate's answer chosen
    losses: int = 0  # control's answer chosen
    over_cap: int = 0  # head-to-head votes past their rater's allowance (allowance.py)
    thumbs: dict = field(default_factory=dict)  # version -> {"up": n, "down": n}
    stars: dict = field(default_factory=dict)  # version -> [sum, count]
    first_ratings: list = field(default_factory=list)  # (version, value): each user's first
    # rating, in arrival order

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["first_ratings"]  # one value per user: the status shows the test's summary
        out["thumbs_up_rate"] = {v: (t["up"] / (t["up"] + t["down"]) if t["up"] + t["down"] else None)
                                 for v, t in self.thumbs.items()}
        return out


COLUMNS = ["created_at", "kind", "model_versions", "score", "scale", "user_id", "session_id",
           "feedback_id", "idempotency_key"]


class EvidenceReader:
    """The evidence of the running test, read incrementally (module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._test: tuple | None = None
        self._follower: PeerLogs | None = None
        self._rows: dict[str, dict] = {}  # feedback id -> a row of the test
        self._lock = threading.Lock()  # the controller's looks and an admin's stop may overlap

    def tally(self, state: ABState) -> Tally:
        with self._lock:
            return self._tally(state)

    def _tally(self, state: ABState) -> Tally:
        test = (state.candidate, state.control, state.started_at)
        if test != self._test or self._follower is None:
            self._test, self._rows = test, {}
            self._follower = PeerLogs(self.data_dir, None, follow_own=True,
                                      tables={logschema.FEEDBACK: COLUMNS})
        started = _started_micros(state)
        pair = {state.candidate, state.control}
        for _, row in self._follower.poll():
            versions = row.get("model_versions") or []
            if (row.get("created_at") or 0) >= started and versions and set(versions) <= pair:
                self._rows.setdefault(row["feedback_id"], row)
        return _count(self._rows.values(), state)


def _started_micros(state: ABState) -> int:
    return logschema.to_micros(datetime.fromisoformat(state.started_at.replace("Z", "+00:00")))


def tally(data_dir: Path, state: ABState) -> Tally:
    """The evidence for `state`'s test in the feedback log (rows since it started): one read."""
    return EvidenceReader(data_dir).tally(state)


def _count(rows, state: ABState) -> Tally:
    out = Tally()
    pair = {state.candidate, state.control}
    raters: set[str] = set()
    keys: set[str] = set()
    allowance = RaterAllowance()
    for row in sorted(rows, key=lambda r: (r["created_at"], r["feedback_id"])):
        key = row.get("idempotency_key")
        if key:
            if key in keys:
                continue
            keys.add(key)
        versions = row["model_versions"] or []
        rater = row["user_id"] or row["session_id"] or row["feedback_id"]
        if row["kind"] == "preference" and len(versions) == 2 and set(versions) == pair:
            if not allowance.admit(rater):
                out.over_cap += 1
            elif versions[0] == state.candidate:
                out.wins += 1
            else:
                out.losses += 1
        elif row["kind"] == "rating" and len(versions) == 1 and versions[0] in pair:
            version = versions[0]
            if rater not in raters:
                raters.add(rater)
                value = (1.0 if row["score"] > 0 else 0.0) if row["scale"] == "thumbs" \
                    else (row["score"] - 1) / 4.0
                out.first_ratings.append((version, value))
            if row["scale"] == "thumbs":
                counts = out.thumbs.setdefault(version, {"up": 0, "down": 0})
                counts["up" if row["score"] > 0 else "down"] += 1
            else:
                stars = out.stars.setdefault(version, [0, 0])
                stars[0] += row["score"]
                stars[1] += 1
    return out


def rating_evidence(state: ABState, counts: Tally) -> decision.RatingEvidence:
    return decision.RatingEvidence.of((version == state.candidate, value)
                                      for version, value in counts.first_ratings)


def verdict(state: ABState, counts: Tally) -> decision.Decision:
    """What the rule decides now for `state`'s test on `counts`: the product of the head-to-head
    votes' and the ratings' e-values against the test's level (decision.decide_combined)."""
    return decision.decide_combined(counts.wins, counts.losses, rating_evidence(state, counts),
                                    confidence=state.confidence, min_votes=state.min_votes,
                                    elapsed_s=state.elapsed_s(),
                                    max_duration_s=state.max_duration_s,
                                    futility_win=state.futility_win)


def status(registry: Registry, data_dir: Path) -> dict:
    """What `ab status` shows: the state, the evidence, and the decision the rule takes now."""
    state = ab_state.read_state(registry)
    if state is None:
        return {"running": False}
    out = {"running": state.running, **state.as_dict()}
    if state.running:
        counts = tally(data_dir, state)
        now = verdict(state, counts)
        ratings = rating_evidence(state, counts)
        head_better = now.log_e_better - ratings.log_e_better  # the product's head-to-head factor
        head_worse = now.log_e_worse - ratings.log_e_worse
        out.update(evidence=counts.as_dict(), win_rate=now.win_rate, interval=[now.low, now.high],
                   decision=now.outcome, decision_reason=now.reason, wins=counts.wins,
                   losses=counts.losses, decided_by=now.decided_by,
                   e_better=decision.e_value(now.log_e_better),
                   e_worse=decision.e_value(now.log_e_worse),
                   head_to_head={"e_better": decision.e_value(head_better),
                                 "e_worse": decision.e_value(head_worse)},
                   ratings={"blocks": ratings.blocks, "mean_difference": ratings.mean_difference,
                            "e_better": ratings.e_better, "e_worse": ratings.e_worse,
                            "candidate_users": ratings.candidate_users,
                            "control_users": ratings.control_users})
        if state.futility_win is not None:  # how near the futility stop is (decision.py)
            out["futility"] = {"win": state.futility_win, "ends_at": 1 / decision.FUTILITY_LEVEL,
                               "ratio": decision.e_value(decision.log_futility(
                                   counts.wins, counts.losses, state.futility_win))}
    return out
