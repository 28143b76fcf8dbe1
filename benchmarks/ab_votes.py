"""How much live evidence an A/B test needs before the rule decides, and how often it promotes —
simulated sequential tests that look after every event, with the server's rule
(server/ab/decision.py) beside the rules it replaced on 2026-12-05, on the same simulated users:

- now: one-sided beta-mixture e-values for "better" and "worse", multiplied with the ratings'
  e-values, against the whole level (`decide_combined`); the ratings compare each candidate user
  with the control users who rated since the candidate user before (blocks);
- pairs: the same product, with the ratings paired in arrival order (the i-th candidate user
  with the i-th control user), as from the morning to the evening of 2026-12-05;
- before: the two-sided beta-mixture interval for the head-to-head win rate and the paired
  ratings' e-values, each at half the level (a union bound), one promoting and the other not
  rejecting.

Three tables: head-to-head votes alone, by the candidate's true win rate; ratings alone (each user
rates one answer of the arm they were assigned), by the arms' thumbs-up rates; and a population
as the loop benchmark's users give it (a quarter compare two answers, the rest rate the one they
got), where both kinds come in together; the last two at each --traffic (default the auto
route's 10 %). `--level-tests N` checks the rule now on indifferent candidates, also with a
thumbs-up rate that drifts while the test runs (the pairs' assumption, not the blocks').

    python benchmarks/ab_votes.py [--tests 500] [--confidence 0.95] [--min-votes 20] \\
        [--control-up 0.3] [--max-users 6000] [--traffic 0.1 [0.3 ...]] [--max-events 3000] \\
        [--tables votes ratings population] [--level-tests 0]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

from prefloop.align.gate import clopper_pearson
from prefloop.server.ab import decision

PROMOTE, REJECT, UNDECIDED = "promote", "reject", "undecided"


def before_head(wins: int, losses: int, alpha: float, min_votes: int) -> str:
    """The previous head-to-head rule at level `alpha`: the two-sided Beta(2, 2) mixture ratio at
    1/2 (its interval leaves 1/2 exactly when the ratio reaches 1/alpha)."""
    a = decision.PRIOR
    log_m = (math.lgamma(a + wins) + math.lgamma(a + losses) - math.lgamma(2 * a + wins + losses)
             - 2 * math.lgamma(a) + math.lgamma(2 * a) + (wins + losses) * math.log(2))
    if log_m >= math.log(1 / alpha):
        if wins > losses and wins + losses >= min_votes:
            return PROMOTE
        if losses > wins:
            return REJECT
    return decision.RUNNING


def now_head(wins: int, losses: int, alpha: float, min_votes: int) -> str:
    """The rule now on head-to-head votes alone (decide_combined without ratings, without the
    bounds it computes for display)."""
    threshold = math.log(1 / alpha)
    if wins + losses >= min_votes and decision.log_evidence_above(wins, losses) >= threshold:
        return PROMOTE
    if decision.log_evidence_below(wins, losses) >= threshold:
        return REJECT
    return decision.RUNNING


def before_combined(wins: int, losses: int, ratings: decision.RatingEvidence, alpha: float,
                    min_votes: int) -> str:
    outcomes = {before_head(wins, losses, alpha / 2, min_votes),
                decision.decide_ratings(ratings, alpha=alpha / 2, min_users=min_votes)}
    if PROMOTE in outcomes and REJECT not in outcomes:
        return PROMOTE
    if REJECT in outcomes and PROMOTE not in outcomes:
        return REJECT
    return decision.RUNNING


def before_decision(wins: int, losses: int, ratings: decision.RatingEvidence, *,
                    confidence: float, min_votes: int = 20) -> decision.Decision:
    """`before_combined` in `decide_combined`'s shape (for benchmarks/season_control.py)."""
    alpha = 1 - confidence
    outcome = before_combined(wins, losses, ratings, alpha, min_votes)
    by = ""
    if outcome != decision.RUNNING:
        head = before_head(wins, losses, alpha / 2, min_votes)
        by = decision.HEAD if head == outcome else decision.RATED
    return decision.Decision(outcome, wins, losses, 0.0, 1.0, "the rule before 2026-12-05", by)


