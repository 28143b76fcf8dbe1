"""Unit tests of FeedbackStore (server/feedback/store.py): validation, idempotency, restarts,
crash recovery (torn records, a crash between Parquet write and segment delete), degraded mode."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prefloop.server.errors import InvalidArgument, NotFound, Unavailable
from prefloop.server.feedback import compactor as log_compactor
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.feedback.wal import WalConfig, list_segments

FAST_WAL = WalConfig(linger_s=0.005, retry_interval_s=0.01)


def open_store(data_dir: Path, **kwargs) -> FeedbackStore:
    return FeedbackStore(StoreConfig(data_dir=data_dir, wal=kwargs.pop("wal", FAST_WAL),
                                     reopen_interval_s=kwargs.pop("reopen_interval_s", 0.0),
                                     **kwargs))


def gen_row(response_id: str, content: str = "What is 2+2?", **extra) -> dict:
    row = {"response_id": response_id, "request_id": "req-" + response_id,
           "messages": [{"role": "user", "content": content}], "completion": f"answer {response_id}",
           "model_version": "v0001", "backend": "native", "finish_reason": "stop",
           "prompt_tokens": 7, "completion_tokens": 3,
           "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 8,
                        "stop": [], "seed": None, "n": 2, "repetition_penalty": 1.0},
           "latency_ms": 12.5, "ttft_ms": 3.25}
    row.update(extra)
    return row


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "data")
    for rid in ("a1", "a2", "a3"):
        assert s.record_generation(gen_row(rid))
    assert s.record_generation(gen_row("b1", content="something else"))
    yield s
    s.close()


def feedback_rows(data_dir: Path) -> list[dict]:
    return load_table(data_dir, logschema.FEEDBACK).to_pylist()


# ---- validation ---------------------------------------------------------------------------------

def test_preference_by_reference_is_stored_with_model_versions(store):
    ack = store.submit_preference(chosen_response_id="a1", rejected_response_id="a2",
                                  user_id="u1", session_id="s1", idempotency_key="k1")
    assert ack.feedback_id.startswith("fb-") and ack.duplicate is False
    store.flush()
    (row,) = feedback_rows(store.data_dir)
    assert row["kind"] == "preference" and row["chosen_response_id"] == "a1"
    assert row["model_versions"] == ["v0001", "v0001"] and row["user_id"] == "u1"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"chosen_response_id": "a1", "rejected_response_id": "nope"}, NotFound, "nope"),
    ({"chosen_response_id": "a1", "rejected_response_id": "a1"}, InvalidArgument, "same"),
    ({"chosen_response_id": "a1", "rejected_response_id": "b1"}, InvalidArgument,
     "different prompts"),
    ({"chosen_response_id": "a1"}, InvalidArgument, "rejected_response_id is empty"),
    ({}, InvalidArgument, "needs"),
    ({"chosen_response_id": "a1", "rejected_response_id": "a2", "chosen_text": "x"},
     InvalidArgument, "not both"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": " ",
      "rejected_text": "b"}, InvalidArgument, "chosen_text is empty"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": "a"},
     InvalidArgument, "rejected_text is empty"),
    ({"prompt_messages": [], "chosen_text": "a", "rejected_text": "b"}, InvalidArgument,
     "prompt_messages is empty"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": "a",
      "rejected_text": "a"}, InvalidArgument, "identical"),
    ({"prompt_messages": [{"role": "wizard", "content": "q"}], "chosen_text": "a",
      "rejected_text": "b"}, InvalidArgument, "role"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": "a" * 33_000,
      "rejected_text": "b"}, InvalidArgument, r"limit is 32768 \(max_text_chars\)"),
    ({"prompt_messages": [{"role": "user", "content": "q"}] * 300, "chosen_text": "a",
      "rejected_text": "b"}, InvalidArgument, r"max_messages"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": "a",
      "rejected_text": "b", "comment": "c" * 5000}, InvalidArgument, "max_comment_chars"),
    ({"prompt_messages": [{"role": "user", "content": "q"}], "chosen_text": "a",
      "rejected_text": "b", "idempotency_key": "k" * 300}, InvalidArgument, "max_id_chars"),
])
def test_invalid_preferences_are_rejected(store, kwargs, error, match):
    with pytest.raises(error, match=match):
        store.submit_preference(**kwargs)
    store.flush()
    assert feedback_rows(store.data_dir) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"response_id": "a1", "score": 0}, "score must be -1 or \\+1 \\(thumbs\\) or 1..5"),
    ({"response_id": "a1", "score": 6, "scale": "stars"}, "star score must be in 1..5"),
    ({"response_id": "a1", "score": -1, "scale": "stars"}, "star score must be in 1..5"),
    ({"response_id": "a1", "score": 2, "scale": "thumbs"}, "thumbs"),
    ({"response_id": "a1", "score": 1, "scale": "percent"}, "scale"),
    ({"response_id": "a1", "score": 1.5}, "integer"),
    ({"response_id": "", "score": 1}, "response_id is empty"),
])
def test_invalid_ratings_are_rejected(store, kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        store.submit_rating(**kwargs)


def test_rating_of_unknown_response_is_not_found(store):
    with pytest.raises(NotFound, match="ghost"):
        store.submit_rating(response_id="ghost", score=1)


def test_ratings_thumbs_and_stars(store):
    store.submit_rating(response_id="a1", score=-1)
    store.submit_rating(response_id="a2", score=4)
    store.submit_rating(response_id="a3", score=1, scale="stars", comment="meh")
    store.flush()
    got = {r["response_id"]: (r["score"], r["scale"], r["comment"])
           for r in feedback_rows(store.data_dir)}
    assert got == {"a1": (-1, "thumbs", None), "a2": (4, "stars", None),
                   "a3": (1, "stars", "meh")}


def test_explicit_preference(store):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    store.submit_preference(prompt_messages=msgs, chosen_text="hello", rejected_text="HELLO!!")
    store.flush()
    (row,) = feedback_rows(store.data_dir)
    assert row["prompt_messages"] == msgs and row["chosen_text"] == "hello"
    assert row["model_versions"] == [] and row["chosen_response_id"] is None


# ---- idempotency --------------------------------------------------------------------------------

def test_repeated_idempotency_key_adds_no_row(store):
    first = store.submit_rating(response_id="a1", score=1, idempotency_key="same")
    again = store.submit_rating(response_id="a1", score=1, idempotency_key="same")
    other = store.submit_preference(chosen_response_id="a1", rejected_response_id="a2",
                                    idempotency_key="same")
    assert again == (first.feedback_id, True) and other == (first.feedback_id, True)
    store.flush()
    assert len(feedback_rows(store.data_dir)) == 1


def test_concurrent_submissions_with_one_key_make_one_row(store):
    acks, barrier = [], threading.Barrier(16)

    def submit() -> None:
        barrier.wait()
        acks.append(store.submit_rating(response_id="a2", score=1, idempotency_key="race"))

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(acks) == 16 and len({a.feedback_id for a in acks}) == 1
    assert sum(not a.duplicate for a in acks) == 1
    store.flush()
    assert len(feedback_rows(store.data_dir)) == 1


def test_keys_and_response_ids_survive_a_clean_restart(tmp_path):
    data = tmp_path / "data"
    with open_store(data) as s:
        s.record_generation(gen_row("r1"))
        s.record_generation(gen_row("r2"))
        first = s.submit_preference(chosen_response_id="r1", rejected_response_id="r2",
                                    idempotency_key="k")
    assert list_segments(data / "wal") == []  # close compacted everything
    with open_store(data) as s:
        assert s.submit_preference(chosen_response_id="r1", rejected_response_id="r2",
                                   idempotency_key="k") == (first.feedback_id, True)
        s.submit_rating(response_id="r2", score=-1)  # an id from the earlier run
    assert len(feedback_rows(data)) == 2


# ---- crashes ------------------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from prefloop.server.feedback.store import FeedbackStore, StoreConfig
    from prefloop.server.feedback.wal import WalConfig
    s = FeedbackStore(StoreConfig(data_dir=sys.argv[1], wal=WalConfig(linger_s=0.001)))
    assert s.available, s.unavailable_reason
    for i in range(int(sys.argv[2])):
        s.record_generation({"response_id": f"x{i}", "prompt": "p", "completion": f"c{i}",
                             "model_version": "v9"})
    acks = [s.submit_rating(response_id=f"x{i}", score=1, idempotency_key=f"key{i}")
            for i in range(int(sys.argv[2]))]
    print(" ".join(a.feedback_id for a in acks), flush=True)
    os._exit(0)  # no close: like SIGKILL, nothing is flushed or compacted
""")


