"""A season of scheduled align jobs simulated with the real decision code (align/season.py's
look rule and level, data.time_split, gate.decide): votes arrive one by one, a job is due every
`every` of them, and each job that looks judges its newest held-out pairs. No model is trained:
each held-out pair's implicit-reward margin of the job's candidate vs the current version is
drawn — N(0, 1) for feedback that carries no preference, N(mu, 1) with P(margin > 0) = `win`
for a candidate that learned what voters prefer. Used by tests/align/test_season.py and
benchmarks/season_control.py.

The `--promote-via auto` route (`Design.route`): the look's offline gate decides at the real
`season.decision_config` (a third of the decision's level under the harmonic spending), and a
verdict the real `runner.inconclusive_but_safe` calls inconclusive but safe starts an A/B test at
the real `season.ab_confidence` for its offline p-value (the rest of the decision; with `separate`
spending the season's next decision); jobs wait while it runs (`season.ab_wait`), and every later
event is live traffic (`Live`) that the real A/B rule (`server/ab/decision.decide_combined`, each
rater's head-to-head votes within its allowance, server/ab/allowance.py, each user's first rating,
users assigned to the candidate at the test's traffic share) decides on after every `every` events;
a test still undecided when the window has grown `--ab-span` since the job that started it ends
there, or earlier for futility (`--ab-futility-win`, `Design.futility_win`).

`learns_from`: candidates trained on fewer rows than that learned nothing (held-out margins
N(0, 1), live users indifferent) and later ones learned the preference — what the real loops
showed (docs/ab.md: the first candidate of a season, trained on ~160-195 events, was not
preferred live; the one trained on 588 was).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from types import SimpleNamespace

from prefloop.align import data as data_mod
from prefloop.align import gate as gate_mod
from prefloop.align.jobs.runner import AUTO_AB_TRAFFIC, inconclusive_but_safe
from prefloop.align.season import (
    Season,
    ab_confidence,
    ab_decision_number,
    decision_config,
    offline_p_value,
    shares_with_ab,
    too_early,
)
from prefloop.server.ab import decision as ab_decision
from prefloop.server.ab.allowance import RaterAllowance
from prefloop.server.jobs import JobRecord

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(slots=True)
class Design:
    """One way of running a season: the gate's spending rule and the scheduler's look growth
    (1.0: a job looks every time it is due)."""

    name: str
    spending: str
    look_growth: float
    route: str = "gate"  # gate | auto (--promote-via)
    futility_win: float = gate_mod.GateConfig().ab_futility_win  # --ab-futility-win (0: never)


DESIGNS = (Design("per job, a look every 8 votes (before)", "none", 1.0),
           Design("spending, a look every 8 votes", "harmonic", 1.0),
           Design("spending, looks at 1.5x (default)", "harmonic", 1.5),
           Design("spending, looks at 2x", "harmonic", 2.0),
           Design("spending, looks at 1.5x, --promote-via auto", "harmonic", 1.5, "auto"),
           Design("auto, A/B test a decision apart (before)", "separate", 1.5, "auto", 0.0),
           Design("auto, no futility stop (before)", "harmonic", 1.5, "auto", 0.0))


@dataclass(slots=True, frozen=True)
class Live:
    """The traffic an A/B test sees: each event comes from a user drawn from a pool of `users`;
    it is a compare pick (`compare_share`: won by the candidate with probability `win`), a thumb
    (`thumbs_share`: up with probability `control_up`, plus `thumbs_delta` on the candidate's
    answers), or an edit (the rest: no A/B evidence). The shares are loop_users' population."""

    win: float = 0.5
    thumbs_delta: float = 0.0
    control_up: float = 0.30
    compare_share: float = 0.25
    thumbs_share: float = 0.70
    users: int = 300
    traffic: float = AUTO_AB_TRAFFIC
    rule: Callable[..., ab_decision.Decision] | None = None  # None: decide_combined (the server's)
    ratings: Callable[[], ab_decision.RatingBets] = ab_decision.RatingBets  # how ratings compare
    allowance: Callable[[], RaterAllowance] = RaterAllowance  # which head-to-head votes count


@dataclass(slots=True)
class SeasonResult:
    promoted_at: int | None  # the vote count of the first promotion (None: none)
    decisions: int  # gate decisions made (looks)
    ab_tests: int = 0  # A/B tests started (route auto)
    by: str = ""  # what promoted: "gate" or the A/B evidence that decided
    ab_events: int = 0  # events seen while an A/B test ran


