"""The `prefloop` command: one argparse parser, one module per subcommand, imported lazily.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. This file is only
the table that composes them; a command's module is imported only when it is invoked (`prefloop chat`
never imports torch). Every parser shows defaults in --help;
an unknown flag is reported with the usage of the (sub)command it was given to and the closest flag
it knows ("did you mean --port?").
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already names its default or
    there is none to show (None, False of a switch, suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-parsers (and theirs) show defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest (sub)parser the command line selected (`prefloop models promote` -> promote's)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs and subs[0].dest != argparse.SUPPRESS else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """"unrecognized arguments: --prot (did you mean --port?)", the suggestion from the flags that
    `parser` knows."""
    known = [o for a in parser._actions for o in a.option_strings]
    parts = []
    for arg in extras:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("-") else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(parts)

def _module(name: str):
    """The module of one subcommand, imported when it is invoked (so `prefloop chat` never
    imports torch); plain import statements, which the import-layer test reads."""
    if name == "generate":
        from prefloop.cli import generate as module
    elif name == "serve":
        from prefloop.cli import serve as module
    elif name == "chat":
        from prefloop.cli import chat as module
    elif name == "bench":
        from prefloop.cli import bench as module
    elif name == "stats":
        from prefloop.cli import stats as module
    elif name == "logs":
        from prefloop.cli import logs as module
    elif name == "rope":
        from prefloop.cli import rope as module
    elif name == "align":
        from prefloop.cli import align as module
    elif name == "models":
        from prefloop.cli import models as module
    elif name == "cluster":
        from prefloop.cli import cluster as module
    else:
        raise KeyError(name)
    return module


# name -> one-line help (the module is `prefloop.cli.<name>`)
COMMANDS: dict[str, str] = {
    "generate": "generate text from a prompt with the native engine",
    "serve": "serve the model: gRPC, the OpenAI-compatible HTTP API, feedback routes and the "
             "web page",
    "chat": "terminal chat against a running server",
    "bench": "load-test a running server (tokens/s, TTFT, ITL)",
    "stats": "a running server's engine now: running, waiting, KV-cache use, prefix hits, version",
    "logs": "inspect and export the feedback / generation logs",
    "rope": "measure why RoPE suits a KV cache on the loaded model (table, JSON, plot)",
    "align": "retrain on the feedback log (SFT, DPO/KTO, reward model + PPO), gate, publish",
    "models": "the model registry: list, show, promote, rollback, prune, A/B tests",
    "cluster": "several serve replicas on one data root behind nginx, on this machine",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="prefloop",
        description="prefloop: a self-improving chat server (serve, log preferences, retrain, hot-swap).")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level: DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            mod = _module(name)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the `prefloop` command itself, not a caller importing it
    argv = sys.argv[1:] if argv is None else argv
    if "align" in argv:  # `align run --method M` (the older spelling) -> `align run M`
        from prefloop.cli.align import canonical_argv
        argv = canonical_argv(argv)
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the (sub)command they were given to, with its usage
        sub = chosen_parser(parser, args)
        sub.error(unknown_flags_message(sub, extras))
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if own_process and args.command == "align":  # a job's steps reuse what the last one freed
        from prefloop.align.train.heap import keep_freed_memory
        keep_freed_memory()
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
