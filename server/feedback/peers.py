"""Following the other logs on a shared data root: what lets a replica accept a vote on an answer
another replica served, and know a vote retried on another replica for the duplicate it is.

Replicas (`serve --replica ID`) share one data root and never write each other's files
(schema.py's layout). `PeerLogs.poll()` returns the rows the other logs gained since the last
call — the records appended to their WAL segments (read on from where the last poll stopped,
up to the last intact record: a record being written is read next time) and the Parquet parts
that appeared (a segment compacted before it was ever read) — for the store to index: response
id -> prompt fingerprint and model version, idempotency key -> feedback id. Nothing else is kept:
reading files is the whole protocol, so it works on any filesystem every replica mounts, with no
replica having to be up for another's answers to be votable.

The store polls every `peer_poll_s` on a thread of its own. A generation row is on disk at most
the WAL's linger (50 ms) after its answer ended, so any replica knows an answer within linger +
poll interval; a vote that arrives sooner waits for it (the store's `peer_wait_s`) instead of
being refused.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.wal import list_segments, read_segment_from

log = logging.getLogger(__name__)

RECENT_S = 2.0  # a date directory changed this recently is listed again at every poll

# the columns the store indexes, per table
INDEXED = {logschema.GENERATIONS: ["response_id", "prompt_fingerprint", "model_version"],
           logschema.FEEDBACK: ["idempotency_key", "feedback_id"]}


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
        self._offsets: dict[Path, int] = {}  # a peer's WAL segment -> bytes read
        self._parts_seen: set[Path] = set()
        self._dir_mtimes: dict[str, int] = {}  # a date directory -> its mtime when listed
        self.rows_seen = 0

    def mark_parts_seen(self, parts: list[Path]) -> None:
        """Parts already indexed (the store reads every part at start)."""
        self._parts_seen.update(parts)

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        """(table, row) of everything the other logs gained since the last poll."""
        rows: list[tuple[str, dict[str, Any]]] = []
        live: set[Path] = set()
        for owner, wal_dir in logschema.wal_dirs(self.data_dir):
            if owner == self.replica and not self.follow_own:
                continue
            for _, path in list_segments(wal_dir):
                live.add(path)
                try:
                    records, offset = read_segment_from(path, self._offsets.get(path, 0))
                except FileNotFoundError:  # compacted meanwhile: its parts are read below
                    continue
                self._offsets[path] = offset
                for record in records:
                    table, row = logschema.decode_record(record)
                    if table in self.tables:
                        rows.append((table, {c: row.get(c) for c in self.tables[table]}))
        for gone in set(self._offsets) - live:
            del self._offsets[gone]
        rows += self._new_parts()  # after the segments: a segment gone above left its parts
        self.rows_seen += len(rows)
        return rows

    def _new_parts(self) -> list[tuple[str, dict[str, Any]]]:
        """Rows of the parts that appeared since the last poll. Only the date directories whose
        mtime moved (a part renamed in), or moved less than RECENT_S ago (a second rename within
        the filesystem's timestamp tick), are listed: one stat per date directory per poll."""
        rows: list[tuple[str, dict[str, Any]]] = []
        now_ns = time.time_ns()
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
                if self._dir_mtimes.get(entry.path) == mtime and now_ns - mtime > RECENT_S * 1e9:
                    continue
                self._dir_mtimes[entry.path] = mtime
                for part in sorted(Path(entry.path).glob("part-*.parquet")):
                    if part not in self._parts_seen:
                        self._parts_seen.add(part)
                        rows += [(table, row) for row in self._read_part(part, columns)]
        return rows

    def _read_part(self, part: Path, columns: list[str]) -> list[dict[str, Any]]:
        owner = logschema.part_owner(part.name)
        if owner is None or (owner[0] == self.replica and not self.follow_own):
            return []  # this log's own: indexed from its WAL before it was compacted
        try:
            table = pq.read_table(part, columns=columns)
            if "created_at" in columns:  # microseconds, as in the WAL's records
                table = table.set_column(table.schema.get_field_index("created_at"), "created_at",
                                         table.column("created_at").cast("int64"))
            return table.to_pylist()
        except Exception as exc:  # noqa: BLE001 - a damaged part: its owner quarantines it
            log.warning("peer part %s unreadable, skipped: %s", part, exc)
            return []
