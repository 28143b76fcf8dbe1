"""Promotion over a season (align/season.py): the spending rule's union bound, which decisions a
season counts, when a scheduled job may look again, and simulated seasons of random feedback
through the real decision code (tests/season_sim.py; the full table: benchmarks/season_control.py)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from conftest import fake_model
from season_sim import DESIGNS, T0, run_season

from prefloop.align import season as S
from prefloop.align.gate import GateConfig, clopper_pearson
from prefloop.server.errors import InvalidArgument
from prefloop.server.jobs import record_job
from prefloop.server.registry import Registry


def test_the_levels_of_a_season_never_sum_past_the_stated_level():
    levels = [S.decision_level(0.05, k) for k in range(1, 10_001)]
    assert levels[0] == 0.025 and levels[1] == pytest.approx(0.05 / 6)
    assert sum(levels) <= 0.05 and sum(levels) == pytest.approx(0.05, rel=1e-3)
    assert all(a > b for a, b in zip(levels, levels[1:]))
    assert S.decision_level(0.05, 7, "none") == 0.05  # per job: no bound on the season
    assert S.decision_config(GateConfig(), 1).confidence == pytest.approx(0.95)
    assert S.decision_config(GateConfig(spending="none"), 9).confidence == 0.9
    with pytest.raises(InvalidArgument):
        S.decision_level(0.05, 0)
    with pytest.raises(InvalidArgument):
        GateConfig(spending="bonferroni")


def _decided(registry, job_id, current, status="rejected", method="dpo", total=100, until=None):
    record_job(registry, {"job_id": job_id, "status": "running", "method": method, "pid": 1})
    record_job(registry, {"job_id": job_id, "status": status, "method": method,
                          "gate": {"passed": status != "rejected", "current_version": current},
                          "data": {"total_rows": total, "until": until or "2026-01-01T00:00:00Z"}})


def test_a_season_counts_the_decisions_against_the_current_version_since_it_became_current(tmp_path):
    registry = Registry(tmp_path / "data")
    registry.ensure_base(fake_model(tmp_path / "base"))
    _decided(registry, "a", "v0000")
    _decided(registry, "rm", "v0000", status="published", method="rm")  # a judge, not a promotion
    record_job(registry, {"job_id": "s", "status": "skipped", "method": "dpo"})
    assert [j.job_id for j in S.season_of(registry, "v0000").decisions] == ["a"]
    with registry.stage() as stage:
        for name in ("config.json", "model.safetensors"):
            (stage.path / name).write_bytes(b"x" + (tmp_path / "base" / name).read_bytes())
        v1 = stage.publish(kind="policy", method="dpo", parent="v0000").version
    _decided(registry, "b", "v0000", status="promoted")  # decided against v0000, then promoted
    registry.promote(v1, reason="test", force=True)
    assert S.season_of(registry, v1).next_decision == 1  # a new season
    _decided(registry, "c", v1)
    assert S.season_of(registry, v1).next_decision == 2
    registry.rollback(reason="test")
    assert S.season_of(registry, "v0000").next_decision == 1  # current again: afresh


def test_a_scheduled_job_looks_again_once_the_window_grew():
    rows = [SimpleNamespace(created_at=T0.replace(second=s), feedback_id=str(s)) for s in range(60)]
    fresh = S.Season("v0000", None)
    assert S.too_early(fresh, rows, 1.5) is None
    from prefloop.server.jobs import JobRecord
    last = JobRecord("j", "rejected", data={"total_rows": 40, "until": "2026-01-01T00:00:39Z"})
    season = S.Season("v0000", None, (last,))
    assert S.too_early(season, rows, 1.5) is None  # 20 newer rows >= 0.5 x 40
    assert "waits for 20" in S.too_early(season, rows[:59], 1.5)
    assert "waits for 40" in S.too_early(season, rows, 2.0)


def promoted_share_interval(results) -> tuple[float, float]:
    k = sum(r.promoted_at is not None for r in results)
    return clopper_pearson(k, len(results), 0.95)


def test_random_feedback_seasons_are_consistent_with_5_percent_only_with_spending():
    """Seeded seasons through the real decision code: under the per-job rule the share of
    random-feedback seasons that promote is measurably above 5 % (its 95 % interval lies above),
    with the default (spending, looks at 1.5x) it is consistent with at most 5 %."""
    per_job, default = DESIGNS[0], DESIGNS[2]
    assert (default.spending, default.look_growth) == ("harmonic", 1.5) == (
        GateConfig().spending, GateConfig().look_growth)
    rng = random.Random(7)
    before = [run_season(rng, per_job, end=400) for _ in range(12)]
    assert promoted_share_interval(before)[0] > 0.05
    now = [run_season(rng, default) for _ in range(60)]
    assert promoted_share_interval(now)[0] <= 0.05
    assert max(r.decisions for r in now) <= 7  # looks at ~n, 1.5n, 2.25n, ... up to 1,000 votes
    found = [run_season(rng, default, win=0.7) for _ in range(10)]
    assert sum(r.promoted_at is not None for r in found) >= 9  # a real preference still promotes
