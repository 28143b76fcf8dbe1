"""prefloop.align.cli: the `prefloop align` and `prefloop models` commands."""
