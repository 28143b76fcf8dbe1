"""The model registry (server/registry.py): immutable versions, checksums, the atomic CURRENT
pointer, promotion/rollback history, and that a failed publish leaves nothing behind (the align
job lock and job history are tested in tests/align/test_align_runner.py). Real files in tmp dirs; fake weight bytes (the registry never parses them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import fake_model

from prefloop.server import registry as reg
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def registry(tmp_path):
    r = reg.Registry(tmp_path / "data")
    r.ensure_base(fake_model(tmp_path / "base"))
    return r


def publish(r: reg.Registry, payload: bytes, **kw) -> str:
    with r.stage() as stage:
        (stage.path / "config.json").write_text('{"model_type": "llama"}')
        (stage.path / "model.safetensors").write_bytes(payload)
        kw.setdefault("parent", "v0000")
        return stage.publish(kind=kw.pop("kind", "policy"), method=kw.pop("method", "dpo"),
                             **kw).version


def test_base_version_is_created_once_and_current(registry, tmp_path):
    assert registry.list_versions() == ["v0000"]
    assert registry.current() == "v0000"
    m = registry.manifest("v0000")
    assert (m.version, m.parent, m.kind, m.method) == ("v0000", None, "policy", "base")
    assert sorted(m.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert m.files["model.safetensors"]["sha256"] == reg.sha256_file(
        tmp_path / "base" / "model.safetensors")
    assert m.source == str((tmp_path / "base").resolve())
    folder = registry.version_dir("v0000")
    assert not (folder / "optimizer.pt").exists()
    assert not os.stat(folder / "model.safetensors").st_mode & 0o222  # read-only
    assert registry.ensure_base(fake_model(tmp_path / "other", b"different")) == "v0000"
    assert registry.manifest("v0000").files == m.files  # idempotent: never replaced
    assert [e.action for e in registry.history()] == ["init"]


def test_versions_are_numbered_and_verified(registry):
    assert publish(registry, b"one") == "v0001"
    assert publish(registry, b"two", parent="v0001") == "v0002"
    assert registry.list_versions() == ["v0000", "v0001", "v0002"]
    assert registry.manifest("v0002").parent == "v0001"
    result = registry.verify("v0002")
    assert result.ok and result.checked_bytes == len(b"two") + len('{"model_type": "llama"}')
    with pytest.raises(NotFound):
        registry.manifest("v0009")
    with pytest.raises(InvalidArgument):
        registry.version_dir("latest")


def test_verify_finds_tampering_missing_and_extra_files(registry):
    v = publish(registry, b"good weights")
    folder = registry.version_dir(v)
    os.chmod(folder, 0o755)
    weights = folder / "model.safetensors"
    os.chmod(weights, 0o644)
    weights.write_bytes(b"evil weights")  # same size, other bytes
    assert registry.verify(v).problems == ["model.safetensors sha256 mismatch"]
    (folder / "extra.safetensors").write_bytes(b"x")
    weights.unlink()
    problems = registry.verify(v).problems
    assert "model.safetensors is missing" in problems
    assert "extra.safetensors is not listed in the manifest" in problems
    with pytest.raises(FailedPrecondition, match="failed verification"):
        registry.promote(v)
    assert registry.current() == "v0000"


def test_failed_publish_leaves_no_version_and_no_stage(registry):
    with pytest.raises(RuntimeError):
        with registry.stage() as stage:
            (stage.path / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full while saving")
    assert registry.list_versions() == ["v0000"]
    assert [p.name for p in registry.versions_dir.iterdir()] == ["v0000"]
    with pytest.raises(InvalidArgument):  # a stage without weights cannot be published
        with registry.stage() as stage:
            (stage.path / "config.json").write_text("{}")
            stage.publish(kind="policy", method="dpo", parent="v0000")
    assert [p.name for p in registry.versions_dir.iterdir()] == ["v0000"]


def test_stale_stage_of_dead_process_is_cleaned_and_never_listed(registry):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = registry.versions_dir / f"{reg.STAGE_PREFIX}{proc.stdout.strip()}-abc"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    (dead / "manifest.json").write_text("{}")
    mine = registry.versions_dir / f"{reg.STAGE_PREFIX}{os.getpid()}-def"
    mine.mkdir()
    assert registry.list_versions() == ["v0000"]
    assert registry.cleanup_stages() == [dead.name]
    assert not dead.exists() and mine.exists()  # a live process's stage is left alone


def test_publish_race_takes_the_next_number(registry, monkeypatch):
    publish(registry, b"one")
    real = registry._next_number
    monkeypatch.setattr(registry, "_next_number", lambda: 1)  # stale: v0001 exists already
    with registry.stage() as stage:
        (stage.path / "model.safetensors").write_bytes(b"two")
        monkeypatch.setattr(registry, "_next_number", real)
        version = stage.publish(kind="policy", method="dpo", parent="v0000").version
    assert version == "v0002"
    assert registry.manifest("v0002").version == "v0002"
    assert registry.verify("v0002").ok and registry.verify("v0001").ok


def test_promote_refusals(registry):
    reward = publish(registry, b"rm", kind="reward", method="rm")
    rejected = publish(registry, b"bad", gate={"passed": False, "reasons": ["accuracy fell"]})
    with pytest.raises(FailedPrecondition, match="reward model"):
        registry.promote(reward)
    with pytest.raises(FailedPrecondition, match="accuracy fell"):
        registry.promote(rejected)
    with pytest.raises(NotFound):
        registry.promote("v0042")
    with pytest.raises(FailedPrecondition, match="already"):
        registry.promote("v0000")
    assert registry.current() == "v0000"
    entry = registry.promote(rejected, force=True, reason="operator override", actor="me")
    assert (entry.action, entry.previous, entry.version) == ("promote", "v0000", rejected)
    assert registry.current() == rejected


def test_promote_and_rollback_follow_a_stack(registry):
    v1, v2 = publish(registry, b"1"), publish(registry, b"2")
    registry.promote(v1)
    registry.promote(v2)
    assert registry.rollback(reason="bad answers").version == v1
    assert registry.current() == v1
    assert registry.rollback().version == "v0000"
    with pytest.raises(FailedPrecondition, match="nothing to roll back"):
        registry.rollback()
    registry.promote(v2)
    assert registry.rollback().version == "v0000"
    history = registry.history()
    assert [(e.action, e.previous, e.version) for e in history] == [
        ("init", None, "v0000"), ("promote", "v0000", v1), ("promote", v1, v2),
        ("rollback", v2, v1), ("rollback", v1, "v0000"), ("promote", "v0000", v2),
        ("rollback", v2, "v0000")]
    assert history[3].reason == "bad answers"


def test_pointer_is_never_seen_half_written(registry):
    v1 = publish(registry, b"1")
    seen: set[str] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(registry.current_path.read_text())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            registry.promote(v1, verify=False)
            registry.rollback(verify=False)
    finally:
        stop.set()
        t.join()
    assert seen <= {"v0000\n", "v0001\n"} and len(seen) == 2
    assert not [p for p in registry.root.iterdir() if p.name.endswith(".tmp")]


def test_current_survives_a_crash_between_pointer_and_history(registry):
    v1 = publish(registry, b"1")
    reg.write_file_atomic(registry.current_path, f"{v1}\n".encode())  # no history line
    (registry.root / ".CURRENT.999.dead.tmp").write_text("v0")  # a crashed writer's temp file
    assert registry.current() == v1
    assert registry.served_stack() == ["v0000", v1]
    assert registry.rollback().version == "v0000"


def test_manifest_validation_and_version_info(registry):
    with pytest.raises(InvalidArgument):
        reg.Manifest(version="v1", kind="policy", method="dpo", created_at="x",
                     files={"model.safetensors": {"sha256": "0" * 64}})
    with pytest.raises(InvalidArgument):
        reg.Manifest(version="v0001", kind="critic", method="dpo", created_at="x",
                     files={"model.safetensors": {"sha256": "0" * 64}})
    v = publish(registry, b"w", metrics={"heldout": {"pref_accuracy": 0.75}},
                gate={"passed": True, "reasons": ["ok"]})
    info = reg.version_info(registry, v)
    assert info["gate_passed"] is True and info["current"] is False
    assert info["metrics"]["heldout"]["pref_accuracy"] == 0.75
    on_disk = json.loads((registry.version_dir(v) / reg.MANIFEST_FILE).read_text())
    assert on_disk["version"] == v and on_disk["schema"] == reg.MANIFEST_SCHEMA
