"""The soak benchmark's short version (benchmarks/soak.py): a real server under mixed HTTP and
gRPC load with votes, killed three times — the server under load, a publisher (an align job's
registry work) right after it moved CURRENT, the server while an A/B test starts — and checked
after each restart: no acked vote lost or duplicated, no request failed outside a killed
server's in-flight ones, the registry whole, the served version CURRENT, every KV block free at
idle."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak import run_soak  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_three_kills_lose_nothing_and_leave_the_registry_whole(tmp_path):
    report = run_soak(tmp_path, kills=3, seed=1, phases=("PROMOTED",))  # pointer moved
    summary = report.summary()
    assert report.kills == {"server": 1, "publisher": 1, "server during A/B": 1}, summary
    assert report.acked > 0 and report.requests > report.acked / 2, summary
    assert (report.lost, report.duplicated) == (0, 0), summary
    assert report.failed_outside == 0, report.failures
    assert report.bad_states == [], summary
    assert report.checks == 3 and len(report.serve_again_s) >= 2, summary
