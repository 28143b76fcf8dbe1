"""The package layout's import rule, checked on the source: every `import` (module level or inside a
function) of every module goes only where its layer may go.

    cli (every command) → everything below;
    api → serving → engine → model → errors;  feedback, registry → durable_io, errors;  jobs (lock, history) → registry;
    ab (A/B state, decision rule, evidence) → registry, feedback;
    studies → engine, model, serving (its tokenizer);  clients → proto;
    align.jobs → align.train → align (data, losses, gate, evaluation) → server.model / registry / feedback.

Never model → engine, engine → serving/api/feedback, server → align, server or align → cli.
A module named in a string (`importlib.import_module("prefloop...")`) counts as an import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = {"cli": "prefloop.cli", "server": "prefloop.server", "align": "prefloop.align",
       "clients": "prefloop.clients"}

# layer -> layers it may import (its own layer is always allowed)
ALLOWED: dict[str, set[str]] = {
    "server.errors": set(),
    "server.durable_io": {"server.errors"},
    "server.version_summary": set(),
    "server.registry": {"server.errors", "server.durable_io", "server.version_summary"},
    "server.jobs": {"server.errors", "server.durable_io", "server.registry"},
    "server.ab": {"server.errors", "server.durable_io", "server.registry", "server.feedback"},
    "server.feedback": {"server.errors", "server.durable_io"},
    "server.model": {"server.errors"},
    "server.engine": {"server.errors", "server.model"},
    "server.serving": {"server.errors", "server.model", "server.engine", "server.registry", "server.ab"},
    "server.api": {"server.errors", "server.durable_io", "server.model", "server.engine", "server.serving",
                   "server.feedback", "server.registry", "server.jobs", "server.ab",
                   "server.version_summary", "proto"},
    "server.studies": {"server.errors", "server.model", "server.engine", "server.serving"},
    "align": {"server.errors", "server.durable_io", "server.model", "server.registry", "server.jobs",
              "server.feedback", "server.ab"},
    "align.train": {"align", "server.errors", "server.durable_io", "server.model", "server.registry",
                    "server.jobs", "server.feedback", "server.ab"},
    "align.jobs": {"align", "align.train", "server.errors", "server.durable_io", "server.model",
                   "server.registry", "server.jobs", "server.feedback", "server.ab"},
    "clients": {"proto"},
}
ALLOWED["cli"] = set(ALLOWED) | {"proto"}  # the entry points name every layer; nothing names them


def layer_of(module: str) -> str | None:
    """prefloop.server.engine.scheduler -> 'server.engine'; prefloop.align.jobs.x -> 'align.jobs'."""
    parts = module.split(".")
    if parts[0] != "prefloop" or len(parts) < 2:
        return None
    if parts[1] == "server":
        return "server." + parts[2] if len(parts) > 2 else "server"
    if parts[1] == "align":
        return f"align.{parts[2]}" if len(parts) > 2 and parts[2] in ("jobs", "train") else "align"
    return parts[1]  # cli, clients, proto


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([TOP[parts[0]], *parts[1:]])


STRING_IMPORTERS = {"import_module", "__import__", "find_spec", "run_module"}


def imports_of(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file: import statements (relative ones
    resolved) and modules named by a string literal in `importlib.import_module("...")`,
    `__import__`, `find_spec` or `runpy.run_module`. `module`: the file's module name (default:
    from its path in the tree)."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in STRING_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Import):
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
    assert layer_of("prefloop.cli.models") == "cli"
    assert layer_of("prefloop.align.jobs.runner") == "align.jobs"
    assert layer_of("prefloop.align.train.ppo") == "align.train"
    assert layer_of("prefloop.align.gate") == "align"
    assert layer_of("prefloop.proto.prefloop.v1.models_pb2") == "proto"
    assert layer_of("torch") is None


@pytest.mark.parametrize("source, target", [
    ("from prefloop.server.engine.scheduler import Scheduler\n", "prefloop.server.engine.scheduler"),
    ("import importlib\nimportlib.import_module('prefloop.server.engine.scheduler')\n",
     "prefloop.server.engine.scheduler"),
    ("from importlib import import_module\nimport_module('prefloop.cli.serve')\n", "prefloop.cli.serve"),
])
def test_the_checker_sees_a_forbidden_arrow(tmp_path, source, target):
    """A model module importing the engine or the CLI, by a statement or by a string, is reported
    (the check below can fail). The probe lives in tmp_path, never in the source tree."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = file_violations(probe, "prefloop.server.model.probe", "probe.py")
    assert found == [f"probe.py:{source.count(chr(10))}: server.model may not import {target} "
                     f"({layer_of(target)})"]


def file_violations(path: Path, module: str, shown: str) -> list[str]:
    """The imports of one file (as module `module`) that its layer may not make."""
    own = layer_of(module)
    allowed = ALLOWED.get(own, set()) | {own}
    out = []
    for line, target in imports_of(path, module):
        dep = layer_of(target)
        if dep is None or dep == "server" and target == "prefloop.server":
            continue
        if dep not in allowed:
            out.append(f"{shown}:{line}: {own} may not import {target} ({dep})")
    return out


def violations() -> list[str]:
    return [v for path in source_files()
            for v in file_violations(path, module_name(path), str(path.relative_to(ROOT)))]


def test_every_module_has_a_known_layer():
    unknown = {layer_of(module_name(p)) for p in source_files()} - set(ALLOWED) - {"server"}
    assert not unknown, f"layers without a rule: {unknown}"


def test_imports_follow_the_layer_rule():
    assert violations() == []


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 4, f"{path.relative_to(ROOT)} needs a docstring saying what it owns"
