"""Per-voter caps on what the log gives training: no voter's rows outweigh the others'.

A voter is a feedback row's `user_id`, else its `session_id` (the web page sends one per tab);
rows with neither are not capped (nothing says who sent them; the API's per-token rate limit,
vote_rate.py, bounds those). A voter keeps at most `factor` times the rows of the median voter
(among voters with an id), and never fewer than `floor` — the defaults, 4x and 20, leave every
voter of an ordinary crowd untouched and cut one user who casts half of all votes to a few times
a typical user's weight. A capped voter keeps rows evenly spread over time (not only the oldest
or newest), so the time split between training and held-out rows sees them in the same
proportion. The rule is applied to feedback rows before they become pairs or examples, so DPO,
RM, KTO, PPO prompts and the gate's held-out rows all see the same capped log.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class VoterCap:
    factor: float = 4.0  # a voter keeps at most factor x the median voter's rows ...
    floor: int = 20  # ... and never fewer than this many

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"the voter cap factor must be >= 1, got {self.factor}")
        if self.floor < 1:
            raise ValueError(f"the voter cap floor must be >= 1, got {self.floor}")


DEFAULT_VOTER_CAP = VoterCap()
NO_CAP_MESSAGE = "--voter-cap must be >= 1 (0: no cap)"


def cap_of_factor(factor: float) -> VoterCap | None:
    """The cap of a `--voter-cap FACTOR` flag: None for 0 (every row counts); ValueError with
    NO_CAP_MESSAGE for a factor between 0 and 1 or below 0."""
    if factor == 0:
        return None
    if not factor >= 1:
        raise ValueError(NO_CAP_MESSAGE)
    return VoterCap(factor=factor)


@dataclass(slots=True)
class CapReport:
    voters: int = 0  # voters with an id
    anonymous_rows: int = 0
    median_rows: float = 0.0
    cap: int = 0
    capped: list[dict[str, Any]] = field(default_factory=list)  # {voter, rows, kept}

    @property
    def dropped(self) -> int:
        return sum(c["rows"] - c["kept"] for c in self.capped)


def voter_of_row(row: dict[str, Any]) -> str | None:
    """The voter of a feedback row: "user <id>", "session <id>", or None."""
    if row.get("user_id"):
        return f"user {row['user_id']}"
    if row.get("session_id"):
        return f"session {row['session_id']}"
    return None


def evenly_spaced(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1, spread evenly (the middle of each of k equal stretches)."""
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


def cap_voters(rows: list[dict[str, Any]], cap: VoterCap | None = DEFAULT_VOTER_CAP
               ) -> tuple[list[dict[str, Any]], CapReport]:
    """`rows` (feedback rows in time order) with each voter cut to the cap; order kept."""
    by_voter: dict[str, list[int]] = defaultdict(list)
    report = CapReport()
    for i, row in enumerate(rows):
        voter = voter_of_row(row)
        if voter is None:
            report.anonymous_rows += 1
        else:
            by_voter[voter].append(i)
    report.voters = len(by_voter)
    if cap is None or not by_voter:
        return rows, report
    report.median_rows = statistics.median(len(ix) for ix in by_voter.values())
    report.cap = max(cap.floor, math.ceil(cap.factor * report.median_rows))
    drop: set[int] = set()
    for voter, ix in by_voter.items():
        if len(ix) > report.cap:
            keep = {ix[j] for j in evenly_spaced(len(ix), report.cap)}
            drop.update(i for i in ix if i not in keep)
            report.capped.append({"voter": voter, "rows": len(ix), "kept": report.cap})
    report.capped.sort(key=lambda c: -c["rows"])
    if not drop:
        return rows, report
    return [r for i, r in enumerate(rows) if i not in drop], report


def heaviest_voters(rows: list[dict[str, Any]], top: int = 5) -> list[dict[str, Any]]:
    """The `top` voters by rows: {voter, rows, share} (share of all feedback rows)."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[voter_of_row(row) or "(no user or session id)"] += 1
    total = len(rows) or 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [{"voter": v, "rows": n, "share": n / total} for v, n in ranked]
