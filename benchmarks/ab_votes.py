"""How much live evidence an A/B test needs before the rule decides, and how often it promotes —
simulated sequential tests that look after every vote, with the server's rule
(server/ab/decision.py): head-to-head votes by the candidate's true win rate, and ratings (each
user's first thumbs on the arm they were assigned) by the two arms' thumbs-up rates. Each kind of
evidence decides at half the test's level (decide_combined), which is what is simulated here.

    python benchmarks/ab_votes.py [--tests 500] [--confidence 0.95] [--min-votes 20] \
        [--control-up 0.3] [--max-users 6000]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys

from prefloop.server.ab import decision


def run_test(p: float, rng: random.Random, threshold: float, min_votes: int, cap: int) -> tuple[str, int]:
    wins = losses = 0
    for n in range(1, cap + 1):
        if rng.random() < p:
            wins += 1
        else:
            losses += 1
        if decision.log_mixture_ratio(wins, losses, 0.5) >= threshold:
            if wins > losses and n >= min_votes:
                return "promote", n
            if losses > wins:
                return "reject", n
    return "undecided", cap


def run_ratings_test(up_candidate: float, up_control: float, rng: random.Random, alpha: float,
                     min_users: int, cap: int) -> tuple[str, int]:
    """Users arrive, each assigned to an arm at random, and rate its answer once (thumbs)."""
    bets, waiting = decision.RatingBets(), {True: [], False: []}
    users = {True: 0, False: 0}
    for n in range(1, cap + 1):
        arm = rng.random() < 0.5
        waiting[arm].append(1.0 if rng.random() < (up_candidate if arm else up_control) else 0.0)
        users[arm] += 1
        if waiting[True] and waiting[False]:  # pair in arrival order
            bets.add(waiting[True].pop(0) - waiting[False].pop(0))
            outcome = decision.decide_ratings(bets.evidence(users[True], users[False]),
                                              alpha=alpha, min_users=min_users)
            if outcome != decision.RUNNING:
                return outcome, n
    return "undecided", cap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=500, help="simulated tests per win rate (default %(default)s)")
    ap.add_argument("--confidence", type=float, default=0.95, help="default %(default)s")
    ap.add_argument("--min-votes", type=int, default=20, help="default %(default)s")
    ap.add_argument("--max-votes", type=int, default=2000, help="votes before a test counts as undecided (default %(default)s)")
    ap.add_argument("--control-up", type=float, default=0.3,
                    help="thumbs-up rate of the control's answers (default %(default)s)")
    ap.add_argument("--max-users", type=int, default=6000,
                    help="rating users before a ratings test counts as undecided (default %(default)s)")
    args = ap.parse_args()
    half = 1 - (1 - args.confidence) / 2  # each kind of evidence at half the level
    threshold = math.log(1 / (1 - half))
    print(f"ab_votes: {args.tests} tests per row, confidence {args.confidence} (each kind of "
          f"evidence at {half:g}), min votes {args.min_votes}", flush=True)
    print("head-to-head votes:")
    print(f"{'win rate':>8} {'promoted':>9} {'rejected':>9} {'votes to decide: median':>24} {'quartiles':>12}")
    for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        rng = random.Random(int(p * 1000))
        runs = [run_test(p, rng, threshold, args.min_votes, args.max_votes) for _ in range(args.tests)]
        decided = sorted(n for outcome, n in runs if outcome != "undecided")
        q = (decided[len(decided) // 4], decided[3 * len(decided) // 4]) if decided else (0, 0)
        print(f"{p:8.2f} {sum(o == 'promote' for o, _ in runs) / args.tests:9.3f} "
              f"{sum(o == 'reject' for o, _ in runs) / args.tests:9.3f} "
              f"{statistics.median(decided) if decided else float('nan'):24.0f} {q[0]:>5}-{q[1]:<6}")
    print(f"ratings (one thumbs per user, users split 50/50, control thumbs-up rate "
          f"{args.control_up:g}, a look after every user):")
    print(f"{'candidate up':>12} {'promoted':>9} {'rejected':>9} {'users to decide: median':>24} "
          f"{'quartiles':>12}")
    for delta in (-0.1, 0.0, 0.05, 0.1, 0.15, 0.2):
        up = args.control_up + delta
        rng = random.Random(int(up * 1000) + 7)
        runs = [run_ratings_test(up, args.control_up, rng, 1 - half, args.min_votes, args.max_users)
                for _ in range(args.tests)]
        decided = sorted(n for outcome, n in runs if outcome != "undecided")
        q = (decided[len(decided) // 4], decided[3 * len(decided) // 4]) if decided else (0, 0)
        print(f"{up:12.2f} {sum(o == 'promote' for o, _ in runs) / args.tests:9.3f} "
              f"{sum(o == 'reject' for o, _ in runs) / args.tests:9.3f} "
              f"{statistics.median(decided) if decided else float('nan'):24.0f} {q[0]:>5}-{q[1]:<6}")
    print("ab_votes: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