def crash_run(data: Path, n: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(data), str(n)], check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def test_acknowledged_submissions_survive_a_crash_exactly_once(tmp_path):
    data = tmp_path / "data"
    ids = crash_run(data, 20)
    assert len(list_segments(data / "wal")) == 1  # nothing compacted
    with open_store(data) as s:
        for i in range(20):  # replayed: keys are duplicates, response ids are known
            assert s.submit_rating(response_id=f"x{i}", score=1,
                                   idempotency_key=f"key{i}") == (ids[i], True)
    rows = feedback_rows(data)
    assert sorted(r["feedback_id"] for r in rows) == sorted(ids)
    assert load_table(data, logschema.GENERATIONS).num_rows == 20


def test_torn_final_record_is_ignored_on_recovery(tmp_path):
    data = tmp_path / "data"
    ids = crash_run(data, 5)
    ((_, seg),) = list_segments(data / "wal")
    with open(seg, "ab") as f:  # a write cut off mid-record
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78{\"t\":\"f\",\"feedb")
    with open_store(data) as s:
        assert s.available
    rows = feedback_rows(data)
    assert sorted(r["feedback_id"] for r in rows) == sorted(ids)


def test_crash_between_parquet_write_and_segment_delete_never_duplicates(tmp_path, monkeypatch):
    data = tmp_path / "data"
    ids = crash_run(data, 8)
    ((seg_id, seg),) = list_segments(data / "wal")
    # compact, but "crash" before the segment is deleted
    real_unlink = Path.unlink

    def crash_on_segment_unlink(self, *a, **k):
        if self == seg:
            raise RuntimeError("crash")
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", crash_on_segment_unlink)
    with pytest.raises(RuntimeError):
        log_compactor.compact_segment(data, seg_id, seg)
    monkeypatch.undo()
    assert seg.exists() and len(logschema.part_files(data, logschema.FEEDBACK)) == 1
    # restart: the segment is compacted again onto the same part names
    with open_store(data) as s:
        assert s.submit_rating(response_id="x0", score=1, idempotency_key="key0").duplicate
        s.submit_rating(response_id="x1", score=-1)  # new row, in a new segment
    assert not seg.exists()
    rows = load_table(data, logschema.FEEDBACK, include_wal=False).to_pylist()
    assert len(rows) == 9 and set(ids) <= {r["feedback_id"] for r in rows}
    for part in logschema.part_files(data, logschema.FEEDBACK):
        pq.read_table(part)  # every file reads cleanly
    # the new segment got an id above every id used before: nothing was overwritten
    names = [p.name for p in logschema.part_files(data, logschema.FEEDBACK)]
    assert names == sorted(names) and logschema.part_name(seg_id) == names[0]


