"""Engine step variants on the same decode batch, interleaved in one process.

Each variant is its own copy of the default model with its own KV cache: `eager` (gather + SDPA
decode attention), `native` (the C++ paged decode kernel, `--attention native`), `compiled`
(`--compile`, SDPA attention) and `compiled+native`, all with plain linear weights
(`--weight-layout plain`); `packed` and `compiled+packed` are `native` and `compiled+native` with
oneDNN-prepacked weights (`--weight-layout packed`, server/model/packed_linear.py), `int8` and
`int8+packed` add `--quantize int8`. With bfloat16, every `native`/`packed` variant also runs the
fused norm / RoPE / SiLU ops of the kernel library in eager steps (server/model/csrc/fused_ops.cpp);
`packed-unfused` is `packed` with torch's own ops instead. They run the same decode batch (B
sequences at context C) alternately, N steps each; the median step times and each one's speed-up
over the first variant are printed per batch size. Interleaving makes the ratios robust to this machine's noise,
which end-to-end runs in separate processes are not.

    python benchmarks/step_variants.py [--variants native,packed] [--dtype bfloat16]
                                       [--batch-sizes 1,8,32] [--context 100] [--steps 30]
"""
from __future__ import annotations

import argparse
import time

PLAIN = dict(weight_layout="plain")
PACKED = dict(attention="native", weight_layout="packed")
VARIANTS = {"eager": dict(attention="sdpa", **PLAIN), "native": dict(attention="native", **PLAIN),
            "compiled": dict(attention="sdpa", compile=True, **PLAIN),
            "compiled+native": dict(attention="native", compile=True, **PLAIN),
            "packed": PACKED, "compiled+packed": dict(compile=True, **PACKED),
            "int8": dict(attention="native", quantize="int8", **PLAIN),
            "int8+packed": dict(quantize="int8", **PACKED),
            "packed-unfused": dict(fused_ops=False, **PACKED)}


def decode_batch(bs: int, ctx: int, block: int) -> list:
    """`bs` sequences of `ctx` cached tokens, each decoding its next one (blocks interleaved across
    sequences, like a cache that has been in use for a while): a batch for `ModelRunner.execute`."""
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.engine.scheduler import ScheduledSeq
    from prefloop.server.engine.sequence import Sequence
    params = SamplingParams(temperature=0, max_tokens=ctx + 100)
    per_seq = -(-(ctx + 1) // block)
    batch = []
    for i in range(bs):
        seq = Sequence(i, str(i), 0, [1000 + (i * 7 + j) % 5000 for j in range(ctx + 1)], ctx + 1, params, i)
        seq.block_table, seq.num_computed = [i + k * bs for k in range(per_seq)], ctx
        batch.append(ScheduledSeq(seq, 1))
    return batch


def median_ms(times: list[float]) -> float:
    kept = sorted(times[5:])  # the first calls warm caches and allocators
    return kept[len(kept) // 2] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="native,packed", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--context", type=int, default=100, help="cached tokens per sequence (default 100)")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from prefloop.server.engine.model_runner import ModelRunner
    from prefloop.server.model.loader import load_model, resolve_model_dir

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ctx, bsz = args.context, 16
    per_seq = -(-(ctx + 1) // bsz)
    blocks = per_seq * max(sizes)
    model_dir = resolve_model_dir(None)
    runners = {}
    for name in names:
        options = dict(VARIANTS[name])
        fused_ops = options.pop("fused_ops", None)
        model = load_model(model_dir, dtype=args.dtype, **options)
        if fused_ops is not None:
            model.fused_ops = fused_ops
        runners[name] = ModelRunner(model, blocks, bsz)
        t0 = time.perf_counter()
        runners[name].warm_up()
        print(f"{name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{'dtype':9} {'bs':>3} " + " ".join(f"{n + ' ms':>18}" for n in names)
          + "".join(f" {n + ' x':>18}" for n in names[1:]))
    for bs in sizes:
        batch = decode_batch(bs, ctx, bsz)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.steps):
            for name in names:
                t = time.perf_counter()
                runners[name].execute(batch)
                times[name].append(time.perf_counter() - t)
        med = {n: median_ms(times[n]) for n in names}
        base = med[names[0]]
        print(f"{args.dtype:9} {bs:3d} " + " ".join(f"{med[n]:18.2f}" for n in names)
              + "".join(f" {base / med[n]:18.2f}" for n in names[1:]), flush=True)


if __name__ == "__main__":
    main()
