"""The `prefloop` command: one argparse parser, one module per subcommand, imported lazily.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. This file is only
the table that composes them (clients' and align's commands are imported by name when invoked, so
the server package does not depend on them at import time).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("prefloop.server.cli.generate", "generate text from a prompt with the native engine"),
    "serve": ("prefloop.server.cli.serve", "serve the model over gRPC"),
    "chat": ("prefloop.clients.chat_cmd", "terminal chat against a running server"),
    "bench": ("prefloop.clients.bench_cmd", "load-test a running server (tokens/s, TTFT, ITL)"),
    "logs": ("prefloop.server.cli.logs", "inspect and export the feedback / generation logs"),
    "rope": ("prefloop.server.cli.rope", "measure why RoPE suits a KV cache on the loaded model (table, JSON, plot)"),
    "align": ("prefloop.align.cli.align", "retrain on the feedback log (DPO/KTO, reward model + PPO), gate, publish"),
    "models": ("prefloop.align.cli.models", "the model registry: list, show, promote, rollback"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="prefloop: a self-improving chat server (serve, log preferences, retrain, hot-swap).")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
