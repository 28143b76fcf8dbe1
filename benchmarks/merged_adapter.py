"""A promoted adapter version: decode speed on the adapter view vs on its merged weights.

After a hot-swap to a version published as a LoRA adapter over the served one, the native server
serves it at once as a per-request adapter on the engine it had (the "view"), and, by default,
loads the version's merged weights in the background and moves new requests there
(server/serving/generator.py; `prefloop serve --no-merge-adapters` keeps the view). This measures
what users get from each, against the bare thing: the same engine serving the base version.

One registry in a temporary folder: v0000 the default model, v0001 a random adapter of the align
job's shape and size (benchmarks/adapter_versions.py `publish_both`). Per repeat, in one process:
a generator on v0000 serves `--streams` users who each ask 3 questions one after the other,
answers of `--tokens`/2 to `--tokens` tokens (ignore_eos; the web page's temperature 0.7,
`--repetition-penalty`; prompts arrive while others decode, as on a server), is swapped to
v0001 and serves the same on the view; a second generator with `merge_adapters` is swapped to
v0001, waits for the merge and serves the same on the merged weights. Aggregate tokens/s of
each, and each repeat's ratios to that repeat's base; the median over `--repeats` (ratios, not
absolute times: this VM is noisy).

    python benchmarks/merged_adapter.py [--streams 8] [--tokens 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter_versions import publish_both  # noqa: E402

QUESTION = "Tell me about the sea."


async def decode_tok_s(generator, streams: int, tokens: int, repetition_penalty: float,
                       requests: int = 3) -> float:
    """Aggregate tokens/s of `streams` users each asking `requests` questions one after the other,
    every answer exactly its drawn length (`tokens`/2 to `tokens`, the same draws every call), so
    new prompts arrive while others decode, as on a server; not only one burst then pure decode."""
    import random

    from prefloop.server.engine.sampling_params import SamplingParams

    ids = generator.chat_ids([{"role": "user", "content": QUESTION}])
    draws = random.Random(0)
    lengths = [[draws.randint(max(1, tokens // 2), tokens) for _ in range(requests)]
               for _ in range(streams)]

    async def user(i: int) -> int:
        n = 0
        for j, length in enumerate(lengths[i]):
            params = SamplingParams(temperature=0.7, max_tokens=length, seed=100 * i + j,
                                    ignore_eos=True, repetition_penalty=repetition_penalty)
            async for delta in generator.stream(f"bench-{time.monotonic_ns()}-{i}-{j}", ids, params):
                n += len(delta.token_ids)
        return n

    started = time.perf_counter()
    total = sum(await asyncio.gather(*(user(i) for i in range(streams))))
    return total / (time.perf_counter() - started)


async def one_repeat(registry, adapter: str, args) -> dict[str, float]:
    from prefloop.server.serving.build import build_generator

    def generator(merge: bool):
        return build_generator(model=str(registry.version_dir("v0000")), model_version="v0000",
                               kv_cache_tokens=args.streams * (args.tokens + 64),
                               merge_adapters=merge)

    out = {}
    view = generator(False)
    await view.start()
    try:
        await decode_tok_s(view, 2, 8, args.repetition_penalty, 1)  # warm-up
        out["base"] = await decode_tok_s(view, args.streams, args.tokens, args.repetition_penalty)
        await view.swap(registry.version_dir(adapter), adapter)
        assert view._current.adapter, "the swap did not serve an adapter view"
        out["view"] = await decode_tok_s(view, args.streams, args.tokens, args.repetition_penalty)
    finally:
        await view.close()
    merged = generator(True)
    await merged.start()
    try:
        await merged.swap(registry.version_dir(adapter), adapter)
        started = time.perf_counter()
        await merged._merging
        out["merge_s"] = time.perf_counter() - started
        assert not merged._current.adapter, "the merge did not take over"
        await decode_tok_s(merged, 2, 8, args.repetition_penalty, 1)  # warm-up of the new engine
        out["merged"] = await decode_tok_s(merged, args.streams, args.tokens, args.repetition_penalty)
    finally:
        await merged.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8, help="concurrent answers (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per answer (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats, median shown (default %(default)s)")
    ap.add_argument("--repetition-penalty", type=float, default=1.1,
                    help="every answer's repetition penalty (default %(default)s, the loop "
                         "benchmark's server setting)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default %(default)s: align's)")
    args = ap.parse_args()
    if args.streams < 1 or args.tokens < 1 or args.repeats < 1:
        ap.error("--streams, --tokens and --repeats must be >= 1")
    from prefloop.server.model.loader import resolve_model_dir
    from prefloop.server.registry import Registry

    print(f"merged_adapter: {args.repeats} repeat(s) of base / adapter view / merged weights at "
          f"{args.streams} streams x {args.tokens} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="prefloop-merged-adapter-") as tmp:
        registry = Registry(Path(tmp) / "data")
        registry.ensure_base(resolve_model_dir(None))
        adapter, _ = publish_both(registry, registry.version_dir("v0000"), args.rank)
        rows = []
        for r in range(args.repeats):
            row = asyncio.run(one_repeat(registry, adapter, args))
            rows.append(row)
            print(f"  repeat {r + 1}: base {row['base']:.1f} tok/s, view {row['view']:.1f} "
                  f"({row['view'] / row['base']:.2f}x), merged {row['merged']:.1f} "
                  f"({row['merged'] / row['base']:.2f}x); merge loaded in {row['merge_s']:.1f} s",
                  flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("base", "view", "merged", "merge_s")}
    view_ratio = statistics.median(r["view"] / r["base"] for r in rows)
    merged_ratio = statistics.median(r["merged"] / r["base"] for r in rows)
    print(f"| streams x tokens | base tok/s | adapter view | merged weights | merge load s |\n"
          f"|---|---|---|---|---|\n"
          f"| {args.streams} x {args.tokens} | {med['base']:.1f} | {med['view']:.1f} "
          f"({view_ratio:.2f}x) | {med['merged']:.1f} ({merged_ratio:.2f}x) | {med['merge_s']:.1f} |")
    print("merged_adapter: done (ratios: the median of each repeat's ratio to its own base)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
