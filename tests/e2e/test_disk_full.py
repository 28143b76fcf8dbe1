"""A full disk under a real server: `prefloop serve` (default model, HTTP) with its data directory
on a 4 MiB tmpfs. While a filler file takes the last byte, a vote is refused with 503 "disk
full" (never acked), chat keeps answering, /health (200) and /metrics say the log cannot take
votes; once the filler is gone the same vote (same idempotency key) is accepted, and after a
clean stop every acked vote is in the log exactly once, with the generation rows of the chats
made while the disk was full. Needs root to mount the tmpfs (else skipped: the fault-injected
version is tests/feedback/test_feedback_store.py::test_disk_full_fails_submissions_but_not_
generation_logging).
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import USER_TOKEN, start_server_process, wait_until

from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "Name a fruit."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path):
    """tmp_path/data as a 4 MiB tmpfs (skips the test where mounting is not allowed)."""
    data = tmp_path / "data"
    data.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def fill(directory: Path) -> Path:
    """A file taking every free byte of `directory`'s filesystem."""
    path = directory / "filler"
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):  # the last bytes in smaller writes
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return path


def test_full_disk_refuses_votes_keeps_chat_and_loses_nothing(small_disk, tmp_path):
    refused_key = None
    port = free_port()
    server = start_server_process(tmp_path, "--http-port", str(port), "--registry-poll", "0")
    url = f"http://127.0.0.1:{port}"
    acked: dict[str, str] = {}  # idempotency key -> feedback_id
    try:
        with httpx.Client(base_url=url, timeout=120,
                          headers={"Authorization": f"Bearer {USER_TOKEN}"}) as http:
            def chat() -> str:
                r = http.post("/v1/chat/completions", json={
                    "model": "prefloop", "messages": QUESTION, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["response_id"]

            def vote(response_id: str, key: str) -> httpx.Response:
                r = http.post("/v1/feedback/rating", json={
                    "response_id": response_id, "score": 1, "idempotency_key": key,
                    "user_id": "u1"})
                if r.status_code == 200:
                    acked[key] = r.json()["feedback_id"]
                return r

            before = chat()
            assert vote(before, "k-before").status_code == 200
            assert http.get("/health").json()["feedback"]["status"] == "ok"

            filler = fill(small_disk)
            assert os.statvfs(small_disk).f_bavail == 0
            # the WAL's last page still has room: votes are written (and acked) until it is full
            during, refused = [], None
            for i in range(200):
                during.append(chat())  # chat keeps answering while the disk is full
                r = vote(during[-1], f"k-during-{i}")
                if r.status_code != 200:
                    refused, refused_key = r, f"k-during-{i}"
                    break
            assert refused is not None and refused.status_code == 503, refused and refused.text
            assert "disk full" in refused.json()["error"]["message"]
            health = http.get("/health")
            assert health.status_code == 200  # the replica still serves chat
            feedback = health.json()["feedback"]
            assert feedback["status"] == "unavailable" and "disk full" in feedback["reason"]
            metrics = http.get("/metrics").text
            assert "prefloop_feedback_log_available 0.0" in metrics
            assert "prefloop_feedback_log_write_failures_total" in metrics

            filler.unlink()
            chat()  # its generation row (and the held ones) commit: the log is writable again
            assert wait_until(lambda: http.get("/health").json()["feedback"]["status"] == "ok",
                              timeout=30)
            again = vote(during[-1], refused_key)  # the same vote, retried
            assert again.status_code == 200 and again.json()["duplicate"] is False, again.text
            assert vote(chat(), f"k-{uuid.uuid4().hex}").status_code == 200
            assert "prefloop_feedback_log_available 1.0" in http.get("/metrics").text
        assert server.terminate() == 0
    finally:
        server.terminate()
    feedback = load_table(small_disk, logschema.FEEDBACK).to_pylist()
    assert sorted(r["feedback_id"] for r in feedback) == sorted(acked.values())
    assert {r["idempotency_key"] for r in feedback} == set(acked)
    generations = set(load_table(small_disk, logschema.GENERATIONS)["response_id"].to_pylist())
    assert {before, *during} <= generations
