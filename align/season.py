"""Promotion over a season of jobs: the false-promotion level holds for every decision made
against one current version, not only per job.

A **season** is the gate decisions made against one current version: it starts when that
version becomes current (its latest `init`, `promote` or `rollback` in the registry's history)
and ends when another one does. Under feedback that carries no preference, the first promotion
is already a false one, so bounding P(some decision of the season passes) bounds false
promotion over the life of a schedule, however many jobs it runs.

**Alpha spending.** The k-th decision of a season is made at one-sided level
α_k = α / (k (k + 1)), so Σ_k α_k = α for any number of decisions — a union bound: it holds
whatever the held-out windows share (each job re-reads the growing window) and however the
candidates differ. α is the level the gate states per job, (1 − `--gate-confidence`) / 2 = 5 %.
`--season-spending none` is the per-job rule (α every time, for an A/B test too; the season's
rate then grows with the number of jobs: benchmarks/season_control.py).

**An A/B test shares the decision of the job that started it** (`--promote-via auto`, the
default route). The look's level α_k is split: the offline gate decides at (1 − `AB_SHARE`) α_k
= α_k / 3, and the A/B test it starts for an inconclusive but safe candidate (`runner.conclude`)
at a level b(p) that depends on the offline gate's p-value p (`offline_p_value`: twice the
smaller of its two tests' one-sided p-values): b(p) = min(α, C max(p, a)^(κ − 1)) with a the
offline level, κ = `AB_KAPPA` and C set so that a + ∫_a^1 b(p) dp = α_k. A candidate that
nearly passed offline is tested live at a low bar, one that leaned the wrong way at a high one,
and no test at a level above the stated α (5 %). Under feedback that carries no preference p is
at least uniform and the A/B rule's e-process reaches 1/b with probability <= b given p
(Ville), so P(the look or its test promotes) <= a + E[b(p); p > a] <= α_k:
h(p) = 1{p <= a} + b(p) 1{p > a} falls with p (b <= α < 1), and a falling function has its
largest mean under the uniform. Measured against the rule before
2026-12-06 (`--season-spending separate`: the test was the season's next decision at α_{k+1},
whatever the offline evidence) in benchmarks/season_control.py and docs/ab.md.

**Looks that can change the decision.** Every look spends level, so a scheduled job (`align
run`) in a season runs only when the window has grown by `--look-growth` (1.5) since the
season's last decision: about n, 1.5 n, 2.25 n, ... rows (6 looks from 100 to 1,000 votes, where
a job every 8 votes would be ~110). Jobs in between are skipped before a model is loaded, with
the number of rows the next look needs. docs/align.md has the trade-off measured.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass

from prefloop.align import data as data_mod
from prefloop.align.gate import REPORTED, SPENDING, Check, GateConfig, GateDecision, with_check
from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from prefloop.server.jobs import PROMOTED, PUBLISHED, REJECTED, JobRecord, job_history

_DECIDED = (REJECTED, PUBLISHED, PROMOTED)


AB_SHARE = 2 / 3  # of a look's level, the share an A/B test it starts may spend (harmonic)
AB_KAPPA = 0.3  # how steeply that test's level falls with the offline p-value: b ~ p^(κ - 1)
# (both chosen on simulated seasons, benchmarks/season_control.py's default seeds; docs/ab.md)


def decision_level(alpha: float, k: int, spending: str = "harmonic") -> float:
    """The one-sided level of the k-th decision (k >= 1) of a season."""
    if spending not in SPENDING:
        raise InvalidArgument(f"season spending {spending!r} is not one of {SPENDING}")
    if k < 1:
        raise InvalidArgument(f"decisions are counted from 1, got {k}")
    return alpha if spending == "none" else alpha / (k * (k + 1))


def shares_with_ab(config: GateConfig, promote: bool, promote_via: str) -> bool:
    """Does a job's look share its decision's level with an A/B test it may start? Under the
    harmonic spending, when the job promotes by `--promote-via auto`."""
    return config.spending == "harmonic" and promote and promote_via == "auto"


def offline_level(config: GateConfig, k: int, shares: bool = False) -> float:
    """The one-sided level of the offline gate of the season's k-th decision: the decision's,
    or (1 - AB_SHARE) of it when an A/B test may share the decision (`shares_with_ab`)."""
    level = decision_level((1.0 - config.confidence) / 2, k, config.spending)
    return level * (1.0 - AB_SHARE) if shares else level


def decision_config(config: GateConfig, k: int, shares: bool = False) -> GateConfig:
    """`config` with the confidence of the k-th decision of a season (its one-sided level
    (1 - confidence) / 2 is `offline_level` of the stated one)."""
    return dataclasses.replace(config, confidence=1.0 - 2 * offline_level(config, k, shares))


def offline_p_value(decision: GateDecision) -> float:
    """A p-value of the offline gate's comparison that is <= the gate's level whenever the
    comparison passed: for the default metric (either test at half the level) twice the smaller
    of the sign test's and the margin / rating test's one-sided p-values (Bonferroni), else the
    deciding test's; 1.0 when none was measured."""
    tests = ([decision.paired, decision.margin] if decision.metric == "implicit_either" else
             [decision.margin] if decision.metric == "implicit_margin" else [decision.paired])
    ps = [t.p_value for t in tests if t is not None and t.p_value is not None]
    if not ps:
        return 1.0
    return min(1.0, (2.0 if decision.metric == "implicit_either" else 1.0) * min(ps))


