"""Where a KTO job's training time goes on a CPU, and what scoring only the answer tokens, or keeping
freed memory, saves.

The rows of one kept loop run (`loop_sweep.py --keep` run dir: the job's time split, its training
rows without looping liked answers), trained for --steps steps through the real training path
(align/train/preference.py: LoRA, bf16 autocast, the KL stop's probe) from the run's base v0000:

- `--profile`: one run under torch.profiler, the operators by their own CPU time;
- `--heap`: --repeats alternating runs, each in a process of its own, with glibc's malloc as it
  comes and with `keep_freed_memory` (align/train/heap.py, what `prefloop align` sets): the
  training time, the process's user and kernel CPU seconds, page faults and peak memory, the
  losses (they must be equal) and the ratio of the times;
- otherwise --repeats alternating runs of TRL's fused LM head as shipped (on a CPU it projects
  every position of the padded batch, prompt and padding included) and of the same head on the
  answer positions only (the positions TRL projects on a GPU), the losses of both (they must be
  equal) and the ratio of their times.

    python benchmarks/kto_step_profile.py --run /tmp/fresh18/short_sentences/short_sentences-pairs-noise0.2-t0.7-m128-seed18/run-default
    python benchmarks/kto_step_profile.py --heap --steps 8 --repeats 3 --run /tmp/fresh19/short_sentences/short_sentences-population-noise0.2-t0.7-m256-seed19/run-default
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from prefloop.align import data as data_mod
from prefloop.align.train.preference import TrainConfig, train


def training_rows(run: Path) -> list[dict]:
    rows = data_mod.time_split(data_mod.load_examples(run), 0.2).train
    return [r.to_trl() for r in data_mod.without_looping_desirable(rows)[0]]


def timed(run: Path, rows: list[dict], steps: int, answer_positions_only: bool) -> tuple[float, list]:
    import trl.trainer.utils as trl_utils
    shipped = trl_utils._use_triton
    if answer_positions_only:  # TRL's `compact` branch: the head sees the labelled positions only
        trl_utils._use_triton = lambda device: True
    try:
        result = train(run / "registry" / "versions" / "v0000", rows,
                       TrainConfig(method="kto", max_steps=steps))
    finally:
        trl_utils._use_triton = shipped
    return result.runtime_s, [round(h["loss"], 5) for h in result.log_history if "loss" in h]


def heap_run(run: Path, steps: int, kept: bool) -> dict:
    """One training run in this process (a child of `compare_heaps`): its time, CPU and faults."""
    if kept:
        from prefloop.align.train.heap import keep_freed_memory
        assert keep_freed_memory(), "not glibc"
    rows = training_rows(run)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, losses = timed(run, rows, steps, False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "losses": losses, "user": after.ru_utime - before.ru_utime,
            "kernel": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt,
            "peak_gb": after.ru_maxrss / 2**20}  # ru_maxrss: KiB on Linux


def compare_heaps(args) -> None:
    """Alternating runs in processes of their own, malloc as it comes and with freed memory kept."""
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for kept in (False, True):
            out = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--steps",
                                  str(args.steps), "--heap-child", "kept" if kept else "default"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[kept].append(r)
            print(f"  {'freed memory kept' if kept else 'malloc as it comes':>18}: {r['seconds']:.1f} s "
                  f"training; CPU {r['user']:.1f} s user, {r['kernel']:.1f} s kernel; "
                  f"{r['faults'] / 1e6:.2f} M page faults; peak memory {r['peak_gb']:.2f} GiB",
                  flush=True)
    mean = {k: statistics.mean(r["seconds"] for r in v) for k, v in results.items()}
    same = all(r["losses"] == results[False][0]["losses"] for v in results.values() for r in v)
    print(f"freed memory kept / as it comes: {mean[True] / mean[False]:.3f} of the training time over "
          f"{args.repeats} runs each; losses {'equal' if same else 'DIFFER'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a loop_sweep.py --keep run dir")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each head, alternating")
    ap.add_argument("--profile", action="store_true", help="one profiled run of the shipped head")
    ap.add_argument("--heap", action="store_true",
                    help="compare malloc as it comes with freed memory kept (align/train/heap.py)")
    ap.add_argument("--heap-child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.heap_child:
        print(json.dumps(heap_run(args.run, args.steps, args.heap_child == "kept")))
        return
    if args.heap:
        print(f"kto_step_profile: {args.steps} steps a run, {args.repeats} runs each, alternating",
              flush=True)
        compare_heaps(args)
        return
    rows = training_rows(args.run)
    print(f"kto_step_profile: {len(rows)} training answers, {args.steps} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            timed(args.run, rows, args.steps, False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list] = {}
    for _ in range(args.repeats):
        for compact in (False, True):
            seconds, losses[compact] = timed(args.run, rows, args.steps, compact)
            times[compact].append(seconds)
            print(f"  {'answer positions' if compact else 'shipped head':>16}: {seconds:.1f} s",
                  flush=True)
    ratio = statistics.mean(times[True]) / statistics.mean(times[False])
    print(f"answer positions only / shipped: {ratio:.3f} of the time over {args.repeats} runs each; "
          f"losses {'equal' if losses[True] == losses[False] else 'DIFFER'} "
          f"({losses[False][:3]} ...)")


if __name__ == "__main__":
    main()
