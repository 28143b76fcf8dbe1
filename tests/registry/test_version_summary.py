"""VersionSummary (server/version_summary.py): the one reader of where each method's job puts
its numbers, so listings and the web page read fields, not guesses."""
from __future__ import annotations

import math

from conftest import fake_model

from prefloop.server.registry import Registry, version_info
from prefloop.server.version_summary import VersionSummary


def test_a_preference_job_is_read_from_its_gate_first():
    metrics = {"heldout": {"pairs": 30, "pref_accuracy": 0.6, "kl_per_token": 0.02},
               "current": {"version": "v0001", "heldout_pref_accuracy": 0.55}}
    gate = {"passed": True, "candidate_accuracy": 0.7, "current_accuracy": 0.5,
            "kl_per_token": 0.03, "win_rate": 0.8, "heldout_pairs": 20}
    s = VersionSummary.of(metrics, gate)
    assert (s.heldout_accuracy, s.heldout_rows, s.kl_per_token, s.gate_win_rate) == (
        0.7, 20, 0.03, 0.8)
    assert (s.current_version, s.current_accuracy) == ("v0001", 0.5)
    no_gate = VersionSummary.of(metrics, None)
    assert (no_gate.heldout_accuracy, no_gate.heldout_rows, no_gate.kl_per_token,
            no_gate.current_accuracy) == (0.6, 30, 0.02, 0.55)


def test_reward_model_ppo_and_base_versions():
    rm = VersionSummary.of({"heldout": {"pairs": 8, "accuracy": 0.875}}, {"passed": True})
    assert (rm.heldout_accuracy, rm.heldout_rows) == (0.875, 8)
    ppo = VersionSummary.of({"heldout": {"samples": 64, "reward": 0.2, "kl_per_token": 0.01}},
                            {"passed": False, "candidate_reward": 0.25, "heldout_prompts": 32})
    assert (ppo.heldout_reward, ppo.heldout_rows, ppo.heldout_accuracy) == (0.25, 32, None)
    assert VersionSummary.of({}, None) == VersionSummary()
    odd = VersionSummary.of({"heldout": {"pref_accuracy": math.nan, "pairs": True}}, {})
    assert odd.heldout_accuracy is None and odd.heldout_rows is None  # never a guess


def test_version_info_carries_the_summary(tmp_path):
    registry = Registry(tmp_path / "data")
    registry.ensure_base(fake_model(tmp_path / "base"))
    info = version_info(registry, "v0000")
    assert info["summary"] == VersionSummary().to_dict()
