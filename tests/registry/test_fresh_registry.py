"""One rule for what is served: v0000 is the served base from the moment it exists. A registry made
by its first align job has CURRENT (so `models list`, A/B tests and align agree), a registry from
before the rule reads the same way, and a server on the data directory names its base v0000 as soon
as the registry has it, without loading the weights again.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from conftest import fake_model

from prefloop.align.jobs.runner import resolve_base
from prefloop.server.registry import Registry
from prefloop.server.serving.hot_swap import ModelSwitcher


def first_job_registry(tmp_path) -> tuple[Registry, str]:
    """What the first align job leaves: v0000 made by align's own base step, and a candidate the
    gate rejected that was kept (`--keep-rejected`)."""
    registry = Registry(tmp_path / "data")
    assert resolve_base(registry, None, fake_model(tmp_path / "model"), None, True) == "v0000"
    with registry.stage() as stage:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (stage.path / name).write_bytes((tmp_path / "model" / name).read_bytes())
        v1 = stage.publish(kind="policy", method="dpo", parent="v0000",
                           gate={"passed": False, "reasons": ["18/30 held-out wins"]}).version
    return registry, v1


def models(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefloop.cli", "models", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_first_job_makes_v0000_current_with_its_init_line(tmp_path):
    registry, _ = first_job_registry(tmp_path)
    assert registry.current_path.read_text().strip() == "v0000"
    assert [(e.action, e.version) for e in registry.history()] == [("init", "v0000")]


def test_models_list_and_ab_start_work_on_a_registry_made_by_its_first_job(tmp_path):
    registry, v1 = first_job_registry(tmp_path)
    data = str(registry.data_dir)
    listed = models("list", "--data-dir", data, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {v["version"]: v["current"] for v in json.loads(listed.stdout)} == {"v0000": True, v1: False}
    started = models("ab", "start", v1, "--force", "--data-dir", data, "--json")
    assert started.returncode == 0, started.stderr
    status = json.loads(started.stdout)
    assert (status["running"], status["candidate"], status["control"]) == (True, v1, "v0000")


def test_a_registry_without_CURRENT_reads_v0000_as_current_and_can_roll_back_to_it(tmp_path):
    registry, _ = first_job_registry(tmp_path)
    registry.current_path.unlink()  # as align left a first registry before the rule
    registry.history_path.unlink()
    assert registry.current() == "v0000"
    with registry.stage() as stage:
        (stage.path / "config.json").write_text("{}")
        (stage.path / "model.safetensors").write_bytes(b"weights-2")
        v2 = stage.publish(kind="policy", method="dpo", parent="v0000").version
    registry.promote(v2, verify=False)
    assert [(e.action, e.version) for e in registry.history()] == [("init", "v0000"), ("promote", v2)]
    assert registry.rollback(verify=False).version == "v0000" and registry.current() == "v0000"


@dataclass
class Info:
    model_version: str
    model_path: str


@dataclass
class RecordingGenerator:
    """The two ways a switch can serve a version: swap (load weights) or relabel (same weights)."""
    info: Info
    swaps: list[str] = field(default_factory=list)

    async def swap(self, model_dir, version: str):
        self.swaps.append(version)
        self.info = Info(version, str(model_dir))
        return self.info

    def relabel(self, version: str):
        self.info = replace(self.info, model_version=version)
        return self.info


def test_a_server_names_its_base_v0000_once_a_job_creates_it_without_reloading(tmp_path):
    model = fake_model(tmp_path / "model")
    generator = RecordingGenerator(Info(Path(model).name, model))
    registry = Registry(tmp_path / "data")
    switcher = ModelSwitcher(generator, registry, poll_interval_s=0)
    asyncio.run(switcher.follow_now())
    assert generator.info.model_version == "model"  # no registry yet: the folder's name
    resolve_base(registry, None, model, None, True)  # the first align job
    asyncio.run(switcher.follow_now())
    assert (generator.info.model_version, generator.swaps) == ("v0000", [])


def test_a_base_made_from_another_folder_is_loaded(tmp_path):
    generator = RecordingGenerator(Info("served", fake_model(tmp_path / "served")))
    registry = Registry(tmp_path / "data")
    registry.ensure_base(fake_model(tmp_path / "other", b"other weights"))
    asyncio.run(ModelSwitcher(generator, registry, poll_interval_s=0).follow_now())
    assert generator.swaps == ["v0000"]
