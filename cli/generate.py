"""`prefloop generate "PROMPT"`: one generation with the native engine, streamed or as JSON.

Everything that needs no model (the prompt, the sampling values, the --model path) is checked
before torch is imported, so a mistake is reported at once, not after a kernel build or a load."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from prefloop.cli.model_args import add_model_arguments, generator_kwargs
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import PrefloopError
from prefloop.server.model.options import check_model_path
from prefloop.server.serving.generator import check_prompt_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches "
                        "P, in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the context; 1 = off")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's, in [-2, 2]: subtracted from a token's logit per time it occurs in "
                        "the completion so far; 0 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's, in [-2, 2]: subtracted once from a token that occurs in the "
                        "completion so far; 0 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling (same seed and settings, same text; default random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, finish_reason, prompt_tokens, completion_tokens")
    add_model_arguments(p)


def _check(args) -> SamplingParams:
    """What needs no model: raises the typed error a late check would have raised."""
    check_prompt_text(args.prompt)
    check_model_path(args.model)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop),
                          repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty)


async def _generate(args, params: SamplingParams) -> dict:
    from prefloop.server.serving.build import build_generator  # imports torch: after the checks

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
        params = _check(args)
        result = asyncio.run(_generate(args, params))
    except PrefloopError as exc:
        print(f"prefloop generate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0
