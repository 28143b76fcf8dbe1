"""`prefloop rope` and the study behind it (server/studies/rope_study.py, server/studies/position_families.py)."""
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny

from prefloop.server.engine.kv_shift import rotate_keys, shift_cos_sin
from prefloop.server.model.loader import load_model
from prefloop.server.studies.position_families import (
    FAMILIES,
    FamilyCache,
    FamilyConfig,
    FamilyModel,
    t5_bucket,
)
from prefloop.server.studies.rope_study import cached_keys, format_report, forward_at, layer0_scores


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("rope") / "m", "llama", max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def test_layer0_keys_rotated_by_delta_equal_recompute_at_shifted_positions(tiny):
    ids = torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    _, caches = forward_at(tiny, ids, 0)
    k0 = cached_keys(caches, 40)[0][0]
    for delta in (1, 57, 400):
        _, moved = forward_at(tiny, ids, delta)
        ref = cached_keys(moved, 40)[0][0]
        cos, sin = shift_cos_sin(tiny.config, -delta)  # R(+delta)
        assert (rotate_keys(k0, cos, sin) - ref).abs().max() < 1e-5
        assert (k0 - ref).abs().max() > 1e-2  # the keys did move: the check can fail


def test_scores_and_logits_depend_only_on_relative_position(tiny):
    ids = torch.randint(3, 250, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    base_logits, _ = forward_at(tiny, ids, 0)
    base_scores = layer0_scores(tiny, ids, 0)
    for p in (1, 200, 480):
        logits, _ = forward_at(tiny, ids, p)
        assert (logits - base_logits).abs().max() < 1e-4
        assert (layer0_scores(tiny, ids, p) - base_scores).abs().max() < 1e-4


def test_families_relative_absolute_and_buckets():
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(24)
    for kind in FAMILIES:
        m = FamilyModel(FamilyConfig(kind, max_positions=256))
        base = m(ids, pos)
        diff = (m(ids, pos + 100) - base).abs().max()
        assert (diff > 0.1) if kind == "absolute" else (diff < 1e-5)
        cache = FamilyCache()
        m(ids[:16], pos[:16], cache)
        moved = m.move_cache(cache, 100)
        if kind == "absolute":
            assert moved is None  # no transform exists: the prefix must be recomputed
            with pytest.raises(ValueError, match="cannot be represented"):
                m(ids, pos + 250)
            continue
        cont = m(ids[16:], pos[16:] + 100, moved)
        assert (cont - m(ids, pos + 100)[16:]).abs().max() < 1e-5
    b = t5_bucket(torch.tensor([0, 15, 16, 127, 128, 10_000]), 32, 128)
    assert b.tolist()[:2] == [0, 15] and b[3] == b[4] == b[5] == 31  # far distances share one bias


def test_cli_rope_json_on_a_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "prefloop.cli", "rope", "--model", str(tiny_dir),
                          "--out", str(out), "--json", "--tokens", "64"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    c = r["cache_vs_recompute"]
    assert c["cached_keys_max_change"] == 0.0 and c["max_abs_diff_k"] < 1e-4
    assert all(row["logits_max_abs_diff"] < 1e-3 for row in r["relative_only"]["rows"])
    assert all(row["layer0_max_abs_diff"] < 1e-5 for row in r["move_prefix"]["rows"])
    per_layer = r["move_prefix"]["drop"]["k_relative_error_per_layer"]
    assert per_layer[0] < 1e-5 and per_layer[1] > 1e-3  # shift is exact at layer 0 only
    fam = r["families"]
    assert fam["absolute"]["relative"][-1].get("representable") is False
    assert fam["t5"]["relative"][0]["logits_max_abs_diff"] == 0.0
    assert fam["absolute"]["move"]["continuation_logits_max_abs_diff"] > 0.01
    assert r["curve_spread"]["learned absolute (small model)"] > 0.01
    assert (out / "rope_relative.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "rope.json").read_text())["model"]["layers"] == 2
    assert "cache == recompute" in format_report(r)
