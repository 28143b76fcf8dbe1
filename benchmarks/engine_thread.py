"""One engine, stepped on the main thread vs from a `threading.Thread`: does the thread that steps
the engine change its decode speed? (`AsyncEngine`, which every server request goes through, steps
it from a background thread.)

    python benchmarks/engine_thread.py [--dtype bfloat16] [--max-tokens 128] [--pairs 3]

Each pair decodes one greedy stream of --max-tokens on the main thread, then the same on a worker
thread, on the same loaded engine; tokens/s after the first step (prefill) are printed side by side
with their ratio.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per stream (default %(default)s)")
    ap.add_argument("--pairs", type=int, default=3, help="main/thread pairs (default %(default)s)")
    args = ap.parse_args()
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
