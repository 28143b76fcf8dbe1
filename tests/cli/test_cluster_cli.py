"""`prefloop cluster up` refuses what it cannot run before starting anything (no model loaded,
no process started)."""
from __future__ import annotations

import subprocess
import sys


def cluster(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefloop.cli", "cluster", "up",
                           "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cluster_up_refuses_no_replicas_a_missing_nginx_and_overlapping_ports(tmp_path):
    none = cluster(tmp_path, "--replicas", "0")
    assert none.returncode == 2 and "--replicas must be >= 1" in none.stderr
    missing = cluster(tmp_path, "--nginx", str(tmp_path / "no-nginx"))
    assert missing.returncode == 2 and "nginx not found" in missing.stderr
    overlap = cluster(tmp_path, "--nginx", sys.executable, "--http-port", "8101",
                      "--replica-http-port", "8100")
    assert overlap.returncode == 2 and "overlap" in overlap.stderr
    assert not (tmp_path / "data" / "cluster").exists()  # nothing was started or written


def test_cluster_help_shows_its_defaults():
    out = subprocess.run([sys.executable, "-m", "prefloop.cli", "cluster", "up", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "(default 3)" in out and "(default 8000)" in out and "-- SERVE FLAGS" in out