def ab_level(config: GateConfig, k: int, offline_p: float = 1.0) -> float:
    """The false-promotion level of the A/B test that the season's k-th decision's job starts,
    given its offline p-value (`offline_p_value`): harmonic, the rest of the decision's level
    spread over p (module docstring: b(p), at most the stated level); separate, the level of the
    season's next decision; none, the stated level."""
    alpha = (1.0 - config.confidence) / 2
    if config.spending == "none":
        return alpha
    if config.spending == "separate":
        return decision_level(alpha, k + 1, config.spending)
    whole = decision_level(alpha, k, config.spending)
    a = offline_level(config, k, shares=True)
    scale = _spread(a, whole - a, alpha)
    return min(alpha, scale * max(offline_p, a) ** (AB_KAPPA - 1.0))


def _spread(a: float, budget: float, cap: float) -> float:
    """C such that the integral over (a, 1] of min(cap, C p^(κ - 1)) is `budget` (< cap (1 - a)):
    closed form where the cap does not bind, else by bisection (the integral grows with C)."""
    kappa = AB_KAPPA

    def integral(c: float) -> float:
        meets = (c / cap) ** (1.0 / (1.0 - kappa))  # where C p^(kappa - 1) comes down to the cap
        if meets <= a:
            return c * (1.0 - a ** kappa) / kappa
        return cap * (meets - a) + c * (1.0 - meets ** kappa) / kappa

    low = kappa * budget / (1.0 - a ** kappa)
    if low * a ** (kappa - 1.0) <= cap:
        return low
    high = low
    while integral(high) < budget:
        high *= 2.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if integral(mid) < budget else (low, mid)
    return low


def ab_decision_number(config: GateConfig, k: int) -> int:
    """The season's number of the A/B test the k-th decision's job starts: the same decision
    (harmonic: it shares the level), or the next one (separate, none)."""
    return k if config.spending == "harmonic" else k + 1


@dataclass(slots=True, frozen=True)
class Season:
    """The decisions made against `current` since it became current (oldest first)."""

    current: str | None
    since: str | None  # ISO time `current` became current (None: no history)
    decisions: tuple[JobRecord, ...] = ()

    @property
    def next_decision(self) -> int:
        """The number of the season's next decision: one per gated job, and one more for each
        A/B test a job started as a decision of its own (its `ab_decision` after its
        `season_decision`: `--season-spending separate` and none)."""
        return 1 + sum(1 + _own_decision(j.gate or {}) for j in self.decisions)

    def next_look(self, growth: float) -> tuple[dt.datetime | None, int]:
        """(the newest row the last decision saw, how many newer rows the next look needs):
        (None, 0) when the season has made no decision yet."""
        if not self.decisions:
            return None, 0
        last = self.decisions[-1].data or {}
        total = int(last.get("total_rows") or 0)
        return data_mod.parse_time(last.get("until")), max(1, math.ceil((growth - 1.0) * total))

    def describe(self, config: GateConfig, shares: bool = False) -> str:
        k = self.next_decision
        alpha = (1.0 - config.confidence) / 2
        level = decision_level(alpha, k, config.spending)
        if config.spending == "none":
            return (f"decision {k} against {self.current}: one-sided level {level:.3g} per job "
                    "(--season-spending none: the season's false-promotion rate is not bounded)")
        split = (f"; the offline gate gets {1 - AB_SHARE:.3g} of it ({level * (1 - AB_SHARE):.3g}) "
                 "and an A/B test this job starts the rest, by the offline p-value"
                 if shares else "")
        return (f"decision {k} against {self.current} since it became current: one-sided level "
                f"{alpha:g}/({k}·{k + 1}) = {level:.3g}{split} (alpha spending: at most "
                f"{alpha:g} over the season)")


