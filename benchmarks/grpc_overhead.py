"""Online vs offline: `prefloop bench` through a real `prefloop serve` against the same workload
run in-process on the Generator (no gRPC), at the same concurrency, in one run.

The workload (prompts, topics, max_tokens, greedy, rounds per worker) is `clients/bench_cmd.py`'s,
so the ratio online / offline is the cost of the gRPC layer (serialization, the asyncio server,
streaming one chunk per token, generation logging).

    python benchmarks/grpc_overhead.py [--concurrency 1,8,32] [--max-tokens 128] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prefloop.clients.bench_cmd import PROMPT, TOPICS


async def offline(levels: list[int], max_tokens: int, rounds: int) -> dict[int, float]:
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator
    gen = build_generator()
    await gen.start()
    out = {}
    try:
        async def one(topic: str) -> int:
            ids = gen.chat_ids([{"role": "user", "content": PROMPT.format(topic=topic)}])
            n = 0
            async for d in gen.stream(uuid.uuid4().hex, ids, SamplingParams(temperature=0, max_tokens=max_tokens)):
                n = d.completion_tokens
            return n
        await one(TOPICS[0])  # warm-up
        for i, c in enumerate(levels):
            async def worker(w: int) -> int:
                return sum([await one(TOPICS[(i + w * rounds + r) % len(TOPICS)]) for r in range(rounds)])
            t = time.perf_counter()
            tokens = sum(await asyncio.gather(*(worker(w) for w in range(c))))
            out[c] = tokens / (time.perf_counter() - t)
    finally:
        await gen.close()
    return out


def online(levels: str, max_tokens: int, rounds: int, server_args: tuple[str, ...] = ()) -> dict[int, dict]:
    """`prefloop bench --json` against a fresh `prefloop serve *server_args`: {concurrency: level}."""
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "prefloop.server.cli", "serve", "--port", "0", "--http-port", "0",
                                   "--data-dir", str(Path(tmp) / "data"), *server_args],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = ""
            while "listening on" not in line:
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("server did not start")
            target = line.split("listening on", 1)[1].split()[0]
            res = subprocess.run([sys.executable, "-m", "prefloop.server.cli", "bench", "--target", target,
                                  "--concurrency", levels, "--max-tokens", str(max_tokens),
                                  "--rounds", str(rounds), "--json"], capture_output=True, text=True, check=True)
        finally:
            server.terminate()
            server.wait(60)
    data = json.loads(res.stdout)
    return {lvl["concurrency"]: lvl for lvl in data["results"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    off = asyncio.run(offline(levels, args.max_tokens, args.rounds))
    on = online(args.concurrency, args.max_tokens, args.rounds)
    print(f"{'conc':>4} {'offline tok/s':>14} {'gRPC tok/s':>11} {'ratio':>6} {'TTFT p50 ms':>12} "
          f"{'ITL p50/p99 ms':>15}")
    for c in levels:
        lvl = on[c]
        print(f"{c:4d} {off[c]:14.1f} {lvl['tokens_per_s']:11.1f} {lvl['tokens_per_s'] / off[c]:6.2f} "
              f"{lvl['ttft_ms_p50']:12.1f} {lvl['itl_ms_p50']:7.1f}/{lvl['itl_ms_p99']:<7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
