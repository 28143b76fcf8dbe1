"""The A/B test's durable state, kept in the registry folder so it survives restarts and every
server on the data dir follows it.

    <data-dir>/registry/AB.json    the running (or last) A/B test: settings, status, last decision

Written atomically (temp + fsync + rename) under the registry's pointer lock, like CURRENT. A
decision is concluded once: promotion moves CURRENT through `Registry.promote` (a history line
whose reason names the evidence); a rejection appends an `ab-reject` history line (CURRENT, and so
the served version, stays). Starting a test needs a policy version that passed the offline gate,
unless forced.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

from prefloop.server.durable_io import append_line_durable, utc_now, write_file_atomic
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from prefloop.server.registry import KIND_POLICY, Registry

AB_FILE = "AB.json"
STICKY = ("user", "session", "request")
RUNNING, PROMOTED, REJECTED, STOPPED = "running", "promoted", "rejected", "stopped"


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = str(text).strip()
    try:
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
        else:
            seconds = float(text)
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a duration (e.g. 90s, 30m, 12h, 7d)") from None
    if seconds <= 0:
        raise InvalidArgument(f"duration {text!r} must be positive")
    return seconds


@dataclass(slots=True)
class ABState:
    candidate: str
    control: str  # the version current when the test started
    traffic: float = 0.2  # share of requests served by the candidate
    sticky: str = "user"  # user | session | request
    min_votes: int = 20  # head-to-head votes before a promotion
    confidence: float = 0.95
    max_duration_s: float = 7 * 86400.0
    futility_win: float | None = None  # end for futility below this win rate (decision.py); None: never
    started_at: str = ""
    status: str = RUNNING
    decided_at: str = ""
    reason: str = ""
    wins: int = 0
    losses: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.traffic < 1:
            raise InvalidArgument(f"traffic must be in (0, 1), got {self.traffic}")
        if self.sticky not in STICKY:
            raise InvalidArgument(f"sticky must be one of {STICKY}, got {self.sticky!r}")
        if self.min_votes < 1:
            raise InvalidArgument(f"min_votes must be >= 1, got {self.min_votes}")
        if not 0.5 < self.confidence < 1:
            raise InvalidArgument(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.futility_win is not None and not 0.5 < self.futility_win < 1:
            raise InvalidArgument(f"futility_win must be in (0.5, 1), got {self.futility_win}")
        if self.max_duration_s <= 0:
            raise InvalidArgument(f"max duration must be positive, got {self.max_duration_s}")
        if self.candidate == self.control:
            raise InvalidArgument(f"{self.candidate} is already the current version")

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def elapsed_s(self, now: datetime | None = None) -> float:
        started = datetime.fromisoformat(self.started_at.replace("Z", "+00:00"))
        return ((now or datetime.now(timezone.utc)) - started).total_seconds()

    def as_dict(self) -> dict:
        return asdict(self)


def read_state(registry: Registry) -> ABState | None:
    """The A/B test recorded in the registry (running or concluded), None if there never was one."""
    path = registry.root / AB_FILE
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(ABState)}
        return ABState(**{k: v for k, v in data.items() if k in known})
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, not an object, fields missing
        raise FailedPrecondition(
            f"the A/B state {path} is damaged ({type(exc).__name__}: {exc}); servers serve "
            "CURRENT alone until `prefloop models ab start CANDIDATE --force` replaces it") from None


def running_state(registry: Registry) -> ABState | None:
    state = read_state(registry)
    return state if state is not None and state.running else None


def _write(registry: Registry, state: ABState) -> None:
    write_file_atomic(registry.root / AB_FILE,
                      (json.dumps(state.as_dict(), sort_keys=True, indent=1) + "\n").encode())


def start(registry: Registry, candidate: str, *, force: bool = False, **settings) -> ABState:
    """Start an A/B test of `candidate` against the current version (FailedPrecondition if one
    runs, the candidate is not a servable policy, or its offline gate rejected it without force)."""
    manifest = registry.manifest(candidate)  # NotFound for an unknown version
    if manifest.kind != KIND_POLICY:
        raise FailedPrecondition(f"{candidate} is a {manifest.kind} model; only policy versions "
                                 "can be A/B tested")
    if manifest.gate_passed is not True and not force:
        why = "was rejected by" if manifest.gate_passed is False else "has no result from"
        raise FailedPrecondition(f"{candidate} {why} the offline gate; pass --force (force in "
                                 "the API) to A/B test it anyway")
    registry.check(candidate)
    with registry._pointer_lock():
        try:
            current = running_state(registry)
        except FailedPrecondition:  # a damaged state: only force replaces it
            if not force:
                raise
            current = None
        if current is not None:
            raise FailedPrecondition(f"an A/B test of {current.candidate} is running; stop it first")
        control = registry.current()
        if control is None:
            raise FailedPrecondition("the registry has no current version")
        state = ABState(candidate=candidate, control=control, started_at=utc_now(), **settings)
        _write(registry, state)
    return state


def record_tally(registry: Registry, wins: int, losses: int) -> None:
    """Keep the latest head-to-head counts in the state (for `ab status` without a server)."""
    with registry._pointer_lock():
        state = running_state(registry)
        if state is not None and (state.wins, state.losses) != (wins, losses):
            state.wins, state.losses = wins, losses
            _write(registry, state)


def conclude(registry: Registry, outcome: str, reason: str, *, actor: str = "ab",
             wins: int | None = None, losses: int | None = None) -> ABState:
    """End the running test: PROMOTED (CURRENT moves to the candidate), REJECTED or STOPPED
    (CURRENT stays). The reason (the evidence) goes to the registry history."""
    if outcome not in (PROMOTED, REJECTED, STOPPED):
        raise InvalidArgument(f"outcome must be promoted, rejected or stopped, got {outcome!r}")
    state = running_state(registry)
    if state is None:
        raise NotFound("no A/B test is running")
    if wins is not None:
        state.wins, state.losses = wins, losses or 0
    text = f"A/B {state.candidate} vs {state.control}: {reason}"
    if outcome == PROMOTED:
        registry.promote(state.candidate, reason=text, actor=actor, force=True)
    with registry._pointer_lock():
        latest = running_state(registry)
        if latest is None or latest.started_at != state.started_at:
            raise FailedPrecondition("the A/B test was concluded by someone else")
        if outcome != PROMOTED:
            append_line_durable(registry.history_path, {
                "action": {REJECTED: "ab-reject", STOPPED: "ab-stop"}[outcome],
                "version": registry.current(), "previous": state.candidate, "at": utc_now(),
                "reason": text, "actor": actor})
        state.status, state.decided_at, state.reason = outcome, utc_now(), reason
        _write(registry, state)
    return state
