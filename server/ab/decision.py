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
    decided_by: str = ""  # the evidence that decided ("" while running)

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
    level = f"{confidence * 100:g}% always-valid interval [{low:.3f}, {high:.3f}] over {n} votes"
    if low > 0.5 and n >= min_votes:
        return Decision(PROMOTE, wins, losses, low, high, f"candidate preferred: {level}",
                        "head-to-head votes")
    if high < 0.5:
        return Decision(REJECT, wins, losses, low, high, f"candidate worse: {level}",
                        "head-to-head votes")
    if max_duration_s is not None and elapsed_s >= max_duration_s:
        return Decision(REJECT, wins, losses, low, high,
                        f"undecided after {elapsed_s / 3600:.1f} h (max duration): {level}; the "
                        "current version stays", "max duration")
    missing = (f"; needs >= {min_votes} votes to promote" if low > 0.5 else "")
    return Decision(RUNNING, wins, losses, low, high, f"running: {level}{missing}")


# ---------------------------------------------------------------------------------------------
# Ratings: thumbs and stars on each arm's answers


RATING_LAMBDAS = (0.05, 0.1, 0.2, 0.35, 0.5)  # bets of the mixture (any fixed set is valid)


@dataclass(frozen=True, slots=True)
class RatingEvidence:
    """Per-user ratings of the two arms paired in arrival order: the i-th user whose first rating
    was on the candidate's answer with the i-th such user of the control.

    Each user counts once (their first rating in the test: thumbs up 1, down 0; stars
    (s - 1) / 4), so one heavy user cannot decide. Users are assigned to arms at random, so under
    "the arms are rated alike" each pair's difference d_i = x_cand - x_ctrl in [-1, 1] has mean 0
    given the earlier pairs, and for every bet l in [0, 1] the product of (1 + l d_i) is a
    nonnegative martingale with mean 1; so is the average over `RATING_LAMBDAS`. By Ville's
    inequality it ever reaches 1/alpha with probability <= alpha however often it is looked at:
    `e_better` for "the candidate is rated higher", `e_worse` (bets on -d) for "lower"."""

    pairs: int
    mean_difference: float | None  # of the paired users' ratings, candidate minus control
    e_better: float
    e_worse: float
    candidate_users: int
    control_users: int

    @classmethod
    def of(cls, candidate: list[float], control: list[float]) -> "RatingEvidence":
        bets = RatingBets()
        for i in range(min(len(candidate), len(control))):
            bets.add(candidate[i] - control[i])
        return bets.evidence(len(candidate), len(control))


class RatingBets:
    """The running products of the mixture's bets, one paired difference at a time (what
    `RatingEvidence.of` computes; a simulation can keep one and add as users arrive)."""

    def __init__(self) -> None:
        self.better = [1.0] * len(RATING_LAMBDAS)
        self.worse = [1.0] * len(RATING_LAMBDAS)
        self.pairs, self.total = 0, 0.0

    def add(self, d: float) -> None:
        """One pair's difference d = x_candidate - x_control in [-1, 1]."""
        if not -1.0 <= d <= 1.0:
            raise ValueError(f"a paired rating difference must be in [-1, 1], got {d}")
        for j, bet in enumerate(RATING_LAMBDAS):
            self.better[j] *= 1.0 + bet * d
            self.worse[j] *= 1.0 - bet * d
        self.pairs += 1
        self.total += d

    def evidence(self, candidate_users: int, control_users: int) -> RatingEvidence:
        return RatingEvidence(self.pairs, self.total / self.pairs if self.pairs else None,
                              sum(self.better) / len(self.better),
                              sum(self.worse) / len(self.worse), candidate_users, control_users)


def decide_ratings(evidence: RatingEvidence, *, alpha: float, min_users: int = 20) -> str:
    """PROMOTE when the ratings favour the candidate at level `alpha` (e_better >= 1/alpha) and at
    least `min_users` users rated each arm; REJECT when they disfavour it (e_worse >= 1/alpha);
    else RUNNING."""
    if evidence.e_better >= 1 / alpha and evidence.pairs >= min_users:
        return PROMOTE
    if evidence.e_worse >= 1 / alpha:
        return REJECT
    return RUNNING


def decide_combined(wins: int, losses: int, ratings: RatingEvidence, *, confidence: float = 0.95,
                    min_votes: int = 20, elapsed_s: float = 0.0,
                    max_duration_s: float | None = None) -> Decision:
    """The A/B rule on both kinds of live evidence at the overall level 1 - `confidence`: the
    head-to-head confidence sequence (`decide`) and the ratings test (`decide_ratings`) each at
    half of it (union bound). One promotes and the other does not reject: promote; one rejects
    and the other does not promote: reject; they disagree: keep running (the max duration ends
    it). The reason names the evidence that decided."""
    alpha = 1.0 - confidence
    head = decide(wins, losses, confidence=1.0 - alpha / 2, min_votes=min_votes)
    rated = decide_ratings(ratings, alpha=alpha / 2, min_users=min_votes)
    rating_text = (f"ratings of {ratings.pairs} user pairs: mean difference "
                   f"{ratings.mean_difference:+.3f}, e-values {ratings.e_better:.1f} (better) / "
                   f"{ratings.e_worse:.1f} (worse) vs threshold {2 / alpha:g}"
                   if ratings.pairs else "no paired ratings yet")
    outcomes = {head.outcome, rated}
    if PROMOTE in outcomes and REJECT not in outcomes:
        by = "head-to-head votes" if head.outcome == PROMOTE else "ratings (thumbs / stars)"
        return Decision(PROMOTE, wins, losses, head.low, head.high,
                        f"candidate preferred by {by}: {head.reason}; {rating_text}", by)
    if REJECT in outcomes and PROMOTE not in outcomes:
        by = "head-to-head votes" if head.outcome == REJECT else "ratings (thumbs / stars)"
        return Decision(REJECT, wins, losses, head.low, head.high,
                        f"candidate worse by {by}: {head.reason}; {rating_text}", by)
    if max_duration_s is not None and elapsed_s >= max_duration_s:
        return Decision(REJECT, wins, losses, head.low, head.high,
                        f"undecided after {elapsed_s / 3600:.1f} h (max duration): {head.reason}; "
                        f"{rating_text}; the current version stays", "max duration")
    conflict = "; the two kinds of evidence disagree" if len(outcomes - {RUNNING}) == 2 else ""
    return Decision(RUNNING, wins, losses, head.low, head.high,
                    f"{head.reason}; {rating_text}{conflict}")
