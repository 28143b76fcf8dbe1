"""When live evidence decides an A/B test: one-sided e-values for "the candidate is better" and
"the candidate is worse" from head-to-head votes and from ratings, and the rule built on their
product. Pure functions (no I/O).

The evidence is looked at again and again while the test runs, so a fixed-n test would promote
indifferent candidates far more often than its level says. Every number here is an e-process
instead: a nonnegative supermartingale with mean <= 1 while the candidate is no better (or, for
the "worse" side, no worse), so by Ville's inequality it ever reaches 1/alpha with probability
<= alpha, however often it is read.

Head-to-head votes (W wins, L losses). For a win rate p0, Robbins' beta mixture of likelihood
ratios restricted to the win rates above p0,

    E+_n(p0) = ∫_{p0}^1 (q/p0)^W ((1-q)/(1-p0))^L Beta(2,2)(q) dq / Beta(2,2)([p0, 1]),

is such a supermartingale whenever the true win rate is <= p0: for q >= p0 a vote's factor
(q/p0)^x ((1-q)/(1-p0))^(1-x) has mean <= 1 then. E+(1/2) is the evidence that the candidate wins
more than half of the votes; E-(1/2) (wins and losses swapped) that it wins fewer. Its closed form
is an incomplete beta function, summed here as a binomial tail. {p0 : E+_n(p0) < 1/alpha} is a
one-sided always-valid confidence sequence, whose lower end is `low`; `high` likewise. One-sided
mixtures spend no evidence on the direction a decision does not need: at a steady 0.63 win rate
and alpha = 0.0083 they promote after 177 votes, where the two-sided interval at half the level
that decided before 2026-12-05 needed 220 (benchmarks/ab_votes.py, docs/ab.md).

Ratings: `RatingEvidence.e_better` / `e_worse`, betting martingales on users' first ratings,
each candidate user against the control users who rated at about the same time (below).

The rule (`decide_combined`): promote when E+(1/2) x e_better >= 1/alpha and at least `min_votes`
head-to-head votes and blocks of ratings are in together; reject when E-(1/2) x e_worse >= 1/alpha;
keep running when either kind alone reaches 1/alpha the other way ("the two kinds of evidence
disagree"); reject as undecided when `max_duration_s` has passed. Each event of the test (a vote
or a closed block of ratings) moves one factor, whose mean given everything before is <= 1 while
the candidate is neither preferred head to head nor rated higher, so the product is an e-process
too: the test promotes such a candidate with probability <= alpha = 1 - confidence (and rejects
one that is neither less preferred nor rated lower with probability <= alpha). Where only one
kind of evidence comes in, the other factor stays near 1 and the one kind decides at the whole
level, not at half of it as a union bound would (tests/ab/test_ab.py and test_ab_ratings.py
check both levels by simulation). Ties and "both bad" carry no head-to-head evidence and are not
counted.

Futility (`futility_win` p1, the auto route's tests: `align run --ab-futility-win`, default
0.7): a test also ends, rejected, once its head-to-head votes are 1/`FUTILITY_LEVEL` (10) times
likelier at a win rate of 1/2 than at p1 — the likelihood ratio (1/2 / p1)^W (1/2 / (1 - p1))^L —
while the ratings do not lean the candidate's way (their e-value for "better" is at most 1).
That ratio is a supermartingale with mean <= 1 for every win rate >= p1, so a candidate that
wins at least p1 of the votes is ended for futility with probability <= 0.1 (Ville); ending a
test early never raises the chance of a false promotion. At a steady 1/2 with p1 = 0.7 it ends
after about 27 votes, where an undecided test ran until `--ab-span` (a 47-46 test of the real
loop of 2026-12-06 held the season for 486 events).

What the bound assumes: that each counted vote, given the ones before, is won by the candidate
with probability at most one half (so it is about the voters the test samples, e.g. each
rater's allowance of votes in allowance.py, not each user's own taste), and that the users of
one block of ratings are alike but for their arm: a thumbs-up rate that drifts within a block
(about 1/traffic users, e.g. 10 at 10 %) would bias it; drift across blocks does not. "Better" is in either
sense: a candidate preferred head to head but rated a little lower may be promoted more often
than alpha.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR = 2  # a of the Beta(a, a) mixture (an integer: the tails are then binomial sums)
PROMOTE, REJECT, RUNNING = "promote", "reject", "running"
HEAD, RATED, BOTH = "head-to-head votes", "ratings (thumbs / stars)", \
    "head-to-head votes and ratings together"
FUTILE = "futility"  # decided_by of a test ended for futility
FUTILITY_LEVEL = 0.1  # the chance of ending a test of a candidate that wins >= futility_win


def _log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def _log_term(j: int, n: int, x: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(x) + (n - j) * math.log1p(-x))


def log_binomial_cdf(k: int, n: int, x: float) -> float:
    """log P(Binomial(n, x) <= k). Sums the terms outward from the one nearest the mode, where
    they fall off geometrically, so a call costs about sqrt(n) terms, not n."""
    if k < 0:
        return -math.inf
    if k >= n:
        return 0.0
    odds = x / (1 - x)
    if k < math.floor((n + 1) * x):  # the lower tail itself: terms k, k-1, ... fall
        total = term = 1.0
        for j in range(k, 0, -1):
            term *= j / (n - j + 1) / odds
            total += term
            if term < 1e-17 * total:
                break
        return _log_term(k, n, x) + math.log(total)
    total = term = 1.0  # one minus the upper tail: terms k+1, k+2, ... fall
    for j in range(k + 1, n):
        term *= (n - j) / (j + 1) * odds
        total += term
        if term < 1e-17 * total:
            break
    return math.log1p(-min(1.0, math.exp(_log_term(k + 1, n, x)) * total))


def log_evidence_above(wins: int, losses: int, p0: float = 0.5) -> float:
    """log E+_n(p0): the evidence that the win rate is above `p0` (0 before any vote)."""
    if not 0 < p0 < 1:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    a, n = PRIOR, wins + losses
    return (_log_beta(a + wins, a + losses) - _log_beta(a, a)
            + log_binomial_cdf(a + wins - 1, n + 2 * a - 1, p0)
            - log_binomial_cdf(a - 1, 2 * a - 1, p0)
            - wins * math.log(p0) - losses * math.log1p(-p0))


def log_evidence_below(wins: int, losses: int, p0: float = 0.5) -> float:
    """log E-_n(p0): the evidence that the win rate is below `p0`."""
    return log_evidence_above(losses, wins, 1 - p0)


def log_futility(wins: int, losses: int, win: float) -> float:
    """log of the likelihood ratio of the votes at a win rate of 1/2 against one of `win`: the
    evidence that the candidate wins fewer than `win` of the votes (mean <= 1 at any rate >=
    `win` > 1/2; see the module docstring's "Futility")."""
    if not 0.5 < win < 1:
        raise ValueError(f"the futility win rate must be in (0.5, 1), got {win}")
    return wins * math.log(0.5 / win) + losses * math.log(0.5 / (1 - win))


def one_sided_bounds(wins: int, losses: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high): the always-valid one-sided bounds for the win rate at this look, each at
    `confidence` (low is above 1/2 exactly when E+(1/2) >= 1/alpha)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    threshold, eps = math.log(1 / (1 - confidence)), 1e-9
    centre = min(max(wins / (wins + losses) if wins + losses else 0.5, eps), 1 - eps)

    def edge(evidence, far: float, end: float) -> float:  # E(centre) <= 1: always inside
        if evidence(far) < threshold:
            return end
        out, inside = far, centre
        for _ in range(40):
            mid = (out + inside) / 2
            out, inside = (out, mid) if evidence(mid) < threshold else (mid, inside)
        return (out + inside) / 2

    return (edge(lambda p: log_evidence_above(wins, losses, p), eps, 0.0),
            edge(lambda p: log_evidence_below(wins, losses, p), 1 - eps, 1.0))


def e_value(log_e: float) -> float:
    """The e-value of a log one, capped at e^700 (exp overflows past ~1e308)."""
    return math.exp(min(log_e, 700.0))


def e_text(log_e: float) -> str:
    """An e-value for a reason line."""
    return f"{e_value(log_e):.3g}" if log_e < 700 else f"1e{log_e / math.log(10):.0f}"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str  # promote | reject | running
    wins: int
    losses: int
    low: float
    high: float
    reason: str
    decided_by: str = ""  # the evidence that decided ("" while running)
    log_e_better: float = 0.0  # log of the product of the e-values for "candidate better"
    log_e_worse: float = 0.0  # and for "candidate worse"

    @property
    def votes(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.votes if self.votes else None


# ---------------------------------------------------------------------------------------------
# Ratings: thumbs and stars on each arm's answers


RATING_LAMBDAS = (0.05, 0.1, 0.2, 0.35, 0.5)  # bets of the mixture (any fixed set is valid)


@dataclass(frozen=True, slots=True)
class RatingEvidence:
    """Per-user ratings of the two arms, compared in blocks of users who rated at about the same
    time: a block closes when a candidate user arrives and it holds a control user, so at 10 %
    traffic a block is mostly one candidate user and the ~9 control users who rated since the
    candidate user before.

    Each user counts once (their first rating in the test: thumbs up 1, down 0; stars
    (s - 1) / 4), so one heavy user cannot decide. Users are assigned to arms at random and which
    users form a block depends only on their arms and their order, so under "the arms are rated
    alike" the values in a closed block are exchangeable: the block's difference d = mean of its
    candidate users' values - mean of its control users', in [-1, 1], has mean 0 given the earlier
    blocks. For every bet l in [0, 1] the product of (1 + l d) over the blocks is then a
    nonnegative martingale with mean 1; so is the average over `RATING_LAMBDAS`. By Ville's
    inequality it ever reaches 1/alpha with probability <= alpha however often it is looked at:
    `e_better` for "the candidate is rated higher", `e_worse` (bets on -d) for "lower".

    Why blocks, not the pairs in arrival order used before: the i-th candidate user was paired
    with the i-th control user, which at 10 % traffic left 8 of 9 control users unused and paired
    the 75th candidate user with a control user from ~670 users earlier, so a drifting thumbs-up
    rate biased d. A block compares each candidate user with the control users of the same
    stretch of time, and all of them: d's variance is about 1.2 q(1 - q) at 10 % traffic (a
    block's control users number k >= 1 with E[1/k] = 0.26) against 2 q(1 - q) for a pair."""

    blocks: int
    mean_difference: float | None  # the mean of the blocks' d
    log_e_better: float  # logs: a long test's products would underflow
    log_e_worse: float
    candidate_users: int
    control_users: int

    @property
    def e_better(self) -> float:
        return e_value(self.log_e_better)

    @property
    def e_worse(self) -> float:
        return e_value(self.log_e_worse)

    @classmethod
    def of(cls, users) -> "RatingEvidence":
        """`users`: (on the candidate's arm, first rating in [0, 1]) in arrival order."""
        bets = RatingBets()
        for candidate, value in users:
            bets.add(candidate, value)
        return bets.evidence()


class RatingBets:
    """The running products of the mixture's bets, fed one user's first rating at a time in
    arrival order (what `RatingEvidence.of` computes; a simulation keeps one and adds users as
    they come)."""

    def __init__(self) -> None:
        self.better = [0.0] * len(RATING_LAMBDAS)  # log of each bet's running product
        self.worse = [0.0] * len(RATING_LAMBDAS)
        self.blocks, self.total = 0, 0.0
        self.users = {True: 0, False: 0}
        self._open: dict[bool, list[float]] = {True: [], False: []}  # the block being filled

    def add(self, candidate: bool, value: float) -> None:
        """One user's first rating (in [0, 1]) on the candidate's (True) or control's answer."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a rating must be in [0, 1], got {value}")
        candidate = bool(candidate)
        self.users[candidate] += 1
        self._open[candidate].append(value)
        if candidate and self._open[False]:
            cand, ctrl = self._open[True], self._open[False]
            self._bet(sum(cand) / len(cand) - sum(ctrl) / len(ctrl))
            self._open = {True: [], False: []}

    def _bet(self, d: float) -> None:
        for j, bet in enumerate(RATING_LAMBDAS):  # bets <= 1/2: every factor >= 1/2
            self.better[j] += math.log1p(bet * d)
            self.worse[j] += math.log1p(-bet * d)
        self.blocks += 1
        self.total += d

    def evidence(self) -> RatingEvidence:
        return RatingEvidence(self.blocks, self.total / self.blocks if self.blocks else None,
                              _log_mean_exp(self.better), _log_mean_exp(self.worse),
                              self.users[True], self.users[False])


def _log_mean_exp(logs: list[float]) -> float:
    top = max(logs)
    return top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))


def decide_ratings(evidence: RatingEvidence, *, alpha: float, min_users: int = 20) -> str:
    """The ratings alone (the server decides by `decide_combined`; benchmarks/ab_votes.py and the
    tests read the ratings test by itself): PROMOTE when they favour the candidate at level
    `alpha` (e_better >= 1/alpha) and at least `min_users` blocks are in; REJECT when they
    disfavour it (e_worse >= 1/alpha); else RUNNING."""
    if evidence.e_better >= 1 / alpha and evidence.blocks >= min_users:
        return PROMOTE
    if evidence.e_worse >= 1 / alpha:
        return REJECT
    return RUNNING


NO_RATINGS = RatingEvidence(0, None, 0.0, 0.0, 0, 0)


def decide_combined(wins: int, losses: int, ratings: RatingEvidence, *, confidence: float = 0.95,
                    min_votes: int = 20, elapsed_s: float = 0.0,
                    max_duration_s: float | None = None,
                    futility_win: float | None = None) -> Decision:
    """The A/B rule (see the module docstring) on head-to-head votes and ratings at the level
    1 - `confidence`; with `futility_win`, also ended for futility. The reason names the evidence
    that decided and every e-value."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    threshold = math.log(1 / (1 - confidence))
    up, down = log_evidence_above(wins, losses), log_evidence_below(wins, losses)
    rated_up, rated_down = ratings.log_e_better, ratings.log_e_worse
    better, worse = up + rated_up, down + rated_down
    low, high = one_sided_bounds(wins, losses, confidence)
    head_text = (f"head-to-head {wins}-{losses}: e-values {e_text(up)} (better) / "
                 f"{e_text(down)} (worse), one-sided {confidence * 100:g}% always-valid bounds "
                 f"[{low:.3f}, {high:.3f}]")
    rating_text = (f"ratings of {ratings.candidate_users} candidate and {ratings.control_users} "
                   f"control users in {ratings.blocks} block{'s' * (ratings.blocks != 1)}: mean "
                   f"difference "
                   f"{ratings.mean_difference:+.3f}, e-values {e_text(rated_up)} (better) / "
                   f"{e_text(rated_down)} (worse)" if ratings.blocks else
                   "no block of ratings closed yet")
    bar = f"threshold {1 / (1 - confidence):.4g}"
    together = (f"together {e_text(better)} (better) / {e_text(worse)} (worse), {bar}; "
                f"{head_text}; {rating_text}" if ratings.blocks else
                f"{head_text}, {bar}; {rating_text}")
    disagree = (up >= threshold or rated_up >= threshold) and \
        (down >= threshold or rated_down >= threshold)  # (both products over it implies this)

    def by(head: float, rated: float) -> str:
        alone = (head >= threshold, rated >= threshold)
        return {(True, False): HEAD, (False, True): RATED}.get(alone, BOTH)

    def made(outcome: str, reason: str, decided_by: str = "") -> Decision:
        return Decision(outcome, wins, losses, low, high, reason, decided_by, better, worse)

    enough = wins + losses + ratings.blocks >= min_votes
    if better >= threshold and enough and not disagree:
        return made(PROMOTE, f"candidate preferred by {by(up, rated_up)}: {together}",
                    by(up, rated_up))
    if worse >= threshold and not disagree:
        return made(REJECT, f"candidate worse by {by(down, rated_down)}: {together}",
                    by(down, rated_down))
    futility = None if futility_win is None else log_futility(wins, losses, futility_win)
    if futility is not None and futility >= math.log(1 / FUTILITY_LEVEL) and rated_up <= 0.0 \
            and not disagree:
        return made(REJECT, f"ended for futility: the head-to-head votes are "
                            f"{e_text(futility)} times likelier "
                            f"at a win rate of 1/2 than at {futility_win:g} (the least the test "
                            f"looks for; it ends at {1 / FUTILITY_LEVEL:g}) and the ratings do "
                            f"not lean the candidate's way; {together}; the current version "
                            "stays", FUTILE)
    if max_duration_s is not None and elapsed_s >= max_duration_s:
        return made(REJECT, f"undecided after {elapsed_s / 3600:.1f} h (max duration): "
                            f"{together}; the current version stays", "max duration")
    note = ("; the two kinds of evidence disagree" if disagree else
            f"; needs >= {min_votes} votes and rating blocks to promote"
            if better >= threshold else "")
    return made(RUNNING, f"running: {together}{note}")


def decide(wins: int, losses: int, *, confidence: float = 0.95, min_votes: int = 20,
           elapsed_s: float = 0.0, max_duration_s: float | None = None,
           futility_win: float | None = None) -> Decision:
    """The rule on head-to-head votes alone (no ratings in)."""
    return decide_combined(wins, losses, NO_RATINGS, confidence=confidence, min_votes=min_votes,
                           elapsed_s=elapsed_s, max_duration_s=max_duration_s,
                           futility_win=futility_win)
