"""The gate's control: how often does a job with default flags promote when the feedback is
random? Two kinds of log, each job a fresh one on a tiny random policy with the default model's
tokenizer (seconds per job on CPU):

- `--feedback population` (the default): what `prefloop align run --auto-promote` trains on by
  default, as the loop benchmark's population gives it — of every 20 users 14 rate the one
  answer they got (👍 with probability `--up-rate`, whatever the answer says), 5 pick between two
  answers to one prompt by a coin flip, 1 edits (their own random words over the answer). Each
  job runs the real command line's defaults (KTO on every kind of feedback, the KL stop, the
  rating test on the candidate's moves — joined with the answers it writes from 2026-12-05 to
  2026-12-06, when the 60-job control in docs/loop_benchmark.md ran —, the degeneration check, the season's
  first decision, the auto route). A candidate the gate leaves inconclusive but safe goes to an
  A/B test whose false-promotion level b(p) (align/season.py) is what it can add: under live
  users who are as indifferent as these, that test promotes with probability at most b(p). So the
  per-job promotion rate is at most (gate passes + the sum of b over the tests started) / jobs,
  and the season's first decision allows 2.5 %. The offline p-values should also be at least
  uniform: the summary prints the share under 0.05, 0.2 and 0.5.
- `--feedback pairs`: random explicit preferences between two answers of different lengths and
  `--method dpo`, the control before KTO was the default (each job calls `run_job` directly).

    python benchmarks/gate_control.py [--jobs 50] [--events 300] [--feedback population|pairs]

Each job reports the gate's tests on the same held-out rows (the sign test on matched pairs,
and the margin / rating test), and the summary counts how many would pass each alone at the
full 5% level, so one run is the control of every metric.
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
from math import nan
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from align_helpers import WORDS, tiny_policy, write_pairs  # noqa: E402
from loop_users import user_kinds  # noqa: E402


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


def _words(rng: random.Random) -> str:
    """A random answer of 4 to 40 words in sentences."""
    out, n = [], rng.randint(4, 40)
    while n > 0:
        k = min(n, rng.randint(3, 12))
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n -= k
    return " ".join(out)


def write_random_population(data_dir: Path, events: int, rng: random.Random, *, users: int = 20,
                            up_rate: float = 0.3, cut_share: float = 0.3) -> dict[str, int]:
    """`events` pieces of feedback that carry no preference, through the real FeedbackStore:
    each from a user drawn at random, who by their kind (`loop_users.user_kinds`, the population
    mix) rates the one answer they got (👍 with probability `up_rate`), picks one of two answers
    by a coin flip, or edits an answer into random words of their own. A `cut_share` of the
    answers were stopped by max_tokens. Returns the count of each kind."""
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    kinds = user_kinds(users, "population")
    counts = {"thumbs": 0, "pick": 0, "edit": 0}

    def generate(store, rid: str, messages: list[dict]) -> str:
        text = _words(rng)
        cut = rng.random() < cut_share
        store.record_generation({
            "response_id": rid, "request_id": f"req-{rid}",
            "created_at": dt.datetime.now(dt.timezone.utc), "model_version": "v0000",
            "backend": "native", "messages": messages, "completion": text,
            "finish_reason": "length" if cut else "stop", "prompt_tokens": 12,
            "completion_tokens": len(text.split()) * 2, "sampling": {"temperature": 0.7},
            "latency_ms": 1.0})
        return text

    with FeedbackStore(StoreConfig(data_dir=Path(data_dir), wal=WalConfig(linger_s=0.0005))) as s:
        for i in range(events):
            user = rng.randrange(users)
            kind, who = kinds[user], f"user-{user}"
            messages = [{"role": "user", "content": f"Tell me about {rng.choice(WORDS)} {rng.choice(WORDS)}, "
                                                    f"question {i}."}]
            if kind == "pick":
                generate(s, f"r{i}a", messages)
                generate(s, f"r{i}b", messages)
                s.flush()
                a, b = (f"r{i}a", f"r{i}b") if rng.random() < 0.5 else (f"r{i}b", f"r{i}a")
                s.submit_preference(chosen_response_id=a, rejected_response_id=b, user_id=who)
            elif kind == "edit":
                text = generate(s, f"r{i}", messages)
                edited = text
                while edited == text:
                    edited = _words(rng)
                s.submit_preference(prompt_messages=messages, chosen_text=edited,
                                    rejected_text=text, user_id=who)
            else:
                generate(s, f"r{i}", messages)
                s.flush()
                s.submit_rating(response_id=f"r{i}", score=1 if rng.random() < up_rate else -1,
                                scale="thumbs", user_id=who)
            counts[kind] += 1
    return counts


def run_pairs(args: argparse.Namespace, tiny: Path, tmp: Path) -> int:
    """The DPO control: random explicit preferences, `run_job` with the DPO defaults."""
    from prefloop.align.gate import GateConfig, GateDecision
    from prefloop.align.jobs.preference import JobConfig, run_job
    from prefloop.align.train.preference import TrainConfig

    metric = args.metric or GateConfig().metric
    print(f"gate_control: {args.jobs} DPO jobs on {args.pairs} random votes each, gate metric "
          f"{metric}", flush=True)
    passed = sign_passes = margin_passes = 0
    for j in range(args.first, args.first + args.jobs):
        data = tmp / f"job{j}" / "data"
        write_pairs(data, random_pairs(args.pairs, random.Random(j)))
        result = run_job(JobConfig(data_dir=data, model=str(tiny), keep_rejected=False,
                                   train=TrainConfig(seed=j, lr=args.lr),  # the job's defaults
                                   gate=GateConfig(metric=metric)))
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
    print(f"gate_control: the gate ({metric}) passed {passed} of {args.jobs} "
          f"({passed / args.jobs:.0%}); alone at the full 5% level the sign test would pass "
          f"{sign_passes}, the margin test {margin_passes}")
    return 0


def run_population(args: argparse.Namespace, model: Path, tmp: Path) -> int:
    """The default job's control: random population feedback, `align run --auto-promote` with
    every other flag at its default, parsed by the real command line."""
    from prefloop.align.gate import GateDecision, clopper_pearson
    from prefloop.align.jobs.preference import run_job
    from prefloop.align.season import offline_p_value
    from prefloop.cli.align import canonical_argv, job_config
    from prefloop.cli.main import build_parser

    print(f"gate_control: {args.jobs} jobs of `align run --auto-promote` (defaults) on "
          f"{args.events} random feedback events each (14 of 20 users rate one answer, 👍 at "
          f"{args.up_rate:g}; 5 pick by a coin flip; 1 edits), model {model}", flush=True)
    passes, levels, offline_ps, sign_ps, rating_ps, skipped = 0, [], [], [], [], 0
    part_ps: dict[str, list[float]] = {"heldout_p_value": [], "midpoint_p_value": []}
    for j in range(args.first, args.first + args.jobs):
        data = tmp / f"job{j}" / "data"
        counts = write_random_population(data, args.events, random.Random(j), up_rate=args.up_rate)
        argv = ["align", "run", "--data-dir", str(data), "--model", str(model), "--auto-promote",
                "--seed", str(j)]
        if args.lr is not None:
            argv += ["--lr", str(args.lr)]
        if args.midpoint_test:
            argv += ["--midpoint-test"]
        argv = canonical_argv(argv)  # no method: the default (kto, every kind of feedback)
        job_args = build_parser(argv).parse_args(argv)
        result = run_job(job_config(job_args))
        if result.gate is None:
            skipped += 1
            print(f"job {j:3d}: {result.status}: {result.reason}", flush=True)
            continue
        verdict = GateDecision.from_record(result.gate)
        p = offline_p_value(verdict)
        offline_ps.append(p)
        sign = verdict.paired
        sign_p = nan if sign is None or sign.p_value is None else sign.p_value
        rating_p = nan if verdict.margin is None else verdict.margin.p_value
        sign_ps.append(sign_p)
        rating_ps.append(rating_p)
        parts = (verdict.margin.parts if verdict.margin is not None else None) or {}
        for key, ps in part_ps.items():  # the midpoint test's parts (align/train/midpoint.py)
            ps.append(float(parts.get(key, nan)))
        passes += result.status == "promoted"
        confidence = result.gate.get("ab_confidence")
        level = 0.0 if confidence is None else 1.0 - float(confidence)
        if confidence is not None:
            levels.append(level)
        what = ("promoted by the gate" if result.status == "promoted" else
                f"A/B test at level {level:.4f}" if confidence is not None else result.status)
        joined = (f" (held-out {parts['heldout_p_value']:.3f}, midpoint "
                  f"{parts['midpoint_p_value']:.3f})" if parts else "")
        print(f"job {j:3d}: {counts['thumbs']} thumbs, {counts['pick']} picks, "
              f"{counts['edit']} edits; sign p {sign_p:.3f}, rating p {rating_p:.3f}{joined}, offline p "
              f"{p:.3f}, KL {result.gate.get('kl_per_token') or 0.0:.2g} -> {what}",
              flush=True)
    judged = len(offline_ps)
    if not judged:
        print(f"gate_control: every job was skipped ({skipped}); nothing to count")
        return 1
    lo, hi = clopper_pearson(passes, judged, 0.95)
    bound = (passes + sum(levels)) / judged
    shares = ", ".join(f"{sum(q < t for q in offline_ps) / judged:.2f} under {t:g}"
                       for t in (0.05, 0.2, 0.5))
    alone = (f"{sum(q < 0.05 for q in sign_ps)} sign tests and {sum(q < 0.05 for q in rating_ps)} "
             "rating tests" + (
                 f" (of which the midpoint test's parts alone: held-out "
                 f"{sum(q < 0.05 for q in part_ps['heldout_p_value'])}, midpoint "
                 f"{sum(q < 0.05 for q in part_ps['midpoint_p_value'])} of "
                 f"{sum(q == q for q in part_ps['midpoint_p_value'])} jobs that had one)"
                 if any(q == q for q in part_ps["midpoint_p_value"]) else ""))
    print(f"gate_control: {judged} jobs judged ({skipped} skipped): the gate promoted {passes} "
          f"({passes / judged:.1%}, 95% interval [{lo:.1%}, {hi:.1%}]); {len(levels)} A/B tests started, "
          f"their levels sum to {sum(levels):.3f}; per-job promotion rate at most {bound:.2%} "
          f"(the season's first decision allows 2.5%). Offline p-values: {shares} (uniform: 0.05, "
          f"0.20, 0.50). Alone at the full 5% level: {alone} would pass.")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feedback", choices=("population", "pairs"), default="population",
                    help="random population feedback through `align run`, or random pairs through "
                         "a DPO job (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=20, help="random-feedback jobs (default %(default)s)")
    ap.add_argument("--midpoint-test", action="store_true",
                    help="population: run the jobs with `--midpoint-test` (align/train/midpoint.py)")
    ap.add_argument("--first", type=int, default=0, help="seed of the first job (default %(default)s)")
    ap.add_argument("--events", type=int, default=300,
                    help="population: feedback events per job (default %(default)s)")
    ap.add_argument("--up-rate", type=float, default=0.3,
                    help="population: the share of thumbs up (default %(default)s)")
    ap.add_argument("--model", default=None,
                    help="population: the model to start from (default: a tiny random Llama with "
                         "the default model's tokenizer; the default model itself takes minutes "
                         "a job)")
    ap.add_argument("--pairs", type=int, default=120, help="pairs: votes per job (default %(default)s)")
    ap.add_argument("--metric", default=None, help="pairs: gate metric (default: the gate's default)")
    ap.add_argument("--lr", type=float, default=None,
                    help="the learning rate (default: the job's; the tiny random policy does not "
                         "move at it, so population runs on it pass e.g. 1e-2: KL about 0.013 "
                         "nats/token, the default model's jobs reach 0.02-0.06)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_policy(Path(tmp) / "tiny")
        if args.feedback == "pairs":
            return run_pairs(args, tiny, Path(tmp))
        return run_population(args, Path(args.model) if args.model else tiny, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
