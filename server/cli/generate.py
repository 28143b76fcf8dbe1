"""`prefloop generate "PROMPT"`: one generation with the native engine, streamed or as JSON."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from prefloop.server.cli.model_args import add_model_arguments, generator_kwargs
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import PrefloopError
from prefloop.server.serving.build import build_generator


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, finish_reason, prompt_tokens, completion_tokens")
    add_model_arguments(p)


async def _generate(args) -> dict:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop),
                            repetition_penalty=args.repetition_penalty)  # validated before loading
    gen = build_generator(**generator_kwargs(args))
    await gen.start()
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": args.prompt})
            ids = gen.chat_ids(messages)
        else:
            ids = gen.prompt_ids(args.prompt)
        text, token_ids, reason = [], [], None
        async for d in gen.stream(uuid.uuid4().hex, ids, params):
            text.append(d.text_delta)
            token_ids.extend(d.token_ids)
            reason = d.finish_reason or reason
            if not args.json:
                print(d.text_delta, end="", flush=True)
        if not args.json:
            print()
        return {"text": "".join(text), "token_ids": token_ids, "finish_reason": reason,
                "prompt_tokens": len(ids), "completion_tokens": len(token_ids),
                "model_version": gen.info.model_version}
    finally:
        await gen.close()


def run(args) -> int:
    try:
        result = asyncio.run(_generate(args))
    except PrefloopError as exc:
        print(f"prefloop generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0
