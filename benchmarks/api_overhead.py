"""The raw engine vs the Generator vs gRPC vs HTTP: the same greedy workload run on the bare
`LLMEngine` stepped from the main thread (the baseline, as `engine_throughput.py` runs it), through
`prefloop bench`'s gRPC level (its client in this process) and through the OpenAI-compatible HTTP
API (SSE, a plain asyncio client) of real `prefloop serve` processes, and on the Generator
in-process (its engine stepped by `AsyncEngine`'s background thread, no network), at the same
concurrency, in one run.

The servers stay up for the whole run, and at every level the raw engine, gRPC and HTTP take turns
(`--repeats` passes, the first in the turn moving from pass to pass; medians shown): this VM's
speed drifts by 15 % over minutes, and measuring the baseline first and the servers after put that
drift into the ratios. The Generator runs last (once its engine thread starts, the raw engine
cannot be stepped from here).

The workload (prompts, topics, max_tokens, greedy, rounds per worker) is `cli/bench.py`'s. Every
ratio is to the raw engine: generator / engine is the cost of the engine thread and the asyncio
layer, gRPC and HTTP / engine what a user gets of the engine's speed (the raw engine runs each
round's streams as one batch that starts together; the others start streams as they come).

    python benchmarks/api_overhead.py [--concurrency 1,8,32] [--max-tokens 128] [--rounds 2]
                                      [--repeats 3] [--dtype auto] [--quantize none]
                                      [--engine-thread main,own]

`--engine-thread` runs one server per value (`prefloop serve --engine-thread`): `main` steps
the engine on the server's main thread (the default), `own` on a thread of the engine's own (as
the Generator here does); both are printed against the same raw-engine baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prefloop.cli.bench import PROMPT, TOPICS, percentile


def raw_level(gen, concurrency: int, max_tokens: int, rounds: int, offset: int) -> float:
    """Tokens/s of the generator's own `LLMEngine`, stepped on this (the main) thread (before the
    generator starts its engine thread): `rounds` batches of `concurrency` requests."""
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

    t, tokens = time.perf_counter(), 0
    for r in range(rounds):
        tokens += run([PROMPT.format(topic=TOPICS[(offset + w * rounds + r) % len(TOPICS)])
                       for w in range(concurrency)])
    return tokens / (time.perf_counter() - t)


async def generator_levels(gen, levels: list[int], max_tokens: int, rounds: int) -> dict[int, float]:
    """The Generator's tokens/s at each level (its engine stepped by `AsyncEngine`'s background
    thread, no network); started here, closed after."""
    from prefloop.server.engine.sampling_params import SamplingParams
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


async def grpc_level(target: str, concurrency: int, max_tokens: int, rounds: int, offset: int) -> dict:
    """One concurrency level over gRPC streaming: `prefloop bench`'s own level (cli/bench.py), its
    client in this process as the HTTP client is."""
    from prefloop.cli.bench import run_level
    from prefloop.clients.client import AsyncClient
    async with AsyncClient(target) as client:
        level = await run_level(client, concurrency, rounds, max_tokens, 0.0, 600, offset)
    return {"tokens_per_s": level.tokens_per_s, "ttft_ms_p50": level.ttft_ms_p50,
            "itl_ms_p50": level.itl_ms_p50, "errors": level.errors}


async def sse_request(url: str, body: dict) -> tuple[list[tuple[float, int]], int, int]:
    """POST `body` to `url` (http://host:port/path) on a plain asyncio connection and read the SSE
    stream to its `data: [DONE]`: ([(arrival time, events in that read)], completion tokens from
    the usage event, HTTP status). The load generator shares this machine's two cores with the
    server, so it does the least it can per event: it reads what arrives in large reads and
    counts event markers in the bytes (httpx's per-line parsing cost 84 us per token here, 5.6 %
    of a core at 32 streams, taken from the server being measured). Every byte is still read, and
    tokens are the server's own count."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    arrivals: list[tuple[float, int]] = []
    tail, last = b"", b""  # the end of the previous read (markers split by a read); of the stream
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            now = time.perf_counter()
            window = tail + data
            events = window.count(b"data: {") - tail.count(b"data: {")
            if events:
                arrivals.append((now, events))
            last = (last + data)[-4096:]  # the usage event and [DONE], whatever the reads' cuts
            if b"data: [DONE]" in window:
                break
            tail = window[-64:]
    finally:
        writer.close()
    tokens = 0
    at = last.rfind(b'"usage"')
    if at >= 0:
        start = last.rfind(b"data: {", 0, at)
        event = last[start + len(b"data: "):last.index(b"\n\n", start)]
        tokens = json.loads(event)["usage"]["completion_tokens"]
    return arrivals, tokens, status


async def http_level(url: str, concurrency: int, max_tokens: int, rounds: int, offset: int) -> dict:
    """One concurrency level over HTTP streaming (`sse_request`): tokens/s (the usage the server
    reports), TTFT, and the gaps between arrivals (events that arrive in one read count one gap,
    the others zero)."""
    ttfts, gaps, tokens, errors = [], [], 0, 0

    async def one(topic: str) -> None:
        nonlocal tokens, errors
        body = {"messages": [{"role": "user", "content": PROMPT.format(topic=topic)}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        arrivals, n, status = await sse_request(url + "/v1/chat/completions", body)
        if status != 200 or not arrivals:
            errors += 1
            return
        ttfts.append((arrivals[0][0] - start) * 1000)
        last = arrivals[0][0]
        for at, events in arrivals[1:]:
            gaps.extend([(at - last) * 1000] + [0.0] * (events - 1))
            last = at
        tokens += n

    async def worker(w: int) -> None:
        for r in range(rounds):
            await one(TOPICS[(offset + w * rounds + r) % len(TOPICS)])
    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t
    return {"tokens_per_s": tokens / wall, "ttft_ms_p50": percentile(ttfts, 50),
            "itl_ms_p50": percentile(gaps, 50), "itl_ms_p99": percentile(gaps, 99), "errors": errors}


class Server:
    """One `prefloop serve *args` on free ports in a temporary data folder: `target` (gRPC) and
    `url` (HTTP) once started; warmed up by one request on each API."""

    def __init__(self, args: tuple[str, ...]):
        self.tmp = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefloop.cli", "serve", "--port", "0", "--http-port", str(_free_port()),
             "--data-dir", str(Path(self.tmp.name) / "data"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = ""
        while "listening on" not in line:
            line = self.process.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(f"server {' '.join(args)} did not start")
        self.target = line.split("listening on", 1)[1].split()[0]
        self.url = line.split("HTTP on ", 1)[1].split()[0]
        asyncio.run(grpc_level(self.target, 1, 16, 1, 0))
        asyncio.run(http_level(self.url, 1, 16, 1, 0))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.tmp.cleanup()


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
    ap.add_argument("--repeats", type=int, default=3,
                    help="passes over the levels, the raw engine and each API taking turns at every "
                         "level; medians shown (default %(default)s)")
    ap.add_argument("--dtype", default="auto", help="model dtype, offline and served (default %(default)s)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                    help="weights, offline and served (default %(default)s)")
    ap.add_argument("--engine-thread", default="main,own",
                    help="servers, one per value of serve's --engine-thread, all up during the run "
                         "(default %(default)s)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    modes = args.engine_thread.split(",")
    print(f"api_overhead: raw engine, gRPC and HTTP at {args.concurrency} streams taking turns, "
          f"{args.repeats} passes, then the Generator; {args.max_tokens} greedy tokens, "
          f"{args.rounds} rounds, dtype {args.dtype}, quantize {args.quantize}, server engine "
          f"thread {' and '.join(modes)}", flush=True)
    from prefloop.server.serving.build import build_generator
    gen = build_generator(dtype=args.dtype, quantize=args.quantize)
    raw_level(gen, 1, args.max_tokens, 1, 0)  # warm-up
    servers: dict[str, Server] = {}
    runs: dict[tuple, list] = {}
    try:
        for m in modes:
            servers[m] = Server(("--dtype", args.dtype, "--quantize", args.quantize,
                                 "--engine-thread", m))
        for rep in range(args.repeats):
            for i, c in enumerate(levels):
                jobs = [("raw", lambda: {"tokens_per_s": raw_level(gen, c, args.max_tokens,
                                                                   args.rounds, i)})]
                for m, server in servers.items():
                    jobs.append(((m, "gRPC"), lambda s=server: asyncio.run(
                        grpc_level(s.target, c, args.max_tokens, args.rounds, i))))
                    jobs.append(((m, "HTTP"), lambda s=server: asyncio.run(
                        http_level(s.url, c, args.max_tokens, args.rounds, i))))
                shift = rep % len(jobs)  # who goes first moves from pass to pass
                for name, job in jobs[shift:] + jobs[:shift]:
                    runs.setdefault((c, name), []).append(job())
            print(f"  pass {rep + 1}/{args.repeats} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    off = asyncio.run(generator_levels(gen, levels, args.max_tokens, args.rounds))

    def med(c, name, key="tokens_per_s"):
        values = [r[key] for r in runs[(c, name)] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    print(f"{'conc':>4} {'thread':>6} {'engine':>7} {'gen':>7} {'gRPC':>7} {'HTTP':>7} {'gen/eng':>7} "
          f"{'gRPC/eng':>8} {'HTTP/eng':>8} {'TTFT p50 gRPC/HTTP':>19} {'ITL p50 gRPC/HTTP':>18}")
    for c in levels:
        raw = med(c, "raw")
        for m in modes:
            g, h = med(c, (m, "gRPC")), med(c, (m, "HTTP"))
            errors = sum(r.get("errors", 0) for name in ((m, "gRPC"), (m, "HTTP")) for r in runs[(c, name)])
            print(f"{c:4d} {m:>6} {raw:7.1f} {off[c]:7.1f} {g:7.1f} {h:7.1f} {off[c] / raw:7.2f} "
                  f"{g / raw:8.2f} {h / raw:8.2f} {med(c, (m, 'gRPC'), 'ttft_ms_p50'):9.1f}/"
                  f"{med(c, (m, 'HTTP'), 'ttft_ms_p50'):<9.1f} {med(c, (m, 'gRPC'), 'itl_ms_p50'):8.1f}/"
                  f"{med(c, (m, 'HTTP'), 'itl_ms_p50'):<8.1f}" + (f" errors {errors}" if errors else ""))
    per_pass = " ".join(f"{c}:" + ",".join(f"{r['tokens_per_s']:.0f}" for r in runs[(c, 'raw')]) for c in levels)
    print(f"raw engine tok/s per pass (level:passes): {per_pass}")
    print("api_overhead: done (tokens/s, medians of the passes; ratios are the result, absolute "
          "numbers vary by machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