def now_combined(wins: int, losses: int, ratings: decision.RatingEvidence, alpha: float,
                 min_votes: int) -> str:
    return decision.decide_combined(wins, losses, ratings, confidence=1 - alpha,
                                    min_votes=min_votes).outcome


class ArrivalPairs(decision.RatingBets):
    """The ratings as the rules before the blocks read them: the i-th candidate user paired with
    the i-th control user, in arrival order."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[bool, list[float]] = {True: [], False: []}

    def add(self, candidate: bool, value: float) -> None:
        self.users[candidate] += 1
        self.waiting[candidate].append(value)
        if self.waiting[True] and self.waiting[False]:
            self._bet(self.waiting[True].pop(0) - self.waiting[False].pop(0))


# each column of the ratings and population tables: (name, rule, how the ratings are compared)
RULES = (("before", before_combined, ArrivalPairs), ("pairs", now_combined, ArrivalPairs),
         ("now", now_combined, decision.RatingBets))


def head_test(p: float, rng: random.Random, rule, alpha: float, min_votes: int,
              cap: int) -> tuple[str, int]:
    wins = losses = 0
    for n in range(1, cap + 1):
        if rng.random() < p:
            wins += 1
        else:
            losses += 1
        outcome = rule(wins, losses, alpha, min_votes)
        if outcome != decision.RUNNING:
            return outcome, n
    return UNDECIDED, cap


def ratings_test(up_candidate: float, up_control: float, rng: random.Random, alpha: float,
                 min_users: int, cap: int, traffic: float = 0.5,
                 ratings=decision.RatingBets) -> tuple[str, int]:
    """Users arrive, each assigned to the candidate's arm with probability `traffic`, and rate
    its answer once (thumbs); the ratings test alone at level `alpha` (what each rule does when
    no compare vote comes in), a look after every closed block (or pair)."""
    bets = ratings()
    for n in range(1, cap + 1):
        arm = rng.random() < traffic
        blocks = bets.blocks
        bets.add(arm, 1.0 if rng.random() < (up_candidate if arm else up_control) else 0.0)
        if bets.blocks > blocks:
            outcome = decision.decide_ratings(bets.evidence(), alpha=alpha, min_users=min_users)
            if outcome != decision.RUNNING:
                return outcome, n
    return UNDECIDED, cap


def population_test(win: float, up_candidate: float, up_control, rng: random.Random, rule,
                    alpha: float, min_votes: int, traffic: float, cap: int, every: int = 5,
                    ratings=decision.RatingBets) -> tuple[str, int]:
    """A quarter of the events are compare picks (a blind pair of both versions), the rest a
    thumb on the answer of the user's arm (the candidate's with probability `traffic`); a look
    every `every` events. `up_control`: the control's thumbs-up rate, or a function of the
    event's number (a rate that drifts; the candidate's is then the same plus
    `up_candidate - up_control(0)`)."""
    wins = losses = 0
    bets = ratings()
    rate = up_control if callable(up_control) else (lambda n: up_control)
    delta = up_candidate - rate(0)
    for n in range(1, cap + 1):
        if rng.random() < 0.25:
            if rng.random() < win:
                wins += 1
            else:
                losses += 1
        else:
            arm = rng.random() < traffic
            bets.add(arm, float(rng.random() < rate(n) + (delta if arm else 0.0)))
        if n % every == 0:
            outcome = rule(wins, losses, bets.evidence(), alpha, min_votes)
            if outcome != decision.RUNNING:
                return outcome, n
    return UNDECIDED, cap


def summary(runs: list[tuple[str, int]]) -> str:
    decided = sorted(n for outcome, n in runs if outcome == PROMOTE)
    median = f"{statistics.median(decided):.0f}" if decided else "-"
    q = f"{decided[len(decided) // 4]}-{decided[3 * len(decided) // 4]}" if decided else "-"
    share = sum(o == PROMOTE for o, _ in runs) / len(runs)
    rejected = sum(o == REJECT for o, _ in runs) / len(runs)
    return f"{share:8.3f} {rejected:8.3f} {median:>7} {q:>11}"


DRIFT = (0.15, 0.45)  # a thumbs-up rate that drifts over a level check's test (both arms)
HEADER = f"{'promoted':>8} {'rejected':>8} {'median':>7} {'quartiles':>11}"


def level_check(args: argparse.Namespace, alpha: float) -> None:
    """The share of indifferent candidates the rule now promotes, with its interval."""
    n = args.level_tests

    def line(what: str, runs: list[tuple[str, int]]) -> None:
        k = sum(o == PROMOTE for o, _ in runs)
        low, high = clopper_pearson(k, n, 0.95)
        print(f"  {what}: promoted {k} of {n} ({k / n:.1%} [{low:.1%}, {high:.1%}]), rejected "
              f"{sum(o == REJECT for o, _ in runs)}", flush=True)

    print(f"level check, the rule now at {args.confidence:g} (indifferent candidates):")
    rng = random.Random(8)
    line(f"votes alone, win rate 0.5, up to {args.max_votes} votes",
         [head_test(0.5, rng, now_head, alpha, args.min_votes, args.max_votes)
          for _ in range(n)])
    for traffic in args.traffic:
        rng = random.Random(int(traffic * 1000) + 9)
        line(f"population at traffic {traffic:g}, win 0.5, thumbs up {args.control_up:g} on "
             f"both arms, up to {args.max_events} events",
             [population_test(0.5, args.control_up, args.control_up, rng, now_combined, alpha,
                              args.min_votes, traffic, args.max_events) for _ in range(n)])
        low, high = DRIFT

        def drift(event: int) -> float:
            return low + (high - low) * min(event / args.max_events, 1.0)

        for name, ratings in (("blocks (now)", decision.RatingBets),
                              ("paired in arrival order", ArrivalPairs)):
            rng = random.Random(int(traffic * 1000) + 10)
            line(f"population at traffic {traffic:g}, win 0.5, thumbs up drifting {low:g} -> "
                 f"{high:g} on both arms, ratings {name}",
                 [population_test(0.5, low, drift, rng, now_combined, alpha, args.min_votes,
                                  traffic, args.max_events, ratings=ratings) for _ in range(n)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=500,
                    help="simulated tests per row and rule (default %(default)s)")
    ap.add_argument("--confidence", type=float, default=0.95, help="default %(default)s")
    ap.add_argument("--min-votes", type=int, default=20, help="default %(default)s")
    ap.add_argument("--max-votes", type=int, default=2000,
                    help="votes before a test counts as undecided (default %(default)s)")
    ap.add_argument("--control-up", type=float, default=0.3,
                    help="thumbs-up rate of the control's answers (default %(default)s)")
    ap.add_argument("--max-users", type=int, default=6000,
                    help="rating users before a ratings test counts as undecided (default "
                         "%(default)s)")
    ap.add_argument("--traffic", type=float, nargs="+", default=[0.1],
                    help="the candidate's share of users in the population table, one table "
                         "each (default %(default)s, the auto route's)")
    ap.add_argument("--tables", nargs="*", choices=("votes", "ratings", "population"),
                    default=["votes", "ratings", "population"],
                    help="which tables to print (default all; none: only --level-tests)")
    ap.add_argument("--level-tests", type=int, default=0, metavar="N",
                    help="also run N tests of indifferent candidates with the rule now (votes "
                         "alone, and the population at each --traffic) and print the share "
                         "promoted with its 95 %% interval (default %(default)s: skip)")
    ap.add_argument("--max-events", type=int, default=3000,
                    help="events before a population test counts as undecided (default "
                         "%(default)s)")
    args = ap.parse_args()
    alpha, started = 1 - args.confidence, time.monotonic()
    print(f"ab_votes: {args.tests} tests per row and rule, confidence {args.confidence}, min "
          f"votes {args.min_votes}; 'median' and 'quartiles': votes / users / events to a "
          f"promotion", flush=True)
    if "votes" in args.tables:
        head_table(args, alpha)
    for traffic in args.traffic if "ratings" in args.tables else ():
        ratings_table(args, alpha, traffic)
    for traffic in args.traffic if "population" in args.tables else ():
        population_table(args, alpha, traffic)
    if args.level_tests:
        level_check(args, alpha)
    print(f"ab_votes: done in {time.monotonic() - started:.0f} s")
    return 0


def head_table(args: argparse.Namespace, alpha: float) -> None:
    print(f"head-to-head votes alone (before: two-sided at {1 - alpha / 2:g}; now: one-sided at "
          f"{args.confidence:g}):")
    print(f"{'win rate':>8} | before {HEADER} | now {HEADER}")
    for p in (0.4, 0.5, 0.55, 0.6, 0.63, 0.7, 0.8):
        cells = []
        for rule in (before_head, now_head):
            rng = random.Random(int(p * 1000))  # the same votes for both rules
            cells.append(summary([head_test(p, rng, rule, alpha if rule is now_head else alpha / 2,
                                            args.min_votes, args.max_votes)
                                  for _ in range(args.tests)]))
        print(f"{p:8.2f} | before {cells[0]} | now {cells[1]}", flush=True)


def ratings_table(args: argparse.Namespace, alpha: float, traffic: float) -> None:
    print(f"ratings alone (one thumb per user, candidate traffic {traffic:g}, control thumbs-up "
          f"rate {args.control_up:g}; before at {1 - alpha / 2:g}, pairs and now at "
          f"{args.confidence:g}):")
    print(f"{'cand. up':>8} | " + " | ".join(f"{name} {HEADER}" for name, _, _ in RULES))
    for delta in (0.0, 0.05, 0.1, 0.15):
        up, cells = args.control_up + delta, []
        for name, _, ratings in RULES:
            rng = random.Random(int(up * 1000) + int(traffic * 100) + 7)
            level = alpha / 2 if name == "before" else alpha
            cells.append(summary([ratings_test(up, args.control_up, rng, level, args.min_votes,
                                               args.max_users, traffic, ratings)
                                  for _ in range(args.tests)]))
        print(f"{up:8.2f} | " + " | ".join(f"{name} {cell}" for (name, _, _), cell
                                           in zip(RULES, cells)), flush=True)


def population_table(args: argparse.Namespace, alpha: float, traffic: float) -> None:
    print(f"population (a quarter compare, the rest rate their arm's answer; candidate traffic "
          f"{traffic:g}; a look every 5 events):")
    print(f"{'win, up':>12} | " + " | ".join(f"{name} {HEADER}" for name, _, _ in RULES))
    for win, delta in ((0.5, 0.0), (0.55, 0.05), (0.6, 0.0), (0.6, 0.1), (0.63, 0.1),
                       (0.7, 0.1)):
        up, cells = args.control_up + delta, []
        for _, rule, ratings in RULES:
            rng = random.Random(int(win * 1000) + int(up * 100))
            cells.append(summary([population_test(win, up, args.control_up, rng, rule, alpha,
                                                  args.min_votes, traffic, args.max_events,
                                                  ratings=ratings)
                                  for _ in range(args.tests)]))
        print(f"{win:5.2f}, {up:4.2f} | " + " | ".join(f"{name} {cell}" for (name, _, _), cell
                                                       in zip(RULES, cells)), flush=True)

if __name__ == "__main__":
    sys.exit(main())
