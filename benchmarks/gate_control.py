"""The gate's control: how often does a DPO job with default flags pass the gate when the votes are
random? Each job gets a fresh log of explicit preferences between two answers of different
lengths, the chosen one picked by a coin flip, and runs `run_job` (the default gate: the sign test
or the margin test on the implicit reward vs the current version, each at half of the 5% level,
>= 20 held-out pairs, KL bound) on a tiny random
policy with the default model's tokenizer (seconds per job on CPU). With a gate at its stated
level the pass rate stays near or under 5%.

    python benchmarks/gate_control.py [--jobs 20] [--pairs 120] [--metric METRIC]

Each job reports both tests the gate knows on the same held-out pairs (the sign test on the share
of pairs won, the sign-flip test on the mean margin), and the summary counts how many would pass
each alone at the full 5% level, so one run is the control of every metric.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from math import nan
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from align_helpers import WORDS, tiny_policy, write_pairs  # noqa: E402


def random_pairs(n: int, rng: random.Random) -> list[dict]:
    pairs = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Say something about {rng.choice(WORDS)} number {i}."}]
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "."
        b = a
        while b == a:  # two different answers
            b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "."
        chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20, help="random-vote jobs (default %(default)s)")
    ap.add_argument("--first", type=int, default=0, help="seed of the first job (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=120, help="votes per job (default %(default)s)")
    ap.add_argument("--metric", default=None, help="gate metric (default: the gate's default)")
    ap.add_argument("--lr", type=float, default=None, help="DPO learning rate (default: the job's)")
    args = ap.parse_args()
    from prefloop.align.gate import GateConfig, GateDecision
    from prefloop.align.jobs.preference import JobConfig, run_job
    from prefloop.align.train.preference import TrainConfig

    args.metric = args.metric or GateConfig().metric
    print(f"gate_control: {args.jobs} DPO jobs on {args.pairs} random votes each, gate metric "
          f"{args.metric}", flush=True)
    passed = sign_passes = margin_passes = 0
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_policy(Path(tmp) / "tiny")
        for j in range(args.first, args.first + args.jobs):
            data = Path(tmp) / f"job{j}" / "data"
            write_pairs(data, random_pairs(args.pairs, random.Random(j)))
            result = run_job(JobConfig(data_dir=data, model=str(tiny), keep_rejected=False,
                                       train=TrainConfig(seed=j, lr=args.lr),  # the job's defaults
                                       gate=GateConfig(metric=args.metric)))
            passed += result.status in ("published", "promoted")
            verdict = GateDecision.from_record(result.gate) if result.gate else None
            sign = None if verdict is None else verdict.implicit
            margin = None if verdict is None else verdict.margin
            sign_p = nan if sign is None or sign.p_value is None else sign.p_value
            margin_p = nan if margin is None else margin.p_value
            sign_passes += sign_p < 0.05  # NaN (not measured) compares False
            margin_passes += margin_p < 0.05
            rate = None if sign is None else sign.win_rate
            print(f"job {j:2d}: {result.status:9} implicit-reward win rate "
                  f"{'-' if rate is None else f'{rate:.2f}'} (sign-test p {sign_p:.3f}), mean "
                  f"margin {nan if margin is None else margin.mean:+.3f} (sign-flip p "
                  f"{margin_p:.3f})", flush=True)
    print(f"gate_control: the gate ({args.metric}) passed {passed} of {args.jobs} "
          f"({passed / args.jobs:.0%}); alone at the full 5% level the sign test would pass "
          f"{sign_passes}, the margin test {margin_passes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
