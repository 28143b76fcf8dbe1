"""Replicas on one data root (server/feedback/peers.py, the replica layout of schema.py): a vote
lands on any replica, a key acked by one is a duplicate on another, readers see one table."""
from __future__ import annotations

import asyncio
import time

import duckdb
import pytest

from prefloop.server.errors import NotFound, Unavailable
from prefloop.server.feedback import compactor as log_compactor
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table, log_stats
from prefloop.server.feedback.peers import PeerLogs
from prefloop.server.feedback.store import FeedbackStore, StoreConfig, lock_holder
from prefloop.server.feedback.wal import WalConfig

FAST_WAL = WalConfig(linger_s=0.005, retry_interval_s=0.01)


def gen_row(response_id: str) -> dict:
    return {"response_id": response_id, "request_id": "req-" + response_id,
            "messages": [{"role": "user", "content": "What is 2+2?"}], "completion": "4",
            "model_version": "v0001", "backend": "native", "finish_reason": "stop"}


def replica(data_dir, name, **kwargs) -> FeedbackStore:
    return FeedbackStore(StoreConfig(data_dir=data_dir, wal=FAST_WAL, replica=name,
                                     reopen_interval_s=0.0, peer_poll_s=kwargs.pop("peer_poll_s", 0.02),
                                     peer_wait_s=kwargs.pop("peer_wait_s", 1.0), **kwargs))


@pytest.fixture
def pair(tmp_path):
    data = tmp_path / "data"
    a, b = replica(data, "a"), replica(data, "b")
    yield data, a, b
    a.close()
    b.close()


def test_a_vote_on_another_replicas_answer_is_accepted_and_durable(pair):
    data, a, b = pair
    assert a.record_generation(gen_row("r1"))
    assert a.record_generation(gen_row("r2"))
    ack = asyncio.run(b.asubmit_preference(chosen_response_id="r1", rejected_response_id="r2",
                                           idempotency_key="k1"))
    rating = asyncio.run(b.asubmit_rating(response_id="r1", score=1, idempotency_key="k2"))
    assert not ack.duplicate and not rating.duplicate
    rows = {r["idempotency_key"]: r for r in load_table(data, logschema.FEEDBACK).to_pylist()}
    assert rows["k1"]["chosen_response_id"] == "r1" and rows["k1"]["model_versions"] == ["v0001"] * 2
    assert rows["k2"]["response_id"] == "r1"


def test_an_id_no_replica_served_is_refused_after_the_wait(pair):
    _, a, b = pair
    t0 = time.monotonic()
    with pytest.raises(NotFound, match="any replica"):
        asyncio.run(b.asubmit_rating(response_id="never-served", score=1))
    assert time.monotonic() - t0 >= 1.0  # peer_wait_s: it waited for the row before refusing


def test_a_vote_retried_on_another_replica_is_one_row_for_every_reader(pair):
    """Keys are checked against each replica's own log (a peer's WAL tail is not yet durable:
    peers.py); the retry is logged again and readers keep the first row of the key."""
    data, a, b = pair
    assert a.record_generation(gen_row("r1"))
    first = asyncio.run(a.asubmit_rating(response_id="r1", score=1, idempotency_key="same"))
    again = asyncio.run(b.asubmit_rating(response_id="r1", score=1, idempotency_key="same"))
    assert not again.duplicate
    assert asyncio.run(b.asubmit_rating(response_id="r1", score=1, idempotency_key="same")).duplicate
    rows = load_table(data, logschema.FEEDBACK).to_pylist()
    assert [(r["idempotency_key"], r["feedback_id"]) for r in rows] == [("same", first.feedback_id)]


def test_readers_keep_one_row_per_key_when_two_replicas_logged_it(tmp_path):
    """Two replicas that take the same key within one poll both log it; readers keep the first."""
    data = tmp_path / "data"
    a = replica(data, "a")
    assert a.record_generation(gen_row("r1"))
    a.close()
    b = replica(data, "b", peer_poll_s=30.0)  # polls at start only: a's key below is unseen
    c = replica(data, "c", peer_poll_s=30.0)
    b.submit_rating(response_id="r1", score=1, idempotency_key="raced")
    c.submit_rating(response_id="r1", score=-1, idempotency_key="raced")
    b.close()
    c.close()
    rows = load_table(data, logschema.FEEDBACK).to_pylist()
    assert len(rows) == 1 and rows[0]["idempotency_key"] == "raced"


