"""The CPU matmul caches keyed by shape: resident memory they keep and the decode speed they buy.

torch's ideep computation cache (`LRU_CACHE_CAPACITY`) and oneDNN's primitive cache
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`) keep up to 1,024 matmul primitives each by default, one per
shape; a server sees a new row count at almost every prefill chunk. `prefloop serve` caps both at
64 (server/serving/memory.py). For each setting, in a fresh process (the engine alone, the default
model, bf16), side by side:

- decode tok/s at 1 and 8 streams (fixed 40-token prompts) and 16 streams with varied prompts
  (8-300 tokens), median of `--batches` batches each;
- resident memory (after `gc.collect()` + `malloc_trim(0)`) before and after `--cycles` cycles of
  24 requests with random prompt lengths (8-80 tokens, 48 new tokens each): what a server keeps
  per hour of varied traffic, with no adapter and no version change involved.

    python benchmarks/shape_caches.py [--settings 1024,64,0] [--cycles 8] [--batches 5]

A setting of 0 turns both caches off (ideep's LRU needs at least 1, so it gets 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import ctypes, gc, json, random, statistics, sys, time
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.model.loader import load_model, resolve_model_dir
from prefloop.server.serving.memory import rss_bytes

cycles, batches = int(sys.argv[1]), int(sys.argv[2])
engine = LLMEngine(load_model(resolve_model_dir(None), dtype="bfloat16"),
                   KVCacheConfig(capacity_tokens=16384))
rng = random.Random(0)


def run(tag, streams, tokens, lengths):
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"{tag}-{i}", [1 + (i * 7 + j) % 1000 for j in range(lengths())], params)
    started, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - started)


def resident_mb():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes() / 2**20


run("warm", 8, 8, lambda: 40)
speed = {"1 stream": [], "8 streams": [], "16 varied": []}
for b in range(batches):
    speed["1 stream"].append(run(f"one{b}", 1, 48, lambda: 40))
    speed["8 streams"].append(run(f"eight{b}", 8, 48, lambda: 40))
    speed["16 varied"].append(run(f"varied{b}", 16, 16, lambda: rng.randrange(8, 300)))
before = resident_mb()
for c in range(cycles):
    run(f"cycle{c}", 24, 48, lambda: rng.randrange(8, 80))
after = resident_mb()
print(json.dumps({"speed": {k: statistics.median(v) for k, v in speed.items()},
                  "before_mb": before, "after_mb": after}))
"""


def measure(entries: int, cycles: int, batches: int) -> dict:
    env = dict(os.environ, LRU_CACHE_CAPACITY=str(max(entries, 1)),
               ONEDNN_PRIMITIVE_CACHE_CAPACITY=str(entries))
    out = subprocess.run([sys.executable, "-c", CHILD, str(cycles), str(batches)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--settings", default="1024,64,0", help="cache entries to compare (each cache)")
    ap.add_argument("--cycles", type=int, default=8, help="cycles of 24 varied requests")
    ap.add_argument("--batches", type=int, default=5, help="speed batches per cell (median)")
    args = ap.parse_args()
    settings = [int(s) for s in args.settings.split(",")]
    print(f"shape caches: {len(settings)} settings, a fresh process each", flush=True)
    results = {}
    for entries in settings:
        results[entries] = measure(entries, args.cycles, args.batches)
        print(f"  {entries} entries: done", flush=True)
    first = settings[0]
    print(f"\n{'entries':>8} {'1 stream':>16} {'8 streams':>16} {'16 varied':>16} "
          f"{'RSS before':>11} {'after ' + str(args.cycles) + ' cycles':>16} {'per cycle':>10}")
    for entries, r in results.items():
        cells = [f"{r['speed'][k]:7.1f} ({r['speed'][k] / results[first]['speed'][k]:.2f}x)"
                 for k in ("1 stream", "8 streams", "16 varied")]
        grown = r["after_mb"] - r["before_mb"]
        print(f"{entries:>8} " + " ".join(f"{c:>16}" for c in cells)
              + f" {r['before_mb']:9.0f} MB {r['after_mb']:13.0f} MB {grown / args.cycles:+8.1f} MB")
    print(f"\ntok/s ratios are to {first} entries; RSS after gc + malloc_trim(0)")


if __name__ == "__main__":
    main()
