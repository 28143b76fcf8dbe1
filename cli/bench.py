"""`prefloop bench`: streaming load test of a running server.

For each concurrency level C, C workers each send `--rounds` streaming Chat requests back to back
(prompts that ask for long answers; the API has no ignore_eos, so the actual completion tokens
are counted). Reported per level: aggregate completion tokens/s over the level's wall time, time
to first token (TTFT) and inter-token latency (ITL) p50/p99, errors. `--json` prints one JSON
object instead of the table. Each level's row is printed as soon as the level finishes; a
progress bar over all measured requests goes to stderr (`--no-progress` turns it off).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

from prefloop.clients.client import DEFAULT_TARGET, TOKEN_ENV, AsyncClient
from prefloop.clients.errors import ClientError

TOPICS = [
    "the history of the Roman Empire", "how airplanes fly", "the water cycle",
    "photosynthesis", "the life of a honeybee", "how computers store numbers",
    "the French Revolution", "volcanoes", "how vaccines work", "the solar system",
    "the invention of the printing press", "ocean currents", "how bridges are built",
    "the migration of birds", "the origins of chess", "how electricity reaches a home",
]
PROMPT = "Write a long, detailed essay about {topic}, with an introduction and several sections."


@dataclass
class RequestSample:
    ok: bool
    completion_tokens: int = 0
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)  # one entry per token after the first
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    itl_ms_p50: float | None
    itl_ms_p99: float | None
    mean_completion_tokens: float
    first_error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def one_request(client: AsyncClient, prompt: str, max_tokens: int, temperature: float,
                      timeout: float, bar=None) -> RequestSample:
    sample = RequestSample(ok=False)
    start = time.perf_counter()
    last_at, last_tokens = None, 0
    try:
        async for chunk in client.chat_stream([{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=temperature,
                                              timeout=timeout):
            now = time.perf_counter()
            new_tokens = chunk.completion_tokens - last_tokens
            if new_tokens <= 0:
                continue
            if last_at is None:
                sample.ttft_s = now - start
                new_tokens -= 1  # the first token's latency is the TTFT
            if new_tokens > 0 and last_at is not None:
                sample.token_gaps_s.extend([(now - last_at) / new_tokens] * new_tokens)
            last_at, last_tokens = now, chunk.completion_tokens
        sample.ok = True
    except ClientError as exc:
        sample.error = str(exc)
    sample.completion_tokens = last_tokens
    if bar is not None:
        bar.update(1)
    return sample


async def run_level(client: AsyncClient, concurrency: int, rounds: int, max_tokens: int,
                    temperature: float, timeout: float, offset: int, bar=None) -> LevelResult:
    async def worker(w: int) -> list[RequestSample]:
        out = []
        for r in range(rounds):
            topic = TOPICS[(offset + w * rounds + r) % len(TOPICS)]
            out.append(await one_request(client, PROMPT.format(topic=topic), max_tokens,
                                         temperature, timeout, bar))
        return out

    start = time.perf_counter()
    per_worker = await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    samples = [s for ws in per_worker for s in ws]
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in samples)
    ttfts = [s.ttft_s * 1000 for s in good if s.ttft_s is not None]
    gaps = [g * 1000 for s in good for g in s.token_gaps_s]
    errors = [s.error for s in samples if not s.ok]

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return LevelResult(
        concurrency=concurrency, requests=len(samples), errors=len(errors),
        completion_tokens=tokens, wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 2) if wall > 0 else 0.0,
        requests_per_s=round(len(good) / wall, 3) if wall > 0 else 0.0,
        ttft_ms_p50=r(percentile(ttfts, 50)), ttft_ms_p99=r(percentile(ttfts, 99)),
        itl_ms_p50=r(percentile(gaps, 50)), itl_ms_p99=r(percentile(gaps, 99)),
        mean_completion_tokens=round(tokens / len(samples), 1) if samples else 0.0,
        first_error=errors[0] if errors else None)


async def bench(args: argparse.Namespace) -> dict:
    levels = parse_levels(args.concurrency)
    async with AsyncClient(args.target, token=args.token, root_certificates=args.tls_root_cert,
                           tls=args.tls) as client:
        info = await client.model_info(timeout=30)
        for w in range(args.warmup):  # first requests pay one-time costs (allocation, caches)
            await one_request(client, PROMPT.format(topic=TOPICS[w % len(TOPICS)]),
                              min(8, args.max_tokens), args.temperature, args.timeout)
        results = []
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(levels) * args.rounds, desc="requests", unit="req", file=sys.stderr,
                   disable=not getattr(args, "progress", True), dynamic_ncols=True)
        try:
            for i, c in enumerate(levels):
                bar.set_postfix_str(f"concurrency {c}")
                level = await run_level(client, c, args.rounds, args.max_tokens,
                                        args.temperature, args.timeout, offset=i, bar=bar)
                results.append(level)
                if not args.json:  # the row as soon as its level is done, above the bar
                    bar.write(format_row(level), file=sys.stdout)
                    sys.stdout.flush()
        finally:
            bar.close()
    return {"target": args.target, "model_version": info.model_version,
            "backend": info.backend, "dtype": info.dtype, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "temperature": args.temperature,
            "results": [asdict(level) for level in results]}


HEADER = (f"{'conc':>5} {'reqs':>5} {'err':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>8} "
          f"{'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8}  (ms)")


def format_row(level: LevelResult) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    return (f"{level.concurrency:>5} {level.requests:>5} {level.errors:>4} "
            f"{level.completion_tokens:>7} {level.wall_s:>7.2f} {level.tokens_per_s:>8.1f} "
            f"{f(level.ttft_ms_p50):>9} {f(level.ttft_ms_p99):>9} {f(level.itl_ms_p50):>8} "
            f"{f(level.itl_ms_p99):>8}")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency must be integers like 1,8,32: {text!r}")
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"--concurrency levels must be >= 1: {text!r}")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="server address host:port (default %(default)s)")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="comma-separated concurrency levels (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="max_tokens of each request (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests each worker sends one after another (default "
                             "%(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="short requests sent before measuring (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="deadline of each request in seconds (default %(default)s)")
    parser.add_argument("--token", default=None, help=f"bearer token (default ${TOKEN_ENV})")
    parser.add_argument("--tls-root-cert", default=None, help="PEM root certificate (enables TLS)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    try:
        parse_levels(args.concurrency)
    except argparse.ArgumentTypeError as exc:
        print(f"prefloop bench: {exc}", file=sys.stderr)
        return 2
    if args.max_tokens < 1 or args.rounds < 1:
        print("prefloop bench: --max-tokens and --rounds must be >= 1", file=sys.stderr)
        return 2
    if not args.json:
        print(f"bench {args.target}: max_tokens {args.max_tokens}, {args.rounds} rounds per "
              f"worker, temperature {args.temperature}")
        print(HEADER, flush=True)
    try:
        report = asyncio.run(bench(args))
    except ClientError as exc:
        print(f"prefloop bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if any(level["errors"] for level in report["results"]) else 0
