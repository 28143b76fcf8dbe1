"""The package layout's import rule, checked on the source: every `import` (module level or inside a
function) of every module goes only where its layer may go.

    cli → api → serving → engine → model → errors;  feedback, registry → durable_io, errors;
    ab (A/B state, decision rule, evidence) → registry, feedback;
    studies → engine, model, serving (its tokenizer);  clients → proto;  align → server.model / registry / feedback.

Never model → engine, engine → serving/api/feedback, server → align.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = {"server": "prefloop.server", "align": "prefloop.align", "clients": "prefloop.clients"}

# layer -> layers it may import (its own layer is always allowed)
ALLOWED: dict[str, set[str]] = {
    "server.errors": set(),
    "server.durable_io": {"server.errors"},
    "server.registry": {"server.errors", "server.durable_io"},
    "server.ab": {"server.errors", "server.durable_io", "server.registry", "server.feedback"},
    "server.feedback": {"server.errors", "server.durable_io"},
    "server.model": {"server.errors"},
    "server.engine": {"server.errors", "server.model"},
    "server.serving": {"server.errors", "server.model", "server.engine", "server.registry", "server.ab"},
    "server.api": {"server.errors", "server.durable_io", "server.model", "server.engine", "server.serving",
                   "server.feedback", "server.registry", "server.ab", "proto"},
    "server.cli": {"server.errors", "server.durable_io", "server.model", "server.engine", "server.serving",
                   "server.feedback", "server.registry", "server.ab", "server.api", "server.studies", "proto"},
    "server.studies": {"server.errors", "server.model", "server.engine", "server.serving"},
    "align": {"server.errors", "server.durable_io", "server.model", "server.registry", "server.feedback",
              "server.ab"},
    "align.cli": {"align", "server.errors", "server.durable_io", "server.model", "server.registry",
                  "server.feedback", "server.ab", "clients"},
    "clients": {"proto"},
}


def layer_of(module: str) -> str | None:
    """prefloop.server.engine.scheduler -> 'server.engine'; prefloop.align.cli.x -> 'align.cli'."""
    parts = module.split(".")
    if parts[0] != "prefloop" or len(parts) < 2:
        return None
    if parts[1] == "server":
        return "server." + parts[2] if len(parts) > 2 else "server"
    if parts[1] == "align":
        return "align.cli" if len(parts) > 2 and parts[2] == "cli" else "align"
    return parts[1]  # clients, proto


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([TOP[parts[0]], *parts[1:]])


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file; relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def source_files() -> list[Path]:
    return sorted(p for top in TOP for p in (ROOT / top).rglob("*.py"))


def test_layer_of_names_the_package_layers():
    assert layer_of("prefloop.server.engine.scheduler") == "server.engine"
    assert layer_of("prefloop.server.errors") == "server.errors"
    assert layer_of("prefloop.align.cli.models") == "align.cli"
    assert layer_of("prefloop.align.jobs.runner") == "align"
    assert layer_of("prefloop.proto.prefloop.v1.models_pb2") == "proto"
    assert layer_of("torch") is None


def test_the_checker_sees_a_forbidden_arrow(tmp_path):
    """A model module importing the engine must be reported (the check below can fail)."""
    bad = ROOT / "server" / "model" / "_layer_probe.py"
    bad.write_text("from prefloop.server.engine.scheduler import Scheduler\n")
    try:
        probe = [v for v in violations() if v.startswith("server/model/_layer_probe.py")]
        assert probe == ["server/model/_layer_probe.py:1: server.model may not import "
                         "prefloop.server.engine.scheduler (server.engine)"]
    finally:
        bad.unlink()


def violations() -> list[str]:
    out = []
    for path in source_files():
        own = layer_of(module_name(path))
        allowed = ALLOWED.get(own, set()) | {own}
        for line, target in imports_of(path):
            dep = layer_of(target)
            if dep is None or dep == "server" and target == "prefloop.server":
                continue
            if dep not in allowed:
                out.append(f"{path.relative_to(ROOT)}:{line}: {own} may not import {target} ({dep})")
    return out


def test_every_module_has_a_known_layer():
    unknown = {layer_of(module_name(p)) for p in source_files()} - set(ALLOWED) - {"server"}
    assert not unknown, f"layers without a rule: {unknown}"


def test_imports_follow_the_layer_rule():
    assert violations() == []


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 4, f"{path.relative_to(ROOT)} needs a docstring saying what it owns"
