"""`prefloop logs check` on damaged data directories: a torn WAL tail (reported, not damage), a
truncated Parquet part (damage; --repair quarantines it and keeps every good row), a corrupt
version file and a garbage CURRENT (damage, named in one line; serve refuses with that line)."""
from __future__ import annotations

import json

from conftest import fake_model

from prefloop import cli
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table
from prefloop.server.feedback.integrity import QUARANTINE_DIR
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import MAGIC, encode_frame
from prefloop.server.registry import Registry


def gen(rid: str) -> dict:
    return {"response_id": rid, "prompt": "p", "completion": f"answer {rid}",
            "model_version": "v0000"}


def check(capsys, data, *extra) -> tuple[int, str]:
    rc = cli.main(["logs", "check", "--data-dir", str(data), *extra])
    return rc, capsys.readouterr().out


def test_a_clean_directory_passes_and_a_torn_wal_tail_is_only_a_note(tmp_path, capsys):
    data = tmp_path / "data"
    with FeedbackStore(StoreConfig(data_dir=data)) as store:
        store.record_generation(gen("r1"))
    rc, out = check(capsys, data)
    assert rc == 0 and "verdict: nothing damaged" in out and "1 generations" in out
    # a crash mid-write: a segment whose last frame was cut off
    segment = data / logschema.WAL_DIR / "000000000042.wal"
    segment.write_bytes(MAGIC + encode_frame(b"x" * 40)[:30])
    rc, out = check(capsys, data)
    assert rc == 0 and "has 30 bytes after its last intact record" in out
    assert "verdict: nothing damaged" in out


def test_truncated_part_is_damage_and_repair_quarantines_it_keeping_good_rows(tmp_path, capsys):
    data = tmp_path / "data"
    for rid in ("r1", "r2"):  # two parts
        with FeedbackStore(StoreConfig(data_dir=data)) as store:
            store.record_generation(gen(rid))
    bad = logschema.part_files(data, logschema.GENERATIONS)[0]
    bad.write_bytes(bad.read_bytes()[:-20])  # the footer is gone
    rc, out = check(capsys, data)
    assert rc == 1 and f"unreadable Parquet part {bad}" in out and "--repair" in out
    assert bad.exists()  # without --repair nothing moves
    rc, out = check(capsys, data, "--repair")
    assert rc == 0 and "quarantined as" in out and not bad.exists()
    assert list((data / QUARANTINE_DIR).rglob(bad.name))
    assert load_table(data, logschema.GENERATIONS)["response_id"].to_pylist() == ["r2"]
    rc, out = check(capsys, data, "--json")
    report = json.loads(out)
    assert rc == 0 and report["log"]["quarantined_before"] == 1 and report["damaged"] == 0


def test_corrupt_version_file_and_garbage_current_are_named(tmp_path, capsys):
    data = tmp_path / "data"
    registry = Registry(data)
    registry.ensure_base(fake_model(tmp_path / "model"))
    rc, out = check(capsys, data)
    assert rc == 0 and "CURRENT = v0000; checksums: v0000 ok" in out
    weights = next((registry.version_dir("v0000")).glob("*.safetensors"))
    weights.chmod(0o644)
    weights.write_bytes(b"flipped bits")
    rc, out = check(capsys, data)
    assert rc == 1 and "version v0000 failed verification" in out
    (registry.root / "AB.json").write_text("[1, 2")
    rc, out = check(capsys, data)
    assert rc == 1 and "the A/B state" in out and "is damaged" in out
    registry.current_path.write_bytes(b"\x00\x13garbage")
    rc, out = check(capsys, data)
    assert rc == 1 and "registry pointer" in out and "is damaged" in out
    assert "the last version it named was v0000" in out
    rc = cli.main(["serve", "--data-dir", str(data), "--port", "0", "--http-port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "registry pointer" in err and "models promote v0000 --force" in err


def test_repair_is_refused_beside_a_live_server(tmp_path, capsys):
    data = tmp_path / "data"
    with FeedbackStore(StoreConfig(data_dir=data)):
        rc = cli.main(["logs", "check", "--data-dir", str(data), "--repair"])
        assert rc == 2 and "stop it before --repair" in capsys.readouterr().err
        rc, out = check(capsys, data)
        assert rc == 0 and "is logging to it" in out
