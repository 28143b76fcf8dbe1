"""prefloop.server.cli: the `prefloop` command (main.py) and the server's subcommands."""
from prefloop.server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
