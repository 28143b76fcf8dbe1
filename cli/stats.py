"""`prefloop stats`: what a running server's engine is doing now, through the Models
GetModelInfo and GetEngineStats RPCs (the latter needs an admin token when auth is on).

    prefloop stats --target HOST:PORT [--token T] [--json]

Prints the served version and its sampling defaults, running / waiting sequences, KV-cache use (used / total blocks),
prompt tokens served from the prefix cache, the admission queue, and any extra numbers the engine
reports. A CLI subcommand module (`add_arguments(parser)`, `run(args) -> int`, registered in
cli/main.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from prefloop.clients.client import DEFAULT_TARGET, TOKEN_ENV, Client, EngineStats, ModelInfo
from prefloop.clients.errors import ClientError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    parser.add_argument("--token", default=None,
                        help=f"admin bearer token when auth is on (default ${TOKEN_ENV})")
    parser.add_argument("--tls-root-cert", default=None, help="PEM root certificate (enables TLS)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the server's answer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def report(info: ModelInfo, stats: EngineStats) -> dict:
    used = stats.total_blocks - stats.free_blocks
    return {"model_version": info.model_version, "backend": info.backend, "dtype": info.dtype,
            "context_length": info.context_length, "sampling_defaults": info.sampling_defaults,
            **asdict(stats), "used_blocks": used,
            "kv_use": round(used / stats.total_blocks, 4) if stats.total_blocks else None}


def format_defaults(defaults: dict) -> str:
    """"temperature 0.3, top_p 0.9, top_k 0, repetition_penalty 1 (a request's unset fields)" or
    "-" (repetition_penalty only where the server reports it)."""
    if not defaults:
        return "-"
    return (", ".join(f"{k} {defaults[k]:g}" for k in ("temperature", "top_p", "top_k",
                                                        "repetition_penalty") if k in defaults)
            + " (a request's unset fields)")


def format_report(r: dict) -> str:
    kv = (f"{r['used_blocks']} / {r['total_blocks']} blocks ({100 * r['kv_use']:.1f} %)"
          if r["kv_use"] is not None else "-")
    lines = [f"version        {r['model_version']} ({r['backend']} {r['dtype']}, context "
             f"{r['context_length']} tokens)",
             f"sampling       {format_defaults(r['sampling_defaults'])}",
             f"running        {r['running']}",
             f"waiting        {r['waiting']}",
             f"KV cache used  {kv}",
             f"prefix hits    {r['prefix_cache_hit_tokens']} prompt tokens",
             f"requests       {r['active_requests']} active, {r['queued_requests']} queued"]
    lines += [f"{name:<14} {value:g}" for name, value in sorted(r["extra"].items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.target, token=args.token, root_certificates=args.tls_root_cert,
                    tls=args.tls, timeout=args.timeout) as client:
            r = report(client.model_info(), client.engine_stats())
    except ClientError as exc:
        print(f"prefloop stats: {args.target}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0
