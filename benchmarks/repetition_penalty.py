"""Does a repetition penalty keep the default model's whole answers from looping, and what does
it cost? At the web page's settings (temperature 0.7, the server's 256 tokens) the default
model loops on about two answers in three to the loop benchmark's held-out prompts
(docs/loop_benchmark.md). For each penalty, side by side: the share of answers that loop (the
gate's test, align/degeneration.py), that leave their topic, mean words, and the share that end
before the cap, on the held-out prompts of each topic split (choose on the first split, report
on the others); then the share of right answers to benchmarks/sampling_defaults.py's factual
questions. In-process Generator (the default model, as served), one answer per prompt, the same
seeds for every penalty.

    python benchmarks/repetition_penalty.py [--penalties 1.0,1.05,1.1,1.2] [--splits 0,21]
        [--templates 3] [--max-tokens 256] [--temperature 0.7] [--show N]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_quality import wilson  # noqa: E402
from loop_users import prompts  # noqa: E402
from sampling_defaults import QUESTIONS, right  # noqa: E402


async def answers(gen, asks: list[str], *, temperature: float, top_p: float, penalty: float,
                  max_tokens: int) -> list[tuple[str, str]]:
    """(text, finish reason) per prompt, seeded by position (the same seeds for every penalty)."""
    from prefloop.server.engine.sampling_params import SamplingParams

    async def one(i: int, ask: str) -> tuple[str, str]:
        ids = gen.chat_ids([{"role": "user", "content": ask}])
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=5000 + i,
                                max_tokens=max_tokens, repetition_penalty=penalty)
        text, reason = [], ""
        async for d in gen.stream(uuid.uuid4().hex, ids, params):
            text.append(d.text_delta)
            reason = d.finish_reason or reason
        return "".join(text), reason
    return list(await asyncio.gather(*(one(i, a) for i, a in enumerate(asks))))


def summary(asks: list[str], got: list[tuple[str, str]]) -> str:
    from prefloop.align.degeneration import answer_stats, off_topic
    stats = [answer_stats(t) for t, _ in got]
    n = len(got)
    loops = sum(s.loops for s in stats)
    lo, hi = wilson(loops, n)
    away = sum(off_topic(q, t) for q, (t, _) in zip(asks, got))
    ended = sum(r == "stop" for _, r in got)
    words = sum(s.words for s in stats) / max(n, 1)
    return (f"loops {loops / n:.0%} [{lo:.0%}, {hi:.0%}]  off topic {away / n:.0%}  "
            f"ended {ended / n:.0%}  mean words {words:.0f}")


async def run(args) -> None:
    from prefloop.server.serving.build import build_generator
    gen = build_generator()
    await gen.start()
    try:
        for split in args.splits:
            asks = prompts(seed=split, templates=args.templates)[1]
            print(f"split {split}: {len(asks)} held-out prompts, temperature {args.temperature} "
                  f"top_p {args.top_p}, up to {args.max_tokens} tokens", flush=True)
            for penalty in args.penalties:
                got = await answers(gen, asks, temperature=args.temperature, top_p=args.top_p,
                                    penalty=penalty, max_tokens=args.max_tokens)
                print(f"  repetition_penalty {penalty:<5g} {summary(asks, got)}", flush=True)
                for ask, (text, reason) in list(zip(asks, got))[:args.show]:
                    print(f"      {ask!r} ({reason}): {text[-args.show_chars:]!r}", flush=True)
        runs = [(q, e, s) for q, e in QUESTIONS for s in range(args.seeds)]
        if not runs:
            return
        print(f"factual questions: {len(QUESTIONS)} x {args.seeds} seeds, up to 32 tokens",
              flush=True)
        for temperature in (args.temperature, 0.3):
            for penalty in args.penalties:
                got = await answers(gen, [q for q, _, _ in runs], temperature=temperature,
                                    top_p=args.top_p, penalty=penalty, max_tokens=32)
                k = sum(right(t, e) for (t, _), (_, e, _) in zip(got, runs))
                lo, hi = wilson(k, len(runs))
                print(f"  temperature {temperature} repetition_penalty {penalty:<5g} right "
                      f"{k / len(runs):.2f} [{lo:.2f}, {hi:.2f}] of {len(runs)}", flush=True)
    finally:
        await gen.close()


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--penalties", type=floats, default=floats("1.0,1.05,1.1,1.2"),
                    help="comma-separated repetition penalties (default 1.0,1.05,1.1,1.2)")
    ap.add_argument("--splits", type=lambda s: [int(x) for x in s.split(",")], default=[0, 21],
                    help="loop benchmark topic seeds: choose on the first, report on the rest "
                         "(default 0,21)")
    ap.add_argument("--templates", type=int, default=3,
                    help="prompts per held-out topic (24 topics; default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=256, help="default %(default)s (the server's)")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="default %(default)s (the web page's)")
    ap.add_argument("--top-p", type=float, default=0.9, help="default %(default)s (the server's)")
    ap.add_argument("--show", type=int, default=0,
                    help="print the last --show-chars characters of the first N answers of each "
                         "penalty (default %(default)s)")
    ap.add_argument("--show-chars", type=int, default=240, help="default %(default)s")
    ap.add_argument("--seeds", type=int, default=5,
                    help="samples per factual question (0: none; default %(default)s)")
    args = ap.parse_args()
    print(f"repetition_penalty: penalties {args.penalties} on splits {args.splits}", flush=True)
    asyncio.run(run(args))
    print("repetition_penalty: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
