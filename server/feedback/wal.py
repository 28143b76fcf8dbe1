"""Write-ahead log: segmented, CRC-framed, fsync'd with group commit by one writer thread.

A segment is `<dir>/<id:012d>.wal`: an 8-byte magic, then records framed as
`<u32 little-endian payload length><u32 crc32(payload)><payload>`. Segment ids only grow, and a
segment is never appended to after the process that wrote it stops (recovery always opens a new
one), so a torn tail stays where it is and is simply ignored by `read_segment`.

Group commit: callers hand records to `append_durable` (returns a Future resolved once the record
is fsync'd) or `append_background` (no waiting; the record rides along with the next fsync, at
most `linger_s` later). One writer thread takes everything pending, writes it with one `write`,
calls `fdatasync` once, then resolves all the futures of that batch: concurrent submitters share
one fsync.

Failures: if a write or fsync fails (disk full, I/O error), the segment is truncated back to its
last durable length, the batch's durable futures fail with `Unavailable` (the message starts its
cause with "disk full" for ENOSPC / EDQUOT; `last_failure` keeps it until a batch commits again)
and its background records are queued again (at most `max_background_pending`; beyond that
`append_background` refuses). If even the truncation fails, the log stops accepting records until
the process restarts (recovery then reads what is really on disk), so a record that was answered
"failed" can never show up alongside its retry.

A closed segment is handed to `on_segment_closed(segment_id, path)` (the compactor); it is deleted
by whoever makes its contents durable elsewhere, never here.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefloop.server.durable_io import fsync_dir
from prefloop.server.errors import Unavailable

log = logging.getLogger(__name__)

MAGIC = b"PFLWAL1\n"
FRAME = struct.Struct("<II")  # payload length, crc32(payload)
MAX_RECORD_BYTES = 64 * 1024 * 1024
SEGMENT_SUFFIX = ".wal"


@dataclass(slots=True)
class WalConfig:
    max_segment_bytes: int = 64 * 1024 * 1024  # rotate after this many bytes
    max_segment_age_s: float = 300.0  # ... or when the active segment holds records this old
    linger_s: float = 0.05  # longest a background record waits for its fsync
    max_background_pending: int = 10_000  # background records held while the disk fails
    retry_interval_s: float = 1.0  # pause between retries of background records after a failure

    def __post_init__(self) -> None:
        if self.max_segment_bytes < 1024:
            raise ValueError(f"max_segment_bytes must be >= 1024, got {self.max_segment_bytes}")
        for name in ("max_segment_age_s", "linger_s", "retry_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_background_pending < 1:
            raise ValueError("max_background_pending must be >= 1")


@dataclass(slots=True)
class WalStats:
    fsyncs: int = 0  # data fsyncs (one per committed batch)
    batches: int = 0
    records: int = 0
    bytes: int = 0
    failures: int = 0
    segments_closed: int = 0


@dataclass(slots=True)
class SegmentContents:
    records: list[bytes]
    valid_bytes: int  # length of the readable prefix
    torn_bytes: int  # bytes after it (a torn final record, or garbage)


# ---------------------------------------------------------------------------------------------
# Segment files


def segment_path(directory: Path, segment_id: int) -> Path:
    return Path(directory) / f"{segment_id:012d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(id, path) of every segment in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        stem = p.name[:-len(SEGMENT_SUFFIX)]
        if p.name.endswith(SEGMENT_SUFFIX) and stem.isdigit():
            found.append((int(stem), p))
    return sorted(found)


def segments_of_logs(wal_dirs: list[tuple[str | None, Path]]
                     ) -> list[tuple[str | None, int, Path]]:
    """(owner, id, path) of every segment in the WAL directories of several logs (replicas)."""
    return [(owner, segment_id, path) for owner, directory in wal_dirs
            for segment_id, path in list_segments(directory)]


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"WAL record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> SegmentContents:
    """Every intact record of a segment, in order; reading stops at the first bad frame.

    A frame is bad when its header or payload is cut short, its length is impossible, or its CRC
    does not match: that is a torn final write (the process died mid-write) and everything from
    there on is ignored.
    """
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        return SegmentContents([], 0, len(data))
    records, pos = _frames(data, len(MAGIC))
    return SegmentContents(records, pos, len(data) - pos)


def read_frames_from(path: Path, offset: int) -> tuple[list[tuple[int, bytes]], int]:
    """(start, payload) of each intact record of a segment from byte `offset` on (0: the start),
    and the offset after the last of them: where to read on from once its writer appends more.
    A segment being written ends in a record cut short now and then; it is read again next
    time. FileNotFoundError when it is gone (compacted)."""
    with open(path, "rb") as f:
        if offset == 0:
            if f.read(len(MAGIC)) != MAGIC:
                return [], 0  # not (yet) a segment
            offset = len(MAGIC)
        f.seek(offset)
        data = f.read()
    starts: list[int] = []
    records, used = _frames(data, 0, starts)
    return [(offset + s, r) for s, r in zip(starts, records)], offset + used


def _frames(data: bytes, pos: int, starts: list[int] | None = None) -> tuple[list[bytes], int]:
    """The intact frames of `data` from `pos`, and where the first bad or cut one starts;
    `starts` gets where each frame starts."""
    records, end = [], len(data)
    view = memoryview(data)
    while pos + FRAME.size <= end:
        length, crc = FRAME.unpack_from(data, pos)
        start = pos + FRAME.size
        if length > MAX_RECORD_BYTES or start + length > end:
            break
        payload = bytes(view[start:start + length])
        if zlib.crc32(payload) != crc:
            break
        records.append(payload)
        if starts is not None:
            starts.append(pos)
        pos = start + length
    return records, pos


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = f"{exc.strerror or exc} ({name})" if name else str(exc)
    return f"disk full: {text}" if exc.errno in DISK_FULL_ERRNOS else text


# ---------------------------------------------------------------------------------------------
# The log


class _Item:
    __slots__ = ("record", "future")

    def __init__(self, record: Any, future: Future | None) -> None:
        self.record = record
        self.future = future


class WriteAheadLog:
    """One writer thread; `append_*` may be called from any thread (or an asyncio loop)."""

    def __init__(self, directory: str | Path, config: WalConfig | None = None, *,
                 encode: Callable[[Any], bytes],
                 on_segment_closed: Callable[[int, Path], None],
                 fsync: Callable[[int], None] = os.fdatasync) -> None:
        self.directory = Path(directory)
        self.config = config or WalConfig()
        self.stats = WalStats()
        self._encode = encode
        self._on_segment_closed = on_segment_closed
        self._fsync = fsync
        self._write = os.write  # tests replace it to simulate a full disk
        self._cond = threading.Condition()
        self._pending: list[_Item] = []
        self._durable_pending = 0
        self._background_pending = 0
        self._pending_since = 0.0
        self._retry_after = 0.0
        self._rotate_waiters: list[Future] = []
        self._stopping = False
        self._broken: str | None = None  # set when a failed batch could not be rolled back
        self.last_failure: str | None = None  # why the last batch failed; None once one commits
        self._thread: threading.Thread | None = None
        # writer-thread state
        self._next_id = 0
        self._fd: int | None = None
        self._segment_id = -1
        self._size = 0
        self._segment_records = 0
        self._first_record_at = 0.0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, next_segment_id: int) -> None:
        """Start the writer; the first segment it opens gets `next_segment_id`."""
        assert self._thread is None, "WAL already started"
        self._next_id = next_segment_id
        self._thread = threading.Thread(target=self._run, name="prefloop-wal", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Commit what is pending, close (and hand over) the active segment, stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def broken(self) -> str | None:
        return self._broken

    @property
    def pending(self) -> int:
        """Records queued and not yet written (background rows held while writes fail, too)."""
        with self._cond:
            return len(self._pending)

    def refusal_reason(self) -> str:
        """Why `append_background` returned False."""
        if self._broken is not None:
            return self._broken
        if self._stopping:
            return "the feedback log is closed"
        return (f"{self.config.max_background_pending} rows are already waiting for the disk "
                "(writes are failing)")

    # -- appending ------------------------------------------------------------------------------

    def append_durable(self, record: Any) -> Future:
        """Queue `record`; the Future resolves (None) once it is fsync'd, or fails Unavailable."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(_Item(record, future))
            self._durable_pending += 1
            self._cond.notify()
        return future

    def append_background(self, record: Any) -> bool:
        """Queue `record` without waiting; False when it is refused (log closed, broken, or full)."""
        with self._cond:
            if self._stopping or self._broken is not None:
                return False
            if self._background_pending >= self.config.max_background_pending:
                return False
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(_Item(record, None))
            self._background_pending += 1
            if len(self._pending) == 1:
                self._cond.notify()
        return True

    def rotate(self) -> Future:
        """Commit what is pending and close the active segment. Resolves, once that is done, to
        the id the next segment will get: every segment with a smaller id is closed."""
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._rotate_waiters.append(future)
            self._cond.notify()
        return future

    def _check_open(self) -> None:
        if self._stopping:
            raise Unavailable("the feedback log is shutting down")
        if self._broken is not None:
            raise Unavailable(self._broken)

    # -- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    deadlines = []
                    if self._durable_pending or self._stopping or self._rotate_waiters:
                        break
                    if self._pending:
                        due = max(self._pending_since + cfg.linger_s, self._retry_after)
                        if now >= due:
                            break
                        deadlines.append(due)
                    if self._fd is not None and self._segment_records:
                        due = self._first_record_at + cfg.max_segment_age_s
                        if now >= due:
                            break
                        deadlines.append(due)
                    self._cond.wait(min(deadlines) - now if deadlines else None)
                batch, self._pending = self._pending, []
                self._durable_pending = self._background_pending = 0
                stopping = self._stopping
                waiters, self._rotate_waiters = self._rotate_waiters, []
            if batch:
                self._commit(batch, final=stopping)
            if self._fd is not None and (
                    stopping or waiters or self._size >= cfg.max_segment_bytes
                    or (self._segment_records
                        and time.monotonic() >= self._first_record_at + cfg.max_segment_age_s)):
                self._close_segment()
            for w in waiters:
                w.set_result(self._next_id)
            if stopping:
                with self._cond:
                    leftover, self._pending = self._pending, []
                self._fail(leftover, Unavailable("the feedback log is shutting down"), final=True)
                return

    def _commit(self, batch: list[_Item], *, final: bool) -> None:
        if self._broken is not None:  # queued before the log broke: nothing more is written
            self._fail(batch, Unavailable(self._broken), final=True)
            return
        frames, items = [], []
        for item in batch:
            try:
                frames.append(encode_frame(self._encode(item.record)))
                items.append(item)
            except Exception as exc:  # a record that cannot be encoded fails alone
                log.exception("WAL: cannot encode a record")
                if item.future is not None:
                    item.future.set_exception(exc)
        if not items:
            return
        data = b"".join(frames)
        try:
            if self._fd is None:
                self._open_segment()
            view = memoryview(data)
            while view:
                written = self._write(self._fd, view)
                view = view[written:]
            self._fsync(self._fd)
        except OSError as exc:
            self.stats.failures += 1
            reason = f"cannot write the feedback log in {self.directory}: {_describe(exc)}"
            log.error("WAL: %s", reason)
            self.last_failure = reason
            self._rollback(reason)
            self._fail(items, Unavailable(reason), final=final)
            return
        now = time.monotonic()
        if not self._segment_records:
            self._first_record_at = now
        self._size += len(data)
        self._segment_records += len(items)
        self.stats.fsyncs += 1
        self.stats.batches += 1
        self.stats.records += len(items)
        self.stats.bytes += len(data)
        self._retry_after = 0.0
        if self.last_failure is not None:
            log.warning("WAL: writing again after a failure (%s)", self.last_failure)
            self.last_failure = None
        for item in items:
            if item.future is not None:
                item.future.set_result(None)

    def _fail(self, items: list[_Item], error: Exception, *, final: bool) -> None:
        """Fail the durable items; queue the background ones again (unless stopping or broken)."""
        keep = not final and self._broken is None
        requeue, dropped = [], 0
        for item in items:
            if item.future is not None:
                item.future.set_exception(error)
            elif keep:
                requeue.append(item)
            else:
                dropped += 1
        if dropped:
            log.error("WAL: dropping %d background records that could not be written", dropped)
        if requeue:
            with self._cond:
                if not self._pending:
                    self._pending_since = time.monotonic()
                self._pending[:0] = requeue
                self._background_pending += len(requeue)
                self._retry_after = time.monotonic() + self.config.retry_interval_s

    def _rollback(self, reason: str) -> None:
        """Cut the active segment back to its last durable length after a failed batch."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
            self._fsync(self._fd)
        except OSError as exc:
            self._broken = (f"{reason}; the log could not be rolled back ({_describe(exc)}) and "
                            "accepts nothing more until the server restarts")
            log.critical("WAL: %s", self._broken)
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _open_segment(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        segment_id = self._next_id
        path = segment_path(self.directory, segment_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self._write(fd, MAGIC)
            self._fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            try:
                path.unlink()
            except OSError:
                pass
            raise
        self._next_id = segment_id + 1
        self._fd, self._segment_id = fd, segment_id
        self._size, self._segment_records = len(MAGIC), 0

    def _close_segment(self) -> None:
        fd, segment_id, records = self._fd, self._segment_id, self._segment_records
        self._fd, self._segment_records = None, 0
        os.close(fd)
        path = segment_path(self.directory, segment_id)
        if records == 0:  # nothing in it: no need to compact
            try:
                path.unlink()
            except OSError as exc:
                log.warning("WAL: cannot remove empty segment %s: %s", path, exc)
            return
        self.stats.segments_closed += 1
        try:
            self._on_segment_closed(segment_id, path)
        except Exception:
            log.exception("WAL: on_segment_closed failed for %s", path)
