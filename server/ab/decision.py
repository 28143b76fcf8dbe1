"""When live votes decide an A/B test: an always-valid confidence sequence for the candidate's
head-to-head win rate, and the rule built on it. Pure functions (no I/O).

Votes are looked at again and again while the test runs, so a fixed-n interval would promote
indifferent candidates far more often than its level says. Instead: the beta-mixture likelihood
ratio for Bernoulli wins (Robbins' method of mixtures),

    M_n(p) = B(a + W, a + L) / B(a, a) / (p^W (1 - p)^L),

is a nonnegative martingale with mean 1 under a true win rate p, so by Ville's inequality
P(exists n: M_n(p) >= 1/alpha) <= alpha. The set {p : M_n(p) < 1/alpha} is therefore a confidence
sequence: it contains the true p at every look simultaneously with probability >= 1 - alpha.

The rule (`decide`): promote when the sequence's lower bound is above 0.5 and at least `min_votes`
head-to-head votes are in; reject when its upper bound is below 0.5; reject as undecided when
`max_duration_s` has passed; otherwise keep running. With indifferent voters (p = 0.5) the test
promotes with probability <= alpha = 1 - confidence however often it looks (tests/ab/test_ab.py
checks it by simulation). Ties and "both bad" carry no head-to-head evidence and are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR = 2.0  # a of the Beta(a, a) mixture: mass near 0.5, where close calls are decided
PROMOTE, REJECT, RUNNING = "promote", "reject", "running"


def _log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def log_mixture_ratio(wins: int, losses: int, p: float, prior: float = PRIOR) -> float:
    """log M_n(p): evidence against win rate p after `wins` / `losses` (0 for no votes)."""
    if not 0 < p < 1:
        return math.inf if wins + losses else 0.0
    return (_log_beta(prior + wins, prior + losses) - _log_beta(prior, prior)
            - wins * math.log(p) - losses * math.log1p(-p))


def confidence_sequence(wins: int, losses: int, confidence: float = 0.95,
                        prior: float = PRIOR) -> tuple[float, float]:
    """(low, high): the always-valid interval for the win rate at this look."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    threshold = math.log(1 / (1 - confidence))
    centre = wins / (wins + losses) if wins + losses else 0.5  # M_n <= 1 there: always inside

    def inside(p: float) -> bool:
        return log_mixture_ratio(wins, losses, p, prior) < threshold

    def edge(lo: float, hi: float, want_inside_at_hi: bool) -> float:
        for _ in range(60):  # bisection to ~1e-18
            mid = (lo + hi) / 2
            if inside(mid) == want_inside_at_hi:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    low = 0.0 if inside(1e-12) else edge(1e-12, centre, True)
    high = 1.0 if inside(1 - 1e-12) else edge(1 - 1e-12, centre, True)
    return low, high


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str  # promote | reject | running
    wins: int
    losses: int
    low: float
    high: float
    reason: str

    @property
    def votes(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.votes if self.votes else None


def decide(wins: int, losses: int, *, confidence: float = 0.95, min_votes: int = 20,
           elapsed_s: float = 0.0, max_duration_s: float | None = None) -> Decision:
    """The A/B rule on the head-to-head record so far (see the module docstring)."""
    low, high = confidence_sequence(wins, losses, confidence)
    n = wins + losses
    level = f"{confidence:.0%} always-valid interval [{low:.3f}, {high:.3f}] over {n} votes"
    if low > 0.5 and n >= min_votes:
        return Decision(PROMOTE, wins, losses, low, high, f"candidate preferred: {level}")
    if high < 0.5:
        return Decision(REJECT, wins, losses, low, high, f"candidate worse: {level}")
    if max_duration_s is not None and elapsed_s >= max_duration_s:
        return Decision(REJECT, wins, losses, low, high,
                        f"undecided after {elapsed_s / 3600:.1f} h (max duration): {level}; the "
                        "current version stays")
    missing = (f"; needs >= {min_votes} votes to promote" if low > 0.5 else "")
    return Decision(RUNNING, wins, losses, low, high, f"running: {level}{missing}")