def test_each_replica_writes_its_own_named_parts_and_the_root_reads_as_one_table(pair):
    data, a, b = pair
    for store, rid in ((a, "ra"), (b, "rb")):
        assert store.record_generation(gen_row(rid))
        store.submit_rating(response_id=rid, score=1, idempotency_key="key-" + rid)
    a.flush()
    b.flush()
    owners = {logschema.part_owner(p.name)[0]
              for t in logschema.TABLES for p in logschema.part_files(data, t)}
    assert owners == {"a", "b"}
    assert (data / "replicas" / "a" / "wal").is_dir() and (data / "replicas" / "b" / "LOCK").is_file()
    count = duckdb.sql(f"select count(*) from read_parquet('{data}/feedback/*/*.parquet', "
                       "hive_partitioning = true)").fetchall()[0][0]
    assert count == 2
    assert sorted(load_table(data, logschema.GENERATIONS).column("response_id").to_pylist()) \
        == ["ra", "rb"]
    stats = log_stats(data)
    assert set(stats["replicas"]) == {"a", "b"} and stats["totals"]["rating"] == 2
    assert all(r["parts"] == 2 for r in stats["replicas"].values())  # a generations + a feedback part


def test_a_replica_id_has_one_process_and_its_lock_is_its_own(pair):
    data, a, b = pair
    assert lock_holder(data, "a") is not None and lock_holder(data, "b") is not None
    assert lock_holder(data) is None  # the lone server's lock is free: replicas do not hold it
    twin = replica(data, "a")
    with pytest.raises(Unavailable, match="in use by another process"):
        twin.submit_rating(response_id="x", score=1)
    twin.close()


def test_a_replica_id_that_cannot_name_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match="replica id"):
        StoreConfig(data_dir=tmp_path, replica="../escape")


def test_temp_files_of_another_replica_are_left_alone(tmp_path):
    part_dir = tmp_path / "feedback" / "date=2026-12-04"
    part_dir.mkdir(parents=True)
    mine = part_dir / ".part-a-000000000001.parquet.123.abcd.tmp"
    theirs = part_dir / ".part-b-000000000001.parquet.456.abcd.tmp"
    for p in (mine, theirs):
        p.write_bytes(b"x")
    assert log_compactor.remove_temp_files(tmp_path, "a") == 1
    assert not mine.exists() and theirs.exists()


def test_rows_of_a_segment_compacted_between_two_polls_are_found_in_its_parts(tmp_path):
    data = tmp_path / "data"
    follower = PeerLogs(data, "b")
    a = replica(data, "a")
    assert not follower.poll()
    assert a.record_generation(gen_row("r1"))
    a.flush()  # the segment is compacted and deleted before the follower ever read it
    a.close()
    rows = follower.poll()
    assert ("generations", "r1") in {(t, r.get("response_id")) for t, r in rows}


def test_a_lone_server_beside_replicas_follows_their_logs_too(tmp_path):
    data = tmp_path / "data"
    a = replica(data, "a")
    lone = FeedbackStore(StoreConfig(data_dir=data, wal=FAST_WAL, peer_poll_s=0.02,
                                     peer_wait_s=1.0))
    try:
        assert lone.follows_peers and lone.replica is None
        assert a.record_generation(gen_row("from-a"))
        ack = asyncio.run(lone.asubmit_rating(response_id="from-a", score=1))
        assert not ack.duplicate
    finally:
        lone.close()
        a.close()


def test_a_segment_cut_back_by_its_writer_is_read_again_from_its_start(tmp_path):
    """A failed write is cut back out of the segment and the writer appends again from there:
    the follower notices its last record is gone and reads the segment again."""
    from prefloop.server.feedback.wal import MAGIC, encode_frame

    def record(rid: str) -> bytes:
        row = logschema.normalize_generation(gen_row(rid))
        return encode_frame(logschema.record_bytes(logschema.encode_record("generations", row)))

    wal = tmp_path / "replicas" / "a" / "wal"
    wal.mkdir(parents=True)
    segment = wal / "000000000001.wal"
    segment.write_bytes(MAGIC + record("kept") + record("cut"))
    follower = PeerLogs(tmp_path, "b")
    assert [r["response_id"] for _, r in follower.poll()] == ["kept", "cut"]
    kept = len(MAGIC) + len(record("kept"))
    with open(segment, "r+b") as f:  # the writer's rollback, then its next batch
        f.truncate(kept)
        f.seek(kept)
        f.write(record("after-the-cut-a-longer-id"))
    assert [r["response_id"] for _, r in follower.poll()] == ["kept", "after-the-cut-a-longer-id"]
    assert follower.poll() == []
