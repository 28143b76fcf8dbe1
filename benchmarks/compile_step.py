"""Eager vs `--compile` on the same decode step, interleaved in one process.

Two copies of the default model (one compiled), each with its own KV cache, run the same decode
batch (B sequences at context 100) alternately, 30 times each; the median step times and their
ratio are printed per batch size. Interleaving makes the ratio robust to this machine's noise,
which end-to-end runs in separate processes are not.

    python benchmarks/compile_step.py [--dtype bfloat16] [--batch-sizes 1,8,32]
"""
from __future__ import annotations

import argparse
import time


def median_ms(times: list[float]) -> float:
    kept = sorted(times[5:])  # the first calls warm caches and allocators
    return kept[len(kept) // 2] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from prefloop.server.model_loader import load_model, resolve_model_dir
    from prefloop.server.model_runner import ModelRunner
    from prefloop.server.sampling_params import SamplingParams
    from prefloop.server.scheduler import ScheduledSeq
    from prefloop.server.sequence import Sequence

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_dir = resolve_model_dir(None)
    blocks = 8 * max(sizes)  # 8 blocks of 16 tokens per sequence: context 100 fits
    eager = ModelRunner(load_model(model_dir, dtype=args.dtype), blocks, 16)
    compiled = ModelRunner(load_model(model_dir, dtype=args.dtype, compile=True), blocks, 16)
    t0 = time.perf_counter()
    compiled.warm_up()
    print(f"compiling (warm-up): {time.perf_counter() - t0:.1f} s")
    params = SamplingParams(temperature=0, max_tokens=200)
    print(f"{'dtype':9} {'bs':>3} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9}")
    for bs in sizes:
        batch = []
        for i in range(bs):
            seq = Sequence(i, str(i), 0, list(range(1000 + i, 1100 + i)), 100, params, i)
            seq.block_table, seq.num_computed = list(range(i * 8, i * 8 + 8)), 99
            batch.append(ScheduledSeq(seq, 1))
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.steps):
            for name, runner in (("eager", eager), ("compiled", compiled)):
                t = time.perf_counter()
                runner.execute(batch)
                times[name].append(time.perf_counter() - t)
        e, c = median_ms(times["eager"]), median_ms(times["compiled"])
        print(f"{args.dtype:9} {bs:3d} {e:9.2f} {c:12.2f} {e / c:9.2f}", flush=True)


if __name__ == "__main__":
    main()
