"""Compaction: closed WAL segments become Parquet parts, then the segments are deleted.

Segment N becomes `<table>/date=D/part-N.parquet` (a replica's: `part-<replica>-N.parquet`, so
replicas on one data root never write the same file) for every (table, date) it holds rows of. Each
part is written under a temp name (`.part-N.parquet.<pid>.<hex>.tmp`, invisible to dataset readers),
fsync'd, renamed, and its directory fsync'd; only when every part of the segment is durable is the
segment deleted (and the WAL directory fsync'd). A crash anywhere in between leaves the segment in
place; the next start compacts it again and overwrites the same part names with the same rows, so
rows are never duplicated.

`Compactor` runs this on a background thread, retrying a failed segment (disk full) later.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefloop.server.durable_io import fsync_dir, makedirs_durable, write_atomic
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.wal import read_segment

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


@dataclass(slots=True)
class CompactionStats:
    segments: int = 0
    parts: int = 0
    rows: int = 0
    failures: int = 0


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write `table` to `path` so that `path` is either absent, the old file, or complete."""
    makedirs_durable(path.parent)
    write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def remove_temp_files(data_dir: Path, replica: str | None = None) -> int:
    """Delete temp parts that `replica` (None: the lone server) left by a crash mid-write (never
    another replica's: it may be writing them now); returns how many."""
    removed = 0
    for table in logschema.TABLES:
        for p in (Path(data_dir) / table).glob("date=*/.part-*" + TEMP_SUFFIX):
            part = p.name[1:p.name.rfind(".parquet") + len(".parquet")]
            owner = logschema.part_owner(part)
            if owner is not None and owner[0] == replica:
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def compact_segment(data_dir: Path, segment_id: int, path: Path, replica: str | None = None
                    ) -> tuple[int, int]:
    """Segment → durable Parquet parts → segment deleted. Returns (parts written, rows)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for payload in read_segment(path).records:
        table, row = logschema.decode_record(payload)
        groups[(table, logschema.date_of_micros(row["created_at"]))].append(row)
    rows = 0
    for (table, date), table_rows in sorted(groups.items()):
        part = logschema.partition_dir(data_dir, table, date) / logschema.part_name(segment_id, replica)
        write_parquet_atomic(part, logschema.rows_to_table(table, table_rows))
        rows += len(table_rows)
    path.unlink()
    fsync_dir(path.parent)
    return len(groups), rows


class Compactor:
    """A background thread compacting segments in the order they are submitted."""

    def __init__(self, data_dir: str | Path, *, retry_interval_s: float = 5.0,
                 replica: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.replica = replica
        self.retry_interval_s = retry_interval_s
        self.stats = CompactionStats()
        self._queue: queue.Queue[tuple[int, Path] | None] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one compaction at a time (thread vs. drain)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prefloop-compactor", daemon=True)
        self._thread.start()

    def submit(self, segment_id: int, path: Path) -> None:
        self._queue.put((segment_id, path))

    def compact(self, segment_id: int, path: Path) -> bool:
        """Compact one segment now; False (logged) when it failed and stays in the WAL."""
        with self._lock:
            if not path.exists():  # already compacted
                return True
            try:
                parts, rows = compact_segment(self.data_dir, segment_id, path, self.replica)
            except Exception as exc:
                self.stats.failures += 1
                log.error("compaction of WAL segment %s failed (kept, will retry): %s", path, exc)
                return False
            self.stats.segments += 1
            self.stats.parts += parts
            self.stats.rows += rows
            return True

    def close(self, *, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the thread; with `drain`, compact whatever is still queued first (same thread)."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if drain:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self.compact(*item)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            if not self.compact(*item):
                self._queue.put(item)
                if self._stop.wait(self.retry_interval_s):
                    break