class _ABTest:
    """One A/B test's live evidence, event by event (see `Live`)."""

    def __init__(self, rng: random.Random, live: Live, confidence: float,
                 futility_win: float | None = None) -> None:
        self.rng, self.live, self.confidence = rng, live, confidence
        self.futility_win = futility_win
        self.arm = [rng.random() < live.traffic for _ in range(live.users)]  # True: candidate
        self.allowance = live.allowance()
        self.rated = [False] * live.users
        self.wins = self.losses = 0
        self.bets = live.ratings()

    def event(self) -> None:
        rng, live = self.rng, self.live
        user, kind = rng.randrange(live.users), rng.random()
        if kind < live.compare_share:
            if self.allowance.admit(user):
                if rng.random() < live.win:
                    self.wins += 1
                else:
                    self.losses += 1
        elif kind < live.compare_share + live.thumbs_share and not self.rated[user]:
            self.rated[user] = True
            cand = self.arm[user]
            up = live.control_up + (live.thumbs_delta if cand else 0.0)
            self.bets.add(cand, float(rng.random() < up))

    def decide(self) -> ab_decision.Decision:
        if self.live.rule is not None:  # another rule (benchmarks): no futility stop
            return self.live.rule(self.wins, self.losses, self.bets.evidence(),
                                  confidence=self.confidence)
        return ab_decision.decide_combined(self.wins, self.losses, self.bets.evidence(),
                                           confidence=self.confidence,
                                           futility_win=self.futility_win)


def run_season(rng: random.Random, design: Design, *, end: int = 1000, every: int = 8,
               win: float | None = None, same_ranking: bool = False,
               heldout_fraction: float = 0.2, config: gate_mod.GateConfig | None = None,
               live: Live = Live(), learns_from: int = 0) -> SeasonResult:
    """One season against one current version, up to `end` votes (see the module docstring).
    `same_ranking`: every candidate ranks each pair the same way (margins fixed per pair);
    else candidates differ between jobs (fresh margins per job), as real ones do. `live`: how
    users answer an A/B test's candidate (route auto); a candidate trained on fewer than
    `learns_from` rows learned nothing (win 1/2 held out and live)."""
    config = config or gate_mod.GateConfig(spending=design.spending,
                                           look_growth=design.look_growth,
                                           ab_futility_win=design.futility_win)
    nothing = dataclasses.replace(live, win=0.5, thumbs_delta=0.0)
    mu = 0.0 if win is None else NormalDist().inv_cdf(win)
    fixed: list[float] = []
    rows: list[SimpleNamespace] = []
    decisions: list[JobRecord] = []
    test: _ABTest | None = None
    tests = ab_events = 0
    for n in range(every, end + 1, every):
        new = range(len(rows), n)
        rows.extend(SimpleNamespace(created_at=T0 + dt.timedelta(seconds=i), feedback_id=str(i))
                    for i in new)
        season = Season("v0000", None, tuple(decisions))
        early = too_early(season, rows, config.look_growth)
        if test is not None:  # jobs wait (season.ab_wait); the new events are live evidence
            for _ in new:
                test.event()
            ab_events += len(new)
            outcome = test.decide()
            if outcome.outcome == ab_decision.PROMOTE:
                return SeasonResult(n, len(decisions), tests, outcome.decided_by, ab_events)
            if outcome.outcome == ab_decision.RUNNING \
                    and too_early(season, rows, config.ab_span) is not None:
                continue
            test = None  # rejected, or undecided at --ab-span: the season goes on
        if early is not None:
            continue
        heldout = data_mod.time_split(rows, heldout_fraction).heldout
        if len(heldout) < config.min_heldout:
            continue  # the job skips before training (preference._too_few_to_judge)
        first = len(rows) - len(heldout)
        learned = first >= learns_from
        while len(fixed) < len(rows):
            fixed.append(rng.gauss(mu, 1.0))
        margins = (fixed[first:] if same_ranking
                   else [rng.gauss(mu if learned else 0.0, 1.0) for _ in heldout])
        implicit = gate_mod.Paired.from_differences(margins)
        k, shares = season.next_decision, shares_with_ab(config, True, design.route)
        verdict = gate_mod.decide(
            implicit=implicit, accuracy=None, candidate_accuracy=None, current_accuracy=None,
            current_version="v0000", kl_per_token=0.01, heldout_pairs=len(heldout),
            config=decision_config(config, k, shares), margins=margins)
        if verdict.passed:
            return SeasonResult(n, len(decisions) + 1, tests, "gate", ab_events)
        gate = {"season_decision": k}
        if design.route == "auto" and inconclusive_but_safe(verdict):
            confidence = ab_confidence(config, k, offline_p_value(verdict))
            test = _ABTest(rng, live if learned else nothing, confidence,
                           config.ab_futility_win or None)
            tests += 1
            gate["ab_decision"] = ab_decision_number(config, k)
        status = "published" if "ab_decision" in gate else "rejected"
        decisions.append(JobRecord(f"job-{n}", status, gate=gate,
                                   data={"until": data_mod.iso(rows[-1].created_at),
                                         "total_rows": len(rows)}))
    return SeasonResult(None, len(decisions), tests, "", ab_events)
