"""prefloop.cli: the `prefloop` command: the dispatcher (main.py) and every subcommand, the only
package that names both the server side and align."""
from prefloop.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