def test_stale_temp_files_are_removed(tmp_path):
    data = tmp_path / "data"
    with open_store(data) as s:
        s.record_generation(gen_row("r1"))
    partition = logschema.part_files(data, logschema.GENERATIONS)[0].parent
    stale = partition / ".part-000000000099.parquet.123.tmp"
    stale.write_bytes(b"half a parquet file")
    with open_store(data):
        assert not stale.exists()


def test_segments_spanning_days_go_to_both_partitions(tmp_path):
    import datetime as dt
    data = tmp_path / "data"
    with open_store(data) as s:
        s.record_generation(gen_row("old", created_at=dt.datetime(2025, 1, 1, 23, 59,
                                                                  tzinfo=dt.timezone.utc)))
        s.record_generation(gen_row("new", created_at=dt.datetime(2025, 1, 2, 0, 1)))
    dates = sorted(p.parent.name for p in logschema.part_files(data, logschema.GENERATIONS))
    assert dates == ["date=2025-01-01", "date=2025-01-02"]


# ---- degraded modes -----------------------------------------------------------------------------

def test_unusable_data_dir_makes_submissions_unavailable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    s = open_store(blocker / "data")
    try:
        assert not s.available and "a-file" in s.unavailable_reason
        assert s.record_generation(gen_row("r1")) is False  # no exception on the request path
        with pytest.raises(Unavailable, match="cannot use data directory"):
            s.submit_rating(response_id="r1", score=1)
    finally:
        s.close()


