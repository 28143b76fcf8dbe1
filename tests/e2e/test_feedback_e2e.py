"""End-to-end feedback durability: real `prefloop serve` processes (default model) SIGKILLed while
many clients submit feedback; after restarts every acknowledged submission is in the log exactly
once and every Parquet file reads cleanly. An unusable data directory gives UNAVAILABLE on
Feedback while Generate keeps working.
"""
from __future__ import annotations

import random
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import start_server_process

from prefloop.clients import Client
from prefloop.clients import errors as cerr
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table
from prefloop.server.feedback.wal import list_segments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "Name a fruit."}]


def sigkill(server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)


class Submitters:
    """`n` threads submitting ratings and preferences with fresh idempotency keys until the
    server dies. `acked`: key → feedback_id of every OK answer; `uncertain`: keys whose call
    failed (the server may or may not have recorded them)."""

    def __init__(self, target: str, pairs: list[tuple[str, str]], n: int, tag: str) -> None:
        self.acked: dict[str, str] = {}
        self.uncertain: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(target, pairs, f"{tag}-{i}"))
                         for i in range(n)]

    def start(self) -> "Submitters":
        for t in self._threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self._threads:
            t.join(60)
            assert not t.is_alive()

    def _run(self, target: str, pairs: list[tuple[str, str]], tag: str) -> None:
        rng = random.Random(tag)
        with Client(target, timeout=10) as client:
            for i in range(100_000):
                key = f"{tag}-{i}"
                chosen, rejected = rng.choice(pairs)
                try:
                    if i % 2:
                        ack = client.submit_rating(chosen, rng.choice([-1, 1]),
                                                   idempotency_key=key, user_id=tag)
                    else:
                        ack = client.submit_preference(chosen_response_id=chosen,
                                                       rejected_response_id=rejected,
                                                       idempotency_key=key, user_id=tag)
                except cerr.ClientError:
                    with self._lock:
                        self.uncertain.add(key)
                    return  # the server is gone
                assert not ack.duplicate
                with self._lock:
                    self.acked[key] = ack.feedback_id


def test_sigkill_loses_no_acknowledged_feedback(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLOOP_WAL_SEGMENT_SECONDS", "0.3")  # rotate + compact under kills
    server = start_server_process(tmp_path, auth=False)
    data = tmp_path / "data"
    with Client(server.target, timeout=120) as client:
        pairs = []
        for _ in range(3):
            result = client.chat(QUESTION, max_tokens=4, n=2, temperature=1.0)
            pairs.append((result.completions[0].response_id, result.completions[1].response_id))
    acked: dict[str, str] = {}
    uncertain: set[str] = set()
    rng = random.Random(1234)
    for cycle in range(3):
        if cycle:
            server = start_server_process(tmp_path, auth=False)
            with Client(server.target, timeout=30) as client:
                # keys acknowledged before a crash stay duplicates, with the first feedback id
                for key in rng.sample(sorted(acked), min(20, len(acked))):
                    chosen, rejected = pairs[0]
                    ack = client.submit_preference(chosen_response_id=chosen,
                                                   rejected_response_id=rejected,
                                                   idempotency_key=key)
                    assert ack.duplicate and ack.feedback_id == acked[key]
        subs = Submitters(server.target, pairs, n=16, tag=f"c{cycle}").start()
        time.sleep(rng.uniform(0.8, 2.0))
        sigkill(server)
        subs.join()
        assert len(subs.acked) > 20, "too few submissions were acknowledged to test anything"
        acked.update(subs.acked)
        uncertain |= subs.uncertain

    # a last, clean run: recovery compacts what the kills left, SIGTERM compacts the rest
    server = start_server_process(tmp_path, auth=False)
    assert server.terminate() == 0
    assert list_segments(data / "wal") == []
    parts = logschema.part_files(data, logschema.FEEDBACK)
    assert parts
    for part in parts + logschema.part_files(data, logschema.GENERATIONS):
        pq.read_table(part)  # every file reads cleanly
    rows = load_table(data, logschema.FEEDBACK, include_wal=False)
    # load_table dedupes by feedback_id: count the raw rows as well
    raw_ids = [fid for p in parts for fid in pq.read_table(p, columns=["feedback_id"])
               .column(0).to_pylist()]
    assert len(raw_ids) == len(set(raw_ids)), "a row is duplicated"
    by_key = {}
    for key, fid in zip(rows["idempotency_key"].to_pylist(), rows["feedback_id"].to_pylist()):
        assert key not in by_key, f"idempotency key {key} recorded twice"
        by_key[key] = fid
    for key, fid in acked.items():
        assert by_key.get(key) == fid, f"acknowledged {key} ({fid}) is missing"
    assert set(by_key) <= set(acked) | uncertain
    print(f"{len(acked)} acknowledged, {len(uncertain)} in flight at a kill, "
          f"{len(by_key) - len(acked)} of those recorded, {len(parts)} parts")


def test_unusable_data_dir_fails_feedback_but_not_generation(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    server = start_server_process(tmp_path, "--data-dir", str(blocker / "data"), auth=False)
    try:
        with Client(server.target, timeout=120) as client:
            result = client.chat(QUESTION, max_tokens=4, n=2, temperature=1.0)
            assert result.completions[0].text
            a, b = (c.response_id for c in result.completions)
            with pytest.raises(cerr.Unavailable, match="cannot use data directory"):
                client.submit_preference(chosen_response_id=a, rejected_response_id=b)
            with pytest.raises(cerr.Unavailable, match="Not a directory"):
                client.submit_rating(a, 1)
            assert client.generate("Hello", max_tokens=4).text is not None  # still serving
    finally:
        assert server.terminate() == 0
    assert "feedback log cannot use data directory" in server.log_text()