def _own_decision(gate: dict) -> bool:
    tested, decided = gate.get("ab_decision"), gate.get("season_decision")
    return bool(tested) and tested != decided


def ab_confidence(config: GateConfig, k: int, offline_p: float = 1.0) -> float:
    """The confidence of the A/B test the season's k-th decision's job starts: its
    false-promotion level (1 - confidence, for the A/B rule's product of head-to-head and
    ratings evidence) is `ab_level`."""
    return 1.0 - ab_level(config, k, offline_p)


def ab_wait(registry: reg.Registry, promote: bool, promote_via: str, season: Season,
            rows: list, span: float) -> str | None:
    """Why a scheduled job that would put its candidate in front of live users (`--promote-via
    ab|auto` with promotion on) waits while an A/B test runs: the running test's live evidence
    decides first. A test this season's last decision started (`--promote-via auto`) runs until
    it decides or the window has grown by `span` (`--ab-span`) since that decision; then it ends
    as undecided (the current version stays) and the job goes on, so an undecided test does not
    stall training. None: the job may run."""
    if not promote or promote_via not in ("ab", "auto"):
        return None
    from prefloop.server.ab import state as ab_state
    state = ab_state.running_state(registry)
    if state is None:
        return None
    wait = (f"an A/B test of {state.candidate} against {state.control} is running; its live "
            f"votes and thumbs decide before another candidate is trained (--promote-via "
            f"{promote_via}; `prefloop models ab status`)")
    last = season.decisions[-1] if season.decisions else None
    if last is None or not (last.gate or {}).get("ab_decision") or last.version != state.candidate:
        return wait  # a test this season's jobs did not start: an admin's, left to them
    have, need = look_progress(season, rows, span)  # the season has a decision: `last`
    if have < need:
        return (f"{wait}; it ends undecided if still running once {need} rows are newer than the "
                f"decision that started it ({have} now; --ab-span {span:g})")
    try:
        ab_state.conclude(registry, ab_state.REJECTED, f"undecided after {have} newer rows "
                          f"(--ab-span {span:g} since the job that started it); the current "
                          f"version stays and decision {season.next_decision} trains",
                          actor="align")
    except (FailedPrecondition, NotFound):
        pass  # a server concluded it meanwhile
    return None


def season_of(registry: reg.Registry, current: str | None,
              history: list[JobRecord] | None = None) -> Season:
    """The season of `current`: the gated policy decisions (DPO / KTO / SFT / PPO jobs that
    reached their gate) whose gate compared against `current`, made after it last became
    current. Reward-model gates are not promotions and do not count."""
    since = None
    for entry in registry.history():
        if entry.version == current and entry.action in ("init", "promote", "rollback"):
            since = entry.at
    jobs = job_history(registry) if history is None else history
    decided = tuple(
        j for j in jobs
        if j.status in _DECIDED and j.method != "rm" and j.gate
        and (j.gate.get("current_version") or None) == current
        and (since is None or (j.finished_at or j.at or "") >= since))
    return Season(current, since, decided)


def look_progress(season: Season, rows: list, growth: float) -> tuple[int, int] | None:
    """(rows newer than the season's last decision saw, how many the window growing by `growth`
    needs); None when the season has made no decision yet."""
    last_until, need = season.next_look(growth)
    if last_until is None:
        return None
    return sum(1 for r in rows if r.created_at > last_until), need


def too_early(season: Season, rows: list, growth: float) -> str | None:
    """Why a scheduled job must wait before the season's next look (None: it may look now):
    fewer rows newer than the last decision's newest than `growth` asks for."""
    progress = look_progress(season, rows, growth)
    if progress is None or progress[0] >= progress[1]:
        return None
    have, need = progress
    return (f"{have} rows since the last decision against {season.current}; its next look "
            f"(decision {season.next_decision}) waits for {need} (--look-growth {growth:g}: "
            "every look spends false-promotion level, docs/align.md)")


def with_season(decision: GateDecision, season: Season, stated: GateConfig,
                shares: bool = False) -> GateDecision:
    """`decision` (made at `decision_config(stated, season.next_decision, shares)`) with the
    season's numbers and a reported line saying at which level it was made."""
    return with_check(decision, Check("season", None, REPORTED + season.describe(stated, shares)),
                      season_decision=season.next_decision, stated_confidence=stated.confidence)
