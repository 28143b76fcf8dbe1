"""A season of scheduled align jobs simulated with the real decision code (align/season.py's
look rule and level, data.time_split, gate.decide): votes arrive one by one, a job is due every
`every` of them, and each job that looks judges its newest held-out pairs. No model is trained:
each held-out pair's implicit-reward margin of the job's candidate vs the current version is
drawn — N(0, 1) for feedback that carries no preference, N(mu, 1) with P(margin > 0) = `win`
for a candidate that learned what voters prefer. Used by tests/align/test_season.py and
benchmarks/season_control.py.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from statistics import NormalDist
from types import SimpleNamespace

from prefloop.align import data as data_mod
from prefloop.align import gate as gate_mod
from prefloop.align.season import Season, decision_config, too_early
from prefloop.server.jobs import JobRecord

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(slots=True)
class Design:
    """One way of running a season: the gate's spending rule and the scheduler's look growth
    (1.0: a job looks every time it is due)."""

    name: str
    spending: str
    look_growth: float


DESIGNS = (Design("per job, a look every 8 votes (before)", "none", 1.0),
           Design("spending, a look every 8 votes", "harmonic", 1.0),
           Design("spending, looks at 1.5x (default)", "harmonic", 1.5),
           Design("spending, looks at 2x", "harmonic", 2.0))


@dataclass(slots=True)
class SeasonResult:
    promoted_at: int | None  # the vote count of the first promotion (None: none)
    decisions: int  # gate decisions made (looks)


def run_season(rng: random.Random, design: Design, *, end: int = 1000, every: int = 8,
               win: float | None = None, same_ranking: bool = False,
               heldout_fraction: float = 0.2, config: gate_mod.GateConfig | None = None
               ) -> SeasonResult:
    """One season against one current version, up to `end` votes (see the module docstring).
    `same_ranking`: every candidate ranks each pair the same way (margins fixed per pair);
    else candidates differ between jobs (fresh margins per job), as real ones do."""
    config = config or gate_mod.GateConfig(spending=design.spending,
                                           look_growth=design.look_growth)
    mu = 0.0 if win is None else NormalDist().inv_cdf(win)
    fixed: list[float] = []
    rows: list[SimpleNamespace] = []
    decisions: list[JobRecord] = []
    for n in range(every, end + 1, every):
        rows.extend(SimpleNamespace(created_at=T0 + dt.timedelta(seconds=i), feedback_id=str(i))
                    for i in range(len(rows), n))
        season = Season("v0000", None, tuple(decisions))
        if too_early(season, rows, config.look_growth) is not None:
            continue
        heldout = data_mod.time_split(rows, heldout_fraction).heldout
        if len(heldout) < config.min_heldout:
            continue  # the job skips before training (preference._too_few_to_judge)
        first = len(rows) - len(heldout)
        while len(fixed) < len(rows):
            fixed.append(rng.gauss(mu, 1.0))
        margins = (fixed[first:] if same_ranking
                   else [rng.gauss(mu, 1.0) for _ in heldout])
        implicit = gate_mod.Paired.from_differences(margins)
        verdict = gate_mod.decide(
            implicit=implicit, accuracy=None, candidate_accuracy=None, current_accuracy=None,
            current_version="v0000", kl_per_token=0.01, heldout_pairs=len(heldout),
            config=decision_config(config, season.next_decision), margins=margins)
        if verdict.passed:
            return SeasonResult(n, len(decisions) + 1)
        decisions.append(JobRecord(f"job-{n}", "rejected", data={
            "until": data_mod.iso(rows[-1].created_at), "total_rows": len(rows)}))
    return SeasonResult(None, len(decisions))
