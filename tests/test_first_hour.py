"""Issue 21, what a new user meets in the first hour (CLI through subprocess
`python -m prefloop.server.cli` where the user meets it): a second server on a data dir in use,
a failed align job leaving the registry as it was, Ctrl-C during align, align's start line and
next steps, help text, `models prune/delete`, the chat client's `/up` and `/pair`, `bench`
progress and `stats`."""
from __future__ import annotations

import os
import subprocess
import sys

from prefloop.server.feedback.store import lock_holder, open_store

CLI = [sys.executable, "-m", "prefloop.server.cli"]


def prefloop(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------------------------------------
# 1. a second server on a data dir in use


def test_second_serve_on_a_data_dir_in_use_refuses_before_loading_the_model(tmp_path):
    data = tmp_path / "data"
    assert lock_holder(data) is None  # no log yet
    store = open_store(data)
    try:
        assert lock_holder(data) == str(os.getpid())
        res = prefloop("serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
                       "--model", "/no/such/model")
        assert res.returncode == 2
        assert f"in use by another process (pid {os.getpid()}" in res.stderr
        assert "--no-feedback-log" in res.stderr
        assert "cannot load the model" not in res.stderr  # refused before the model loads
        # the flag it names gets past the check (then fails on the bogus model path)
        res = prefloop("serve", "--data-dir", str(data), "--port", "0", "--http-port", "0",
                       "--model", "/no/such/model", "--no-feedback-log")
        assert res.returncode == 2 and "cannot load the model" in res.stderr
        assert "in use" not in res.stderr
    finally:
        store.close()
    assert lock_holder(data) is None
