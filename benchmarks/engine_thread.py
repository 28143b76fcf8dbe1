"""One engine, stepped on the main thread vs from a `threading.Thread`: does the thread that steps
the engine change its decode speed? (`AsyncEngine`, which every server request goes through, steps
it from a background thread.)

    python benchmarks/engine_thread.py [--dtype bfloat16] [--max-tokens 128] [--pairs 3] [--ops]

Each pair decodes one greedy stream of --max-tokens on the main thread, then the same on a worker
thread, on the same loaded engine; tokens/s after the first step (prefill) are printed side by side
with their ratio. `--ops` times single ops instead, on the main thread then on a worker thread:
the native int4 matmul of a 3072 x 576 layer (one parallel region per call) and a bf16 linear of
1536 x 576, one row each; run it under OMP_WAIT_POLICY / GOMP_SPINCOUNT / OMP_NUM_THREADS to see
what the thread changes (docs/performance.md).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import torch


def decode(engine, ids, params, tag: str, out: dict) -> None:
    engine.add_request(tag, ids, params)
    steps, started = 0, None
    while engine.has_unfinished():
        engine.step()
        if started is None:  # the first step is the prefill
            started = time.perf_counter()
        else:
            steps += 1
    out[tag] = steps / (time.perf_counter() - started)


def time_ops(tag: str, ops: dict) -> None:
    for name, op in ops.items():
        for _ in range(200):
            op()
        t = time.perf_counter()
        for _ in range(2000):
            op()
        print(f"{tag:>6} {name:34} {(time.perf_counter() - t) / 2000 * 1e6:8.1f} µs", flush=True)


def ops_only() -> None:
    from prefloop.server.model.int4 import Int4Linear
    torch.manual_seed(0)
    int4 = Int4Linear(torch.nn.Linear(576, 3072, bias=False).to(torch.bfloat16))
    w, x = torch.randn(1536, 576, dtype=torch.bfloat16), torch.randn(1, 576, dtype=torch.bfloat16)
    ops = {f"int4 3072x576 ({'native' if int4.native else 'torch'} kernel)": lambda: int4(x),
           "bf16 linear 1536x576": lambda: torch.nn.functional.linear(x, w)}
    time_ops("main", ops)
    worker = threading.Thread(target=time_ops, args=("thread", ops))
    worker.start()
    worker.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per stream (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=3, help="main/thread pairs (default %(default)s)")
    ap.add_argument("--ops", action="store_true", help="time single ops instead of the engine")
    args = ap.parse_args()
    if args.ops:
        ops_only()
        return 0
    from prefloop.server.engine.kv_cache import KVCacheConfig
    from prefloop.server.engine.llm_engine import LLMEngine
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.model.loader import load_model, resolve_model_dir
    from prefloop.server.serving.tokenizer import Tokenizer
    print(f"engine_thread: {args.dtype}, {args.max_tokens} greedy tokens, {args.pairs} pairs, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    model_dir = resolve_model_dir(None)
    engine = LLMEngine(load_model(model_dir, dtype=args.dtype),
                       KVCacheConfig(capacity_tokens=4096, enable_prefix_caching=False))
    ids = Tokenizer(model_dir).encode_chat([{"role": "user", "content": "Write a story about a dragon."}])
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    decode(engine, ids, params, "warm-up", {})
    print(f"{'pair':>4} {'main tok/s':>10} {'thread tok/s':>12} {'thread/main':>11}")
    for i in range(args.pairs):
        res: dict[str, float] = {}
        decode(engine, ids, params, "main", res)
        worker = threading.Thread(target=decode, args=(engine, ids, params, "thread", res))
        worker.start()
        worker.join()
        print(f"{i + 1:4d} {res['main']:10.1f} {res['thread']:12.1f} {res['thread'] / res['main']:11.2f}")
    print("engine_thread: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
