"""How many head-to-head votes an A/B test needs before the rule decides, and how often it
promotes, by true win rate of the candidate — simulated sequential tests that look after every
vote, with the server's rule (server/ab/decision.py).

    python benchmarks/ab_votes.py [--tests 500] [--confidence 0.95] [--min-votes 20]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", type=int, default=500, help="simulated tests per win rate (default %(default)s)")
    ap.add_argument("--confidence", type=float, default=0.95, help="default %(default)s")
    ap.add_argument("--min-votes", type=int, default=20, help="default %(default)s")
    ap.add_argument("--max-votes", type=int, default=2000, help="votes before a test counts as undecided (default %(default)s)")
    args = ap.parse_args()
    threshold = math.log(1 / (1 - args.confidence))
    print(f"ab_votes: {args.tests} tests per win rate, confidence {args.confidence}, "
          f"min votes {args.min_votes}", flush=True)
    print(f"{'win rate':>8} {'promoted':>9} {'rejected':>9} {'votes to decide: median':>24} {'quartiles':>12}")
    for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        rng = random.Random(int(p * 1000))
        runs = [run_test(p, rng, threshold, args.min_votes, args.max_votes) for _ in range(args.tests)]
        decided = sorted(n for outcome, n in runs if outcome != "undecided")
        q = (decided[len(decided) // 4], decided[3 * len(decided) // 4]) if decided else (0, 0)
        print(f"{p:8.2f} {sum(o == 'promote' for o, _ in runs) / args.tests:9.3f} "
              f"{sum(o == 'reject' for o, _ in runs) / args.tests:9.3f} "
              f"{statistics.median(decided) if decided else float('nan'):24.0f} {q[0]:>5}-{q[1]:<6}")
    print("ab_votes: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
