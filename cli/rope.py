"""`prefloop rope`: measure why RoPE suits a KV cache on the loaded model (server/studies/rope_study.py).

Prints a table (or one JSON object with --json) and writes rope_relative.png and rope.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prefloop.server.errors import PrefloopError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rope-study", metavar="DIR",
                   help="where rope_relative.png and rope.json are written (default ./rope-study)")
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON object")
    p.add_argument("--tokens", type=int, default=256,
                   help="prompt tokens for the cache and move measurements (default 256)")
    # the model flags the study uses (it builds its own small engines and caches)
    p.add_argument("--model", default=None,
                   help="HF-format Llama-family folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights/activations dtype of the study (float32: the measurements compare "
                        "rounding errors, so they default to full precision)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    p.add_argument("--cache-dir", default=None, help="where converted models are cached")


def run(args) -> int:
    from prefloop.server.studies.rope_study import format_report, run_rope_study
    try:
        result = run_rope_study(args.model, args.out, cache_dir=args.cache_dir, dtype=args.dtype,
                                device=args.device, num_tokens=args.tokens)
    except PrefloopError as exc:
        print(f"prefloop rope: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out / "rope.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "rope.json")
    print(json.dumps(result) if args.json else format_report(result))
    return 0
