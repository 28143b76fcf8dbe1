"""`python -m prefloop.cli ...` runs the `prefloop` command (align's scheduler uses it)."""
import sys

from prefloop.cli.main import main

sys.exit(main())
