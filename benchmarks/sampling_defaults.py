"""Which sampling defaults give coherent answers on the default model? Short factual questions
with a known answer word, answered at several (temperature, top_p) settings with several seeds on
the in-process Generator; prints the share of answers that contain the right word, side by side.

    python benchmarks/sampling_defaults.py [--seeds 5] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("How many days are in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is 2 + 2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
]
SETTINGS = [(1.0, 1.0), (0.7, 0.95), (0.3, 0.9), (0.0, 1.0)]  # (temperature, top_p); 0 = greedy


def right(answer: str, expected) -> bool:
    words = expected if isinstance(expected, tuple) else (expected,)
    return any(w in answer.lower() for w in words)


async def run(seeds: int, max_tokens: int) -> dict:
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator
    gen = build_generator()
    await gen.start()
    try:
        async def answer(question: str, temperature: float, top_p: float, seed: int) -> str:
            ids = gen.chat_ids([{"role": "user", "content": question}])
            params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                    max_tokens=max_tokens)
            return "".join([d.text_delta async for d in gen.stream(uuid.uuid4().hex, ids, params)])

        out = {}
        for temperature, top_p in SETTINGS:
            runs = [(q, e, s) for q, e in QUESTIONS for s in range(seeds if temperature else 1)]
            answers = await asyncio.gather(*(answer(q, temperature, top_p, s) for q, _, s in runs))
            out[(temperature, top_p)] = sum(right(a, e) for a, (_, e, _) in zip(answers, runs)) / len(runs)
            print(f"temperature {temperature:.1f} top_p {top_p:.2f}: {out[(temperature, top_p)]:.2f} "
                  f"right over {len(runs)} answers", flush=True)
        return out
    finally:
        await gen.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="samples per question (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="default %(default)s")
    args = ap.parse_args()
    print(f"sampling_defaults: {len(QUESTIONS)} questions x {args.seeds} seeds per setting", flush=True)
    asyncio.run(run(args.seeds, args.max_tokens))
    print("sampling_defaults: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
