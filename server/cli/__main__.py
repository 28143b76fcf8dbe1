"""`python -m prefloop.server.cli ...` runs the `prefloop` command (align's scheduler uses it)."""
import sys

from prefloop.server.cli.main import main

sys.exit(main())
