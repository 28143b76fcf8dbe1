"""Unit tests of the write-ahead log (server/feedback/wal.py): framing, torn records, group commit,
rotation, and what happens when the disk fails."""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from prefloop.server.errors import Unavailable
from prefloop.server.feedback import wal as wal_mod
from prefloop.server.feedback.wal import (
    MAGIC,
    WalConfig,
    WriteAheadLog,
    encode_frame,
    list_segments,
    read_segment,
    segment_path,
)


def encode(record) -> bytes:
    return json.dumps(record).encode()


class CountingFsync:
    """fdatasync that counts its calls and can be slowed down (to make batching visible)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        os.fdatasync(fd)


def make_wal(tmp_path: Path, *, fsync=None, **config) -> tuple[WriteAheadLog, list]:
    closed: list[tuple[int, Path]] = []
    cfg = WalConfig(**{"linger_s": 0.01, "retry_interval_s": 0.01, **config})
    log = WriteAheadLog(tmp_path / "wal", cfg, encode=encode,
                        on_segment_closed=lambda i, p: closed.append((i, p)),
                        fsync=fsync or os.fdatasync)
    log.start(next_segment_id=0)
    return log, closed


def records_of(path: Path) -> list:
    return [json.loads(r) for r in read_segment(path).records]


def test_durable_records_are_in_the_segment_when_acknowledged(tmp_path):
    log, closed = make_wal(tmp_path)
    try:
        for i in range(5):
            log.append_durable({"i": i}).result(5)
        # acknowledged = on disk: read the live segment without closing the log
        assert records_of(segment_path(tmp_path / "wal", 0)) == [{"i": i} for i in range(5)]
    finally:
        log.close()
    assert closed == [(0, segment_path(tmp_path / "wal", 0))]


@pytest.mark.parametrize("damage", ["cut_payload", "cut_header", "bad_crc", "huge_length"])
def test_torn_final_record_is_dropped(tmp_path, damage):
    path = tmp_path / "000000000007.wal"
    good = [encode_frame(f"record-{i}".encode()) for i in range(3)]
    last = encode_frame(b"the last record, torn")
    if damage == "cut_payload":
        tail = last[:-5]
    elif damage == "cut_header":
        tail = last[:5]
    elif damage == "bad_crc":
        tail = last[:-1] + bytes([last[-1] ^ 0xFF])
    else:
        tail = (2**31).to_bytes(4, "little") + last[4:]
    path.write_bytes(MAGIC + b"".join(good) + tail)
    contents = read_segment(path)
    assert contents.records == [f"record-{i}".encode() for i in range(3)]
    assert contents.valid_bytes == len(MAGIC) + sum(map(len, good))
    assert contents.torn_bytes == len(tail)


def test_segment_without_magic_reads_as_empty(tmp_path):
    path = tmp_path / "000000000001.wal"
    path.write_bytes(MAGIC[:3])
    assert read_segment(path).records == []
    assert list_segments(tmp_path) == [(1, path)]


def test_concurrent_durable_appends_share_fsyncs(tmp_path):
    fsync = CountingFsync(delay_s=0.02)  # a slow disk: submitters pile up behind each fsync
    log, _ = make_wal(tmp_path, fsync=fsync)
    n_threads, per_thread = 32, 4
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def submitter(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                log.append_durable({"t": t, "i": i}).result(10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        threads = [threading.Thread(target=submitter, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not errors
        total = n_threads * per_thread
        assert log.stats.records == total
        data_fsyncs = log.stats.fsyncs
        # one segment open = 1 fsync of its header; every other fsync commits a batch
        assert fsync.calls == data_fsyncs + 1
        assert data_fsyncs <= total // 4, f"{data_fsyncs} fsyncs for {total} records: no batching"
        got = records_of(segment_path(tmp_path / "wal", 0))
        assert sorted((r["t"], r["i"]) for r in got) == sorted(
            (t, i) for t in range(n_threads) for i in range(per_thread))
        # per-submitter order is kept
        for t in range(n_threads):
            assert [r["i"] for r in got if r["t"] == t] == list(range(per_thread))
    finally:
        log.close()


def test_background_records_ride_along_and_are_durable_within_linger(tmp_path):
    fsync = CountingFsync()
    log, _ = make_wal(tmp_path, fsync=fsync, linger_s=0.05)
    try:
        for i in range(100):
            assert log.append_background({"g": i})
        deadline = time.monotonic() + 2
        while log.stats.records < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.stats.records == 100
        assert log.stats.fsyncs <= 3  # lingered and written together
        log.append_background({"g": 100})
        log.append_durable({"f": 0}).result(5)  # a durable record flushes the earlier one too
        got = records_of(segment_path(tmp_path / "wal", 0))
        assert got[-2:] == [{"g": 100}, {"f": 0}]
    finally:
        log.close()


def test_segments_rotate_by_size_and_ids_grow(tmp_path):
    log, closed = make_wal(tmp_path, max_segment_bytes=1024)
    try:
        for i in range(60):
            log.append_durable({"i": i, "pad": "x" * 40}).result(5)
    finally:
        log.close()
    ids = [i for i, _ in closed]
    assert len(ids) >= 3 and ids == sorted(ids) and len(set(ids)) == len(ids)
    got = [r["i"] for _, p in closed for r in records_of(p)]
    assert got == list(range(60))


def test_rotate_by_age_closes_an_idle_segment(tmp_path):
    log, closed = make_wal(tmp_path, max_segment_age_s=0.1)
    try:
        log.append_durable({"i": 1}).result(5)
        deadline = time.monotonic() + 3
        while not closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [i for i, _ in closed] == [0]
    finally:
        log.close()


def test_failed_write_is_rolled_back_and_the_log_recovers(tmp_path):
    log, _ = make_wal(tmp_path)
    path = segment_path(tmp_path / "wal", 0)
    real_write = os.write
    try:
        log.append_durable({"i": 0}).result(5)
        size_before = path.stat().st_size

        def full_disk(fd, data):  # writes half, then the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        log._write = full_disk
        with pytest.raises(Unavailable, match="No space left on device"):
            log.append_durable({"i": "lost"}).result(5)
        assert path.stat().st_size == size_before  # the half-written batch is gone
        log._write = real_write
        log.append_durable({"i": 1}).result(5)
    finally:
        log.close()
    assert records_of(path) == [{"i": 0}, {"i": 1}]


def test_background_records_survive_a_failed_batch(tmp_path):
    log, _ = make_wal(tmp_path, linger_s=5.0)  # the background record waits for the durable one
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] <= 2:  # the segment header write works, then one batch fails
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "full")
        return real_write(fd, data)

    log._write = flaky
    try:
        assert log.append_background({"g": 1})
        with pytest.raises(Unavailable):
            log.append_durable({"f": "fails"}).result(5)
        log.append_durable({"f": "works"}).result(5)
    finally:
        log.close()
    assert records_of(segment_path(tmp_path / "wal", 0)) == [{"g": 1}, {"f": "works"}]


def test_a_failed_rollback_stops_the_log(tmp_path, monkeypatch):
    log, _ = make_wal(tmp_path)
    try:
        log.append_durable({"i": 0}).result(5)

        def broken_write(fd, data):
            raise OSError(errno.EIO, "I/O error")

        def broken_truncate(fd, size):
            raise OSError(errno.EIO, "I/O error")

        log._write = broken_write
        monkeypatch.setattr(wal_mod.os, "ftruncate", broken_truncate)
        with pytest.raises(Unavailable):
            log.append_durable({"i": 1}).result(5)
        assert log.broken and "restart" in log.broken
        with pytest.raises(Unavailable, match="restart"):
            log.append_durable({"i": 2})
        assert not log.append_background({"g": 0})
    finally:
        log.close()


def test_unwritable_directory_fails_durable_appends(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = WriteAheadLog(blocker / "wal", WalConfig(), encode=encode,
                        on_segment_closed=lambda i, p: None)
    log.start(0)
    try:
        with pytest.raises(Unavailable, match="cannot write the feedback log"):
            log.append_durable({"i": 0}).result(5)
    finally:
        log.close()


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_segment_bytes"):
        WalConfig(max_segment_bytes=10)
    with pytest.raises(ValueError, match="linger_s"):
        WalConfig(linger_s=-1)
