"""Native engine vs vLLM behind the same gRPC server: `prefloop bench` against `prefloop serve
--backend native` and `--backend vllm`, one after the other in one run, at the same concurrency
levels, dtype and workload (cli/bench.py's long-answer prompts, greedy, --max-tokens).

Prints aggregate completion tokens/s, TTFT p50 and ITL p50 per backend and the ratio vllm / native.
The servers run one at a time (each gets every core). vLLM runs with its defaults (torch.compile /
CUDA graphs) unless --vllm-eager.

    python benchmarks/backends.py [--concurrency 1,8,32] [--dtype bfloat16] [--max-tokens 128]
        [--rounds 2] [--device cpu|cuda] [--vllm-eager] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from api_overhead import online  # same directory: `python benchmarks/backends.py`


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="native engine's device")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vllm-eager", action="store_true", help="run vLLM with --enforce-eager")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    limits = ("--max-concurrent", str(max(levels)), "--dtype", args.dtype)
    runs = {
        "native": online(args.concurrency, args.max_tokens, args.rounds,
                         ("--backend", "native", "--device", args.device, *limits))[0],
        "vllm": online(args.concurrency, args.max_tokens, args.rounds,
                       ("--backend", "vllm", *limits, *(("--enforce-eager",) if args.vllm_eager else ())))[0],
    }
    if args.json:
        print(json.dumps({"dtype": args.dtype, "max_tokens": args.max_tokens, "results": runs}))
        return 0
    print(f"dtype {args.dtype}, {args.max_tokens} greedy tokens per request, {args.rounds} rounds per worker")
    print(f"{'conc':>4} {'native tok/s':>13} {'vllm tok/s':>11} {'vllm/native':>12} "
          f"{'TTFT p50 ms (n/v)':>18} {'ITL p50 ms (n/v)':>17} {'errors':>7}")
    for c in levels:
        n, v = runs["native"][c], runs["vllm"][c]
        print(f"{c:4d} {n['tokens_per_s']:13.1f} {v['tokens_per_s']:11.1f} "
              f"{v['tokens_per_s'] / n['tokens_per_s']:12.2f} "
              f"{n['ttft_ms_p50']:8.1f}/{v['ttft_ms_p50']:<9.1f} {n['itl_ms_p50']:7.1f}/{v['itl_ms_p50']:<9.1f} "
              f"{n['errors'] + v['errors']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