def test_store_reopens_when_the_data_dir_becomes_usable(tmp_path):
    blocker = tmp_path / "later"
    blocker.write_text("x")
    s = open_store(blocker)
    try:
        with pytest.raises(Unavailable):
            s.submit_preference(prompt_messages=[{"role": "user", "content": "q"}],
                                chosen_text="a", rejected_text="b")
        blocker.unlink()
        ack = s.submit_preference(prompt_messages=[{"role": "user", "content": "q"}],
                                  chosen_text="a", rejected_text="b")
        assert not ack.duplicate and s.available
    finally:
        s.close()


def test_disk_full_fails_submissions_but_not_generation_logging(store):
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store.wal._write = full
    assert store.record_generation(gen_row("a4")) is True  # held in memory, retried
    with pytest.raises(Unavailable, match="No space left"):
        store.submit_rating(response_id="a1", score=1, idempotency_key="retry-me")
    store.wal._write = real_write
    ack = store.submit_rating(response_id="a1", score=1, idempotency_key="retry-me")
    assert ack.duplicate is False  # the failed attempt left nothing behind
    store.flush()
    assert [r["feedback_id"] for r in feedback_rows(store.data_dir)] == [ack.feedback_id]
    assert "a4" in load_table(store.data_dir, logschema.GENERATIONS)["response_id"].to_pylist()


def test_second_store_on_the_same_dir_is_refused(store):
    other = open_store(store.data_dir)
    try:
        assert not other.available and f"pid {os.getpid()}" in other.unavailable_reason
    finally:
        other.close()


def test_record_generation_never_raises(store):
    assert store.record_generation({"no": "response id"}) is False
    assert store.record_generation({"response_id": "x", "created_at": "yesterday"}) is False


def test_generation_rows_round_trip(store):
    store.flush()
    rows = {r["response_id"]: r for r in load_table(store.data_dir, logschema.GENERATIONS)
            .to_pylist()}
    r = rows["a1"]
    assert r["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    assert r["sampling"]["temperature"] == 0.7 and r["sampling"]["n"] == 2
    assert r["sampling"]["seed"] is None and r["latency_ms"] == 12.5 and r["ttft_ms"] == 3.25
    assert r["created_at"].tzinfo is not None and r["schema_version"] == 1
    assert r["prompt_fingerprint"] == rows["a2"]["prompt_fingerprint"]
    assert r["prompt_fingerprint"] != rows["b1"]["prompt_fingerprint"]


def test_unreadable_parquet_part_is_quarantined_and_the_good_rows_stay(tmp_path):
    from prefloop.server.feedback.integrity import QUARANTINE_DIR
    data = tmp_path / "data"
    with open_store(data) as s:
        s.record_generation(gen_row("r1"))
    with open_store(data) as s:  # a second part
        s.record_generation(gen_row("r2"))
        s.submit_rating(response_id="r2", score=1, idempotency_key="k2")
    first = logschema.part_files(data, logschema.GENERATIONS)[0]
    first.write_bytes(first.read_bytes()[:100])  # cut short, as by a power cut
    s = open_store(data)
    try:
        assert s.available, s.unavailable_reason
        assert not s.knows_response("r1") and s.knows_response("r2")  # the good part's rows
        assert s.submit_rating(response_id="r2", score=1, idempotency_key="k2").duplicate
        moved = [p for p in (data / QUARANTINE_DIR).rglob("*.parquet")]
        assert len(moved) == 1 and moved[0].name == first.name and not first.exists()
        reason = moved[0].with_name(moved[0].name + ".reason").read_text()
        assert reason.startswith("unreadable Parquet part:")
    finally:
        s.close()
    assert load_table(data, logschema.GENERATIONS)["response_id"].to_pylist() == ["r2"]


def test_wal_segment_without_magic_is_quarantined_and_its_id_never_reused(tmp_path):
    from prefloop.server.feedback.integrity import QUARANTINE_DIR
    data = tmp_path / "data"
    with open_store(data) as s:
        s.record_generation(gen_row("r1"))
    (data / logschema.WAL_DIR / "000000000007.wal").write_bytes(b"garbage, not a segment")
    s = open_store(data)
    try:
        assert s.available and s.knows_response("r1")
        s.submit_rating(response_id="r1", score=1)
    finally:
        s.close()
    assert [p.name for p in (data / QUARANTINE_DIR).rglob("*.wal")] == ["000000000007.wal"]
    assert len(load_table(data, logschema.FEEDBACK)) == 1
    (part,) = logschema.part_files(data, logschema.FEEDBACK)
    assert logschema.segment_id_of_part(part.name) > 7  # written to a segment after it
