"""False promotion over a season of scheduled jobs, and what bounding it costs: simulated seasons
with the real decision code (align/season.py, data.time_split, gate.decide; tests/season_sim.py).

A season: votes arrive one at a time up to --end, a job is due every --every of them (align run
on a timer with --min-new-pairs 8), each job that looks judges the newest 20 % of the window
(>= 20 pairs) against the same current version. Random feedback: each held-out pair's margin
is N(0, 1), drawn anew per job (candidates differ between jobs, as real ones do) or fixed per
pair (every candidate ranks the pairs alike). A preference: margins N(mu, 1) with
P(margin > 0) = the candidate's held-out win probability.

The `--promote-via auto` design also runs the A/B tests an inconclusive but safe candidate
starts (the real A/B rule on simulated live traffic: tests/season_sim.Live): under random
feedback live users are indifferent; with a preference they pick the candidate's answer
head-to-head with probability --live-win and give it --live-thumbs more thumbs up.

For each design (spending rule x look growth x route) it prints the share of random-feedback
seasons with a promotion (95 % Clopper-Pearson interval), the looks (and A/B tests) per season,
and for each win probability the median votes until the first promotion, the share promoted by
--end and, for the auto route, the share of those the A/B test promoted; then a second table:
the share of seasons promoted within --by votes (issue 27 asks for 300) and the mean votes to
the first promotion, counting a season with none as --end.

    python benchmarks/season_control.py [--seasons 1000] [--baseline-seasons 300] \\
        [--power-seasons 200] [--wins 0.6 0.65 0.7] [--live-win 0.7] [--live-thumbs 0.1] \\
        [--designs 0 1 2 3 4 5 6] [--ab-rules now pairs before] [--ab-traffic 0.1] [--by 300] \\
        [--learns-from 0] [--futility-wins 0 0.6 0.7] [--users 300] [--allowances now first5] \\
        [--workers 2] [--seed 0]

`--users` is the pool live traffic comes from (every user compares at times); `--allowances`
which head-to-head votes a test counts: `now` (server/ab/allowance.py: a rater's first 5, then
its fair share) or `first5` (each rater's first 5 only, the rule before 2026-12-06). With 25
users a test under `first5` stops growing at 125 head-to-head votes.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from season_sim import DESIGNS, Live, run_season  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_votes import ArrivalPairs, before_decision  # noqa: E402

AB_RULES = {  # --ab-rules: (the name's suffix, Live's rule, how Live compares ratings)
    "now": ("", None, Live().ratings),
    "pairs": (" (A/B ratings paired in arrival order)", None, ArrivalPairs),
    "before": (" (A/B rule before 2026-12-05)", before_decision, ArrivalPairs)}

from prefloop.align.gate import clopper_pearson  # noqa: E402
from prefloop.server.ab.allowance import RaterAllowance  # noqa: E402

ALLOWANCES = {  # --allowances: (the name's suffix, Live's allowance)
    "now": ("", RaterAllowance),
    "first5": (" (each rater's first 5 head-to-head votes: before 2026-12-06)",
               functools.partial(RaterAllowance, factor=0))}


def _batch(args: tuple) -> list[tuple[int | None, int, int, str]]:
    design, seeds, kw = args
    out = []
    for seed in seeds:
        r = run_season(random.Random(seed), design, **kw)
        out.append((r.promoted_at, r.decisions, r.ab_tests, r.by))
    return out


def seasons(pool, design, count: int, seed: int, workers: int, **kw
            ) -> list[tuple[int | None, int, int, str]]:
    seeds = [seed * 1_000_003 + i for i in range(count)]
    chunks = [seeds[i::workers * 4] for i in range(workers * 4)]
    results = pool.map(_batch, [(design, c, kw) for c in chunks if c])
    return [r for chunk in results for r in chunk]


def rate(results) -> str:
    k, n = sum(1 for r in results if r[0] is not None), len(results)
    low, high = clopper_pearson(k, n, 0.95)
    return f"{k / n:6.1%} [{low:.1%}, {high:.1%}] of {n}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seasons", type=int, default=1000,
                    help="random-feedback seasons for the designs with spaced looks "
                         "(default %(default)s)")
    ap.add_argument("--baseline-seasons", type=int, default=300,
                    help="random-feedback seasons for the designs that look every --every votes "
                         "(~110 looks a season: slow) (default %(default)s)")
    ap.add_argument("--power-seasons", type=int, default=200,
                    help="seasons per win probability (default %(default)s)")
    ap.add_argument("--wins", type=float, nargs="*", default=[0.6, 0.65, 0.7],
                    help="held-out win probabilities of a candidate that learned the voters' "
                         "preference (default %(default)s)")
    ap.add_argument("--live-win", type=float, default=0.7,
                    help="route auto, with a preference: the share of head-to-head picks the "
                         "candidate's answers win (default %(default)s)")
    ap.add_argument("--live-thumbs", type=float, default=0.1,
                    help="route auto, with a preference: the candidate's thumbs-up rate above "
                         "the control's 0.30 (default %(default)s)")
    ap.add_argument("--designs", type=int, nargs="*", default=list(range(len(DESIGNS))),
                    help="which designs, by index: " + "; ".join(
                        f"{i}: {d.name}" for i, d in enumerate(DESIGNS)) + " (default all)")
    ap.add_argument("--ab-rules", nargs="+", choices=tuple(AB_RULES), default=["now"],
                    help="the A/B rule of the --promote-via auto design: the server's (now), "
                         "the same with the ratings paired in arrival order (pairs), and/or the "
                         "one replaced on 2026-12-05 (before: each kind of evidence at half the "
                         "level, two-sided head-to-head, paired ratings), on the same seeds "
                         "(default %(default)s)")
    ap.add_argument("--ab-traffic", type=float, default=Live().traffic,
                    help="the candidate's share of users in an A/B test the auto route starts "
                         "(align run --ab-traffic; default %(default)s)")
    ap.add_argument("--learns-from", type=int, default=0, metavar="ROWS",
                    help="with a preference: candidates trained on fewer rows than this learned "
                         "nothing (held-out and live win 1/2), as the first candidate of the real "
                         "loops (default %(default)s: every candidate learned)")
    ap.add_argument("--futility-wins", type=float, nargs="*", default=[],
                    help="also run each auto design with these --ab-futility-win values (0: no "
                         "futility stop), on the same seeds (default: the design's own)")
    ap.add_argument("--end", type=int, default=1000, help="votes per season (default %(default)s)")
    ap.add_argument("--by", type=int, default=300,
                    help="the second table: share of seasons promoted within this many votes "
                         "(default %(default)s)")
    ap.add_argument("--every", type=int, default=8, help="votes between due jobs (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="processes (default %(default)s)")
    ap.add_argument("--users", type=int, default=Live().users,
                    help="users live traffic comes from (default %(default)s)")
    ap.add_argument("--allowances", nargs="+", choices=tuple(ALLOWANCES), default=["now"],
                    help="which head-to-head votes an A/B test counts, one run each "
                         "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default %(default)s)")
    args = ap.parse_args()
    kw = dict(end=args.end, every=args.every)
    power_kw = dict(kw, learns_from=args.learns_from)
    print(f"season_control: seasons of {args.end} votes, a job due every {args.every}; "
          f"{len(args.designs)} designs; live users of a better candidate: head-to-head win "
          f"{args.live_win:g}, thumbs up +{args.live_thumbs:g}; {args.users} users"
          + (f" once trained on >= {args.learns_from} rows" if args.learns_from else ""),
          flush=True)
    started = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        runs = []
        for i in args.designs:
            design = DESIGNS[i]
            if design.route != "auto":
                runs.append((design, "now", "now", ""))
                continue
            for rule in args.ab_rules:
                for allowed in args.allowances:
                    suffix = AB_RULES[rule][0] + ALLOWANCES[allowed][0]
                    runs.append((design, rule, allowed, suffix))
                    runs.extend((dataclasses.replace(design, futility_win=f), rule, allowed,
                                 suffix + f" (--ab-futility-win {f:g})")
                                for f in args.futility_wins if f != design.futility_win)
        for design, rule, allowed, suffix in runs:
            _, decide, ratings = AB_RULES[rule]
            name = design.name + suffix
            live = dict(rule=decide, ratings=ratings, traffic=args.ab_traffic, users=args.users,
                        allowance=ALLOWANCES[allowed][1])
            indifferent = Live(**live)
            liked = Live(win=args.live_win, thumbs_delta=args.live_thumbs, **live)
            n = args.seasons if design.look_growth > 1.0 else args.baseline_seasons
            differ = seasons(pool, design, n, args.seed + 1, args.workers, live=indifferent, **kw)
            same = seasons(pool, design, n, args.seed + 2, args.workers, same_ranking=True,
                           live=indifferent, **kw)
            power = {}
            for j, win in enumerate(args.wins):
                res = seasons(pool, design, args.power_seasons, args.seed + 10 + j,
                              args.workers, win=win, live=liked, **power_kw)
                promoted = [r for r in res if r[0] is not None]
                by_ab = sum(1 for r in promoted if r[3] != "gate")
                power[win] = (statistics.median(r[0] for r in promoted) if promoted else None,
                              len(promoted) / len(res), by_ab / len(res),
                              sum(1 for r in promoted if r[0] <= args.by) / len(res),
                              statistics.mean(args.end if r[0] is None else r[0] for r in res))
            looks = statistics.mean(r[1] for r in differ)
            tests = statistics.mean(r[2] for r in differ)
            rows.append((name, rate(differ), rate(same), looks, tests, power))
            print(f"  {name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    width = max(46, *(len(r[0]) for r in rows))
    print(f"{'design':{width}} {'random votes, candidates differ':>31} {'random, same ranking':>28} "
          f"{'looks':>6} {'A/B':>5}  " + "  ".join(
              f"{f'win {w:g}: median votes (promoted; by A/B)':>38}" for w in args.wins))
    for name, differ, same, looks, tests, power in rows:
        cells = "  ".join(f"{'-' if m is None else f'{m:.0f}':>16} ({share:6.1%}; {ab:6.1%})   "
                          for m, share, ab, _, _ in power.values())
        print(f"{name:{width}} {differ:>31} {same:>28} {looks:6.1f} {tests:5.2f}  {cells}")
    print(f"\n{'design':{width}} " + "  ".join(
        f"{f'win {w:g}: within {args.by} votes, mean votes':>34}" for w in args.wins))
    for name, _, _, _, _, power in rows:
        print(f"{name:{width}} " + "  ".join(f"{f'{within:6.1%}, {mean:4.0f}':>34}"
                                         for _, _, _, within, mean in power.values()))
    print(f"\nseason_control: finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
