"""Feedback log benchmark: acknowledged submissions/s with fsync on, and the request-path cost of
logging a generation row.

    python benchmarks/feedback_throughput.py                     # store level, 1/16/64 clients
    python benchmarks/feedback_throughput.py --clients 1 16 64 --seconds 5 --json
    python benchmarks/feedback_throughput.py --target 127.0.0.1:50051   # through a running server

"Acknowledged" means the submission returned OK: the row is in the write-ahead log and fsync'd
(group commit). Store level: clients are asyncio tasks calling `asubmit_rating` on one event loop,
like the gRPC server's handlers. With --target: clients are asyncio tasks calling
`AsyncClient.submit_rating` over gRPC (one channel per 16 clients) against `prefloop serve`,
after one n=2 chat request there made the response ids. Each client submits ratings with a fresh
idempotency key back to back. Generation rows (store level only) are recorded from the loop thread
with `record_generation` and timed call by call (p50/p99), with the writer thread busy. The data
directory defaults to a temporary directory on the same disk as /tmp.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import WalConfig

SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "max_tokens": 64, "stop": [],
            "seed": None, "n": 1, "repetition_penalty": 1.0}


def generation_row(i: int) -> dict:
    return {"response_id": f"resp-{uuid.uuid4().hex}", "request_id": f"req-{i}",
            "session_id": "bench", "user_id": "bench", "model_version": "v0001",
            "backend": "native",
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": f"Question number {i}: what is a KV cache?"}],
            "prompt": None, "completion": "A cache of attention keys and values. " * 8,
            "finish_reason": "stop", "prompt_tokens": 31, "completion_tokens": 64,
            "sampling": SAMPLING, "latency_ms": 812.5, "ttft_ms": 40.25}


async def submissions_per_second(store: FeedbackStore, response_ids: list[str], clients: int,
                                 seconds: float) -> dict:
    stop_at = time.perf_counter() + seconds
    counts = [0] * clients
    latencies: list[float] = []

    async def client(c: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ack = await store.asubmit_rating(
                response_id=response_ids[(c * 7919 + i) % len(response_ids)],
                score=1 if i % 2 else -1, idempotency_key=f"bench-{c}-{i}-{uuid.uuid4().hex}",
                user_id=f"user-{c}", session_id=f"session-{c}")
            assert not ack.duplicate
            latencies.append(time.perf_counter() - t0)
            counts[c] += 1
            i += 1

    fsyncs0, records0 = store.wal.stats.fsyncs, store.wal.stats.records
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    total = sum(counts)
    fsyncs = store.wal.stats.fsyncs - fsyncs0
    latencies.sort()
    return {"clients": clients, "submissions": total, "seconds": round(elapsed, 3),
            "per_second": round(total / elapsed, 1), "fsyncs": fsyncs,
            "records_per_fsync": round((store.wal.stats.records - records0) / max(fsyncs, 1), 1),
            "latency_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
            "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3)}


async def grpc_submissions_per_second(target: str, clients: int, seconds: float) -> dict:
    from prefloop.clients import AsyncClient

    channels = [AsyncClient(target, timeout=30) for _ in range(max(1, clients // 16))]
    try:
        reply = await channels[0].chat([{"role": "user", "content": "Hi"}], max_tokens=2, n=2)
        ids = [c.response_id for c in reply.completions]
        stop_at = time.perf_counter() + seconds
        counts = [0] * clients
        latencies: list[float] = []

        async def client(c: int) -> None:
            stub, i = channels[c % len(channels)], 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await stub.submit_rating(ids[i % 2], 1 if i % 2 else -1,
                                         idempotency_key=f"bench-{c}-{uuid.uuid4().hex}")
                latencies.append(time.perf_counter() - t0)
                counts[c] += 1
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.aclose()
    latencies.sort()
    total = sum(counts)
    return {"clients": clients, "submissions": total, "seconds": round(elapsed, 3),
            "per_second": round(total / elapsed, 1), "fsyncs": None, "records_per_fsync": None,
            "latency_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
            "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3)}


async def record_generation_cost(store: FeedbackStore, n: int) -> dict:
    rows = [generation_row(i) for i in range(n)]
    times = []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        store.record_generation(row)
        times.append(time.perf_counter() - t0)
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the loop breathe, as between real requests
    times.sort()
    return {"calls": n, "p50_us": round(statistics.median(times) * 1e6, 1),
            "p99_us": round(times[int(n * 0.99)] * 1e6, 1),
            "max_us": round(times[-1] * 1e6, 1)}


async def main_async(args: argparse.Namespace, data_dir: Path) -> dict:
    store = FeedbackStore(StoreConfig(data_dir=data_dir, wal=WalConfig()))
    assert store.available, store.unavailable_reason
    try:
        gen = await record_generation_cost(store, args.generations)
        ids = [generation_row(i)["response_id"] for i in range(1000)]
        for i, rid in enumerate(ids):
            store.record_generation(dict(generation_row(i), response_id=rid))
        runs = [await submissions_per_second(store, ids, c, args.seconds) for c in args.clients]
    finally:
        t0 = time.perf_counter()
        store.close()
        close_s = time.perf_counter() - t0
    return {"record_generation": gen, "submissions": runs, "close_and_compact_s": round(close_s, 2),
            "compaction": {"segments": store.compactor.stats.segments,
                           "parts": store.compactor.stats.parts,
                           "rows": store.compactor.stats.rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="per client count")
    parser.add_argument("--generations", type=int, default=5000,
                        help="record_generation calls timed")
    parser.add_argument("--data-dir", default=None, help="default: a fresh temp dir")
    parser.add_argument("--target", default=None,
                        help="benchmark a running server over gRPC instead of the store")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.target:
        runs = [asyncio.run(grpc_submissions_per_second(args.target, c, args.seconds))
                for c in args.clients]
        if args.json:
            print(json.dumps({"target": args.target, "submissions": runs}, indent=2))
            return 0
        print(f"over gRPC to {args.target}")
        print(f"{'clients':>8} {'acks/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for r in runs:
            print(f"{r['clients']:>8} {r['per_second']:>9} {r['latency_p50_ms']:>8} "
                  f"{r['latency_p99_ms']:>8}")
        return 0
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        result = asyncio.run(main_async(args, data_dir))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    g = result["record_generation"]
    print(f"record_generation: p50 {g['p50_us']} us, p99 {g['p99_us']} us, max {g['max_us']} us "
          f"({g['calls']} calls)")
    print(f"{'clients':>8} {'acks/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'fsyncs':>7} "
          f"{'recs/fsync':>10}")
    for r in result["submissions"]:
        print(f"{r['clients']:>8} {r['per_second']:>9} {r['latency_p50_ms']:>8} "
              f"{r['latency_p99_ms']:>8} {r['fsyncs']:>7} {r['records_per_fsync']:>10}")
    print(f"close (commit + compact everything): {result['close_and_compact_s']} s, "
          f"{result['compaction']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
