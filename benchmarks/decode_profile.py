"""Where one decode step's time goes: matmuls (quantized / dense), attention, fused ops, other ops
and the Python around them, for each precision mode, on the default model in one process.

Each mode is its own copy of the model with its own KV cache; all decode the same batch (B
sequences at context C) through `ModelRunner.execute` (model step and sampling), interleaved. The
step time is the median of `--steps` unprofiled steps; the split comes from torch.profiler over
`--profiled` more steps (ms per step, the profiler's own overhead included in "outside ops"):

    python benchmarks/decode_profile.py [--modes bf16,int8,int4,int4-torchk] [--batch 1] [--context 100]
                                        [--steps 60] [--profiled 20]

Modes: bf16 (bfloat16, the default layout and kernels), int8 / int4 (`--quantize`), int8-torchk /
int4-torchk (the same with `--quant-kernel torch`), and bf16-python / int8-python / int4-python
(each decode layer called from Python instead of as one native call: server/model/csrc/decode_layer.cpp).
"""
from __future__ import annotations

import argparse
import statistics
import time

from step_variants import decode_batch

MODES = {"bf16": dict(), "int8": dict(quantize="int8"), "int4": dict(quantize="int4"),
         "int8-torchk": dict(quantize="int8", quant_kernel="torch"),
         "int4-torchk": dict(quantize="int4", quant_kernel="torch")}
MODES.update({f"{m}-python": dict(MODES[m], python_layers=True) for m in ("bf16", "int8", "int4")})
QUANT = ("int4_gemv", "int8_gemv", "_weight_int4pack_mm", "_weight_int8pack_mm")
DENSE = ("mm", "linear", "mkldnn")
ATTENTION = ("paged_decode", "scaled_dot_product", "index_copy")  # index_copy_: the K/V cache write
FUSED = ("rms_norm", "rope_", "silu_mul")
COLUMNS = ("quantized matmuls", "dense matmuls", "attention + cache write", "fused ops", "other ops")


def category(name: str) -> str:
    if any(k in name for k in QUANT):
        return COLUMNS[0]
    if any(k in name for k in DENSE):
        return COLUMNS[1]
    if any(k in name for k in ATTENTION):
        return COLUMNS[2]
    if name.startswith("prefloop_kernels::") and any(k in name for k in FUSED):
        return COLUMNS[3]
    return COLUMNS[4]


def split(runner, batch, steps: int) -> dict[str, float]:
    """ms per step in each column, from torch.profiler's self CPU time of every op."""
    from torch.profiler import profile
    t = time.perf_counter()
    with profile() as prof:
        for _ in range(steps):
            runner.execute(batch)
    wall_ms = (time.perf_counter() - t) * 1000 / steps
    out = dict.fromkeys(COLUMNS, 0.0)
    for ev in prof.key_averages():
        out[category(ev.key)] += ev.self_cpu_time_total / 1000 / steps
    out["profiled step"] = wall_ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bf16,int8,int4,int4-torchk", help=f"from {', '.join(MODES)} (default %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together (default %(default)s)")
    ap.add_argument("--context", type=int, default=100, help="cached tokens per sequence (default %(default)s)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per mode (default %(default)s)")
    ap.add_argument("--profiled", type=int, default=20, help="profiled steps per mode (default %(default)s)")
    args = ap.parse_args()
    from prefloop.server.engine.model_runner import ModelRunner
    from prefloop.server.model.loader import load_model, resolve_model_dir

    names = args.modes.split(",")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    print(f"decode_profile: {', '.join(names)}; {args.batch} sequence(s) at context {args.context}", flush=True)
    block, ctx, bs = 16, args.context, args.batch
    per_seq = -(-(ctx + 1) // block)
    runners = {}
    for name in names:
        options = dict(MODES[name])
        python_layers = options.pop("python_layers", False)
        model = load_model(resolve_model_dir(None), dtype="bfloat16", **options)
        if python_layers:
            model._decode_layer_args = []  # no layer taken as one call
        runners[name] = ModelRunner(model, per_seq * bs, block)
        runners[name].warm_up()
    batch = decode_batch(bs, ctx, block)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.steps):
        for name in names:
            t = time.perf_counter()
            runners[name].execute(batch)
            times[name].append((time.perf_counter() - t) * 1000)
    print(f"{'mode':12} {'step ms':>8} " + " ".join(f"{c:>14}" for c in COLUMNS)
          + f" {'rest (Python)':>14} {'profiled step':>14}")
    for name in names:
        med = statistics.median(times[name][5:])
        cols = split(runners[name], batch, args.profiled)
        rest = med - sum(cols[c] for c in COLUMNS)
        print(f"{name:12} {med:8.2f} " + " ".join(f"{cols[c]:14.2f}" for c in COLUMNS)
              + f" {rest:14.2f} {cols['profiled step']:14.2f}", flush=True)
    print("decode_profile: done (ms per step)")


if __name__ == "__main__":
    main()
