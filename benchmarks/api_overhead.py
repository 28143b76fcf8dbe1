"""The raw engine vs the Generator vs gRPC vs HTTP: the same greedy workload run on the bare
`LLMEngine` stepped from the main thread (the baseline, as `engine_throughput.py` runs it), on the
Generator in-process (its engine stepped by `AsyncEngine`'s background thread, no network), through
`prefloop bench` (gRPC) and through the OpenAI-compatible HTTP API (SSE, httpx) of one real
`prefloop serve`, at the same concurrency, in one run.

The workload (prompts, topics, max_tokens, greedy, rounds per worker) is `cli/bench.py`'s. Every
ratio is to the raw engine: generator / engine is the cost of the engine thread and the asyncio
layer, gRPC and HTTP / engine what a user gets of the engine's speed (the raw engine runs each
round's streams as one batch that starts together; the others start streams as they come).

    python benchmarks/api_overhead.py [--concurrency 1,8,32] [--max-tokens 128] [--rounds 2]
                                      [--dtype auto] [--quantize none] [--engine-thread main,own]

`--engine-thread` runs the server once per value (`prefloop serve --engine-thread`): `main` steps
the engine on the server's main thread (the default), `own` on a thread of the engine's own (as
the Generator here does); both are printed against the same raw-engine baseline.
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

import httpx

from prefloop.cli.bench import PROMPT, TOPICS, percentile


def raw_engine(gen, levels: list[int], max_tokens: int, rounds: int) -> dict[int, float]:
    """Tokens/s of the generator's own `LLMEngine`, stepped on this (the main) thread before the
    generator starts its engine thread."""
    from prefloop.server.engine.sampling_params import SamplingParams
    engine = gen._current.engine.engine  # the LLMEngine inside the AsyncEngine (not started yet)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    def run(prompts: list[str]) -> int:
        for p in prompts:
            engine.add_request(uuid.uuid4().hex, gen.chat_ids([{"role": "user", "content": p}]), params)
        produced = 0
        while engine.has_unfinished():
            produced += sum(len(out.new_token_ids) for out in engine.step())
        return produced

    run([PROMPT.format(topic=TOPICS[0])])  # warm-up
    out = {}
    for i, c in enumerate(levels):
        t, tokens = time.perf_counter(), 0
        for r in range(rounds):
            tokens += run([PROMPT.format(topic=TOPICS[(i + w * rounds + r) % len(TOPICS)])
                           for w in range(c)])
        out[c] = tokens / (time.perf_counter() - t)
    return out


async def offline(levels: list[int], max_tokens: int, rounds: int, dtype: str, quantize: str = "none"
                  ) -> tuple[dict[int, float], dict[int, float]]:
    """(raw engine, Generator) tokens/s at each level, on one loaded model."""
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator
    gen = build_generator(dtype=dtype, quantize=quantize)
    raw = raw_engine(gen, levels, max_tokens, rounds)
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
    return raw, out


async def http_level(url: str, concurrency: int, max_tokens: int, rounds: int, offset: int) -> dict:
    """One concurrency level over HTTP streaming: tokens/s, TTFT and inter-token latency."""
    ttfts, gaps, tokens, errors = [], [], 0, 0

    async def one(client: httpx.AsyncClient, topic: str) -> None:
        nonlocal tokens, errors
        body = {"messages": [{"role": "user", "content": PROMPT.format(topic=topic)}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True}
        start = last = None
        start = time.perf_counter()
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as res:
            if res.status_code != 200:
                errors += 1
                return
            async for line in res.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is None:
                    ttfts.append((now - start) * 1000)
                else:
                    gaps.append((now - last) * 1000)
                last = now
                tokens += 1  # one chunk per text delta (≈ one token)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await one(client, TOPICS[0])  # warm-up
        ttfts.clear(); gaps.clear(); tokens = 0  # noqa: E702

        async def worker(w: int) -> None:
            for r in range(rounds):
                await one(client, TOPICS[(offset + w * rounds + r) % len(TOPICS)])
        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t
    return {"tokens_per_s": tokens / wall, "ttft_ms_p50": percentile(ttfts, 50),
            "itl_ms_p50": percentile(gaps, 50), "itl_ms_p99": percentile(gaps, 99), "errors": errors}


def online(levels: str, max_tokens: int, rounds: int, server_args: tuple[str, ...] = ()
           ) -> tuple[dict[int, dict], dict[int, dict]]:
    """gRPC (`prefloop bench --json`) then HTTP against one fresh `prefloop serve *server_args`."""
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "prefloop.cli", "serve", "--port", "0",
                                   "--http-port", str(_free_port()),
                                   "--data-dir", str(Path(tmp) / "data"), *server_args],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = ""
            while "listening on" not in line:
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("server did not start")
            target = line.split("listening on", 1)[1].split()[0]
            url = line.split("HTTP on ", 1)[1].split()[0]
            res = subprocess.run([sys.executable, "-m", "prefloop.cli", "bench", "--target", target,
                                  "--concurrency", levels, "--max-tokens", str(max_tokens),
                                  "--rounds", str(rounds), "--json"], capture_output=True, text=True, check=True)
            http = {c: asyncio.run(http_level(url, c, max_tokens, rounds, offset=i))
                    for i, c in enumerate(int(x) for x in levels.split(","))}
        finally:
            server.terminate()
            server.wait(60)
    data = json.loads(res.stdout)
    return {lvl["concurrency"]: lvl for lvl in data["results"]}, http


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="stream counts (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per answer (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream (default %(default)s)")
    ap.add_argument("--dtype", default="auto", help="model dtype, offline and served (default %(default)s)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                    help="weights, offline and served (default %(default)s)")
    ap.add_argument("--engine-thread", default="main,own",
                    help="server runs, one per value of serve's --engine-thread (default %(default)s)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    modes = args.engine_thread.split(",")
    print(f"api_overhead: raw engine, Generator, gRPC and HTTP at {args.concurrency} streams, "
          f"{args.max_tokens} greedy tokens, {args.rounds} rounds, dtype {args.dtype}, quantize "
          f"{args.quantize}, server "
          f"engine thread {' then '.join(modes)}", flush=True)
    raw, off = asyncio.run(offline(levels, args.max_tokens, args.rounds, args.dtype, args.quantize))
    served = {m: online(args.concurrency, args.max_tokens, args.rounds,
                        ("--dtype", args.dtype, "--quantize", args.quantize, "--engine-thread", m))
              for m in modes}
    print(f"{'conc':>4} {'thread':>6} {'engine':>7} {'gen':>7} {'gRPC':>7} {'HTTP':>7} {'gen/eng':>7} "
          f"{'gRPC/eng':>8} {'HTTP/eng':>8} {'TTFT p50 gRPC/HTTP':>19} {'ITL p50 gRPC/HTTP':>18}")
    for c in levels:
        for m in modes:
            g, h = served[m][0][c], served[m][1][c]
            print(f"{c:4d} {m:>6} {raw[c]:7.1f} {off[c]:7.1f} {g['tokens_per_s']:7.1f} "
                  f"{h['tokens_per_s']:7.1f} {off[c] / raw[c]:7.2f} {g['tokens_per_s'] / raw[c]:8.2f} "
                  f"{h['tokens_per_s'] / raw[c]:8.2f} {g['ttft_ms_p50']:9.1f}/{h['ttft_ms_p50']:<9.1f} "
                  f"{g['itl_ms_p50']:8.1f}/{h['itl_ms_p50']:<8.1f}")
    print("api_overhead: done (tokens/s; ratios are the result, absolute numbers vary by machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
