"""Following the logs on a shared data root: what lets a replica accept a vote on an answer another
replica served, and what the A/B test's tally reads at each look.

Replicas (`serve --replica ID`) share one data root and never write each other's files
(schema.py's layout). `PeerLogs.poll()` returns the rows the followed logs gained since the last
call — the records appended to their WAL segments (read on from where the last poll stopped, up
to the last intact record: a record being written is read next time) and the Parquet parts that
appeared (a segment compacted before it was ever read). Reading files is the whole protocol: it
works on any filesystem every replica mounts, with no replica having to be up for another's
answers to be votable.

What a WAL tail shows is not yet fsync'd: a write that fails (a full disk) is cut back out of the
segment, and the writer appends again from there. So a poll first checks that the last record it
read is still where it was (its frame header, 8 bytes); when it is not, or the file is shorter
than what was read, the segment is read again from its start. The store therefore uses what it
follows only for response ids (a vote on an answer whose row was then cut back is logged and
resolves to nothing at training), never to answer "duplicate" for an idempotency key: a vote
retried on another replica is logged again there and every reader keeps one row per key.

New Parquet parts are found by listing only the date folders whose mtime changed, or changed
less than RECENT_S ago by this machine's clock when the change was first seen (a second part
renamed within the filesystem's timestamp tick, or a file server whose clock differs), plus a
full listing every FULL_SCAN_S. A part that cannot be read is tried again at the next full
listing; a poll that fails part-way keeps what it had read so far for the next poll.

The store polls every `peer_poll_s` on a thread of its own. A generation row is written at most
the WAL's linger (50 ms) after its answer ended, so any replica knows an answer within linger +
poll interval; a vote that arrives sooner waits for it (the store's `peer_wait_s`) instead of
being refused.
"""
from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.wal import FRAME, list_segments, read_frames_from

log = logging.getLogger(__name__)

RECENT_S = 2.0  # a date folder first seen changed this recently is listed again at every poll
FULL_SCAN_S = 30.0  # every date folder is listed again this often

# the columns the store indexes, per table: response ids only (module docstring)
INDEXED = {logschema.GENERATIONS: ["response_id", "prompt_fingerprint", "model_version"]}


class PeerLogs:
    """The other logs of a data root, as seen from the log of `replica` (None: the lone server);
    with `follow_own`, every log, that one included (a reader that follows the whole root, such
    as the A/B test's tally). `tables`: which tables, and which of their columns, to return."""

    def __init__(self, data_dir: str | Path, replica: str | None, *, follow_own: bool = False,
                 tables: dict[str, list[str]] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.replica = replica
        self.follow_own = follow_own
        self.tables = INDEXED if tables is None else tables
        # a followed WAL segment -> (bytes read, start of the last record read, its frame header)
        self._segments: dict[Path, tuple[int, int, bytes]] = {}
        self._parts_seen: set[Path] = set()
        self._dirs: dict[str, tuple[int, float]] = {}  # date folder -> (mtime, local time first seen)
        self._last_full_scan = 0.0
        self.rows_seen = 0

    def mark_parts_seen(self, parts: list[Path]) -> None:
        """Parts already indexed (the store reads every part at start)."""
        self._parts_seen.update(parts)

    def _follows(self, owner: str | None) -> bool:
        return self.follow_own or owner != self.replica

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        """(table, row) of everything the followed logs gained since the last poll."""
        rows: list[tuple[str, dict[str, Any]]] = []
        live: set[Path] = set()
        for owner, wal_dir in logschema.wal_dirs(self.data_dir):
            if not self._follows(owner):
                continue
            try:
                segments = list_segments(wal_dir)
            except OSError as exc:
                log.warning("cannot list %s: %s", wal_dir, exc)
                live.update(p for p in self._segments if p.parent == wal_dir)
                continue
            for _, path in segments:
                live.add(path)
                rows += self._tail(path)
        for gone in set(self._segments) - live:  # compacted: its parts are read below
            del self._segments[gone]
        rows += self._new_parts()
        self.rows_seen += len(rows)
        return rows

    def _tail(self, path: Path) -> list[tuple[str, dict[str, Any]]]:
        offset, last_start, last_header = self._segments.get(path, (0, 0, b""))
        try:
            if last_header and not _frame_still_there(path, last_start, last_header):
                log.info("WAL segment %s was cut back by its writer (a failed write): reading it "
                         "again from its start", path)
                offset = 0
            frames, end = read_frames_from(path, offset)
        except FileNotFoundError:  # compacted meanwhile: its parts are read later
            return []
        except OSError as exc:  # kept as it was: read again at the next poll
            log.warning("cannot read %s: %s", path, exc)
            return []
        rows = []
        for start, payload in frames:
            try:
                table, row = logschema.decode_record(payload)
            except (ValueError, KeyError) as exc:
                log.warning("undecodable record at byte %d of %s: %s", start, path, exc)
                continue
            if table in self.tables:
                rows.append((table, {c: row.get(c) for c in self.tables[table]}))
        if frames:  # remember the last record read, to check next time that it is still there
            start, payload = frames[-1]
            self._segments[path] = (end, start, FRAME.pack(len(payload), zlib.crc32(payload)))
        else:
            self._segments[path] = (end, last_start, last_header) if offset else (end, 0, b"")
        return rows

    def _new_parts(self) -> list[tuple[str, dict[str, Any]]]:
        """Rows of the parts that appeared since the last poll (module docstring)."""
        rows: list[tuple[str, dict[str, Any]]] = []
        now = time.monotonic()
        full = now - self._last_full_scan >= FULL_SCAN_S
        if full:
            self._last_full_scan = now
        for table, columns in self.tables.items():
            try:
                dates = [e for e in os.scandir(self.data_dir / table)
                         if e.name.startswith("date=") and e.is_dir()]
            except FileNotFoundError:
                continue
            for entry in dates:
                try:
                    mtime = entry.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                seen = self._dirs.get(entry.path)
                if seen is None or seen[0] != mtime:
                    seen = self._dirs[entry.path] = (mtime, now)
                elif not full and now - seen[1] > RECENT_S:
                    continue
                for part in sorted(Path(entry.path).glob("part-*.parquet")):
                    if part not in self._parts_seen:
                        read = self._read_part(part, columns)
                        if read is not None:
                            self._parts_seen.add(part)
                            rows += [(table, row) for row in read]
        return rows

    def _read_part(self, part: Path, columns: list[str]) -> list[dict[str, Any]] | None:
        """The part's rows (columns), [] for a part not followed, None when it cannot be read
        now (tried again at the next full listing)."""
        owner = logschema.part_owner(part.name)
        if owner is None or not self._follows(owner[0]):
            return []  # this log's own: indexed from its WAL before it was compacted
        try:
            table = pq.read_table(part, columns=columns)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 - a damaged part: its owner quarantines it
            log.warning("part %s unreadable, skipped for now: %s", part, exc)
            return None
        if "created_at" in columns:  # microseconds, as in the WAL's records
            table = table.set_column(table.schema.get_field_index("created_at"), "created_at",
                                     table.column("created_at").cast("int64"))
        return table.to_pylist()


def _frame_still_there(path: Path, start: int, header: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(len(header)) == header
