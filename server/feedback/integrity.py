"""Integrity of the log's files: which Parquet parts and WAL segments are damaged, and the
quarantine that moves a damaged file out of the way so the rest of the log stays usable.

- A Parquet part is damaged when its footer or any page cannot be read against the table's
  schema (a part cut short by a power cut, garbage, a wrong schema). `probe_part` reads it whole.
- A WAL segment is damaged when it lacks the magic (nothing in it is readable) or has bytes after
  its last intact record (`torn_bytes`: a write cut off by a crash; recovery ignores them, and the
  segment goes away once compacted, so a torn tail needs no repair and is only reported).
- `quarantine(data_dir, path, reason)` renames a damaged file to
  `<data-dir>/quarantine/<UTC time>/<its path under data-dir>` and writes a `.reason` file next to
  it, both fsync'd: nothing is deleted, an operator can look at it or restore it, and no reader of
  the log (server start-up, exports, align) sees it again.

The server quarantines damaged Parquet parts when it starts (the store's index rebuild) and a
WAL segment without its magic; `prefloop logs check` reports everything and quarantines with
`--repair`.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from prefloop.server.durable_io import fsync_dir, makedirs_durable
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.wal import SegmentContents, read_segment, segments_of_logs

QUARANTINE_DIR = "quarantine"


def probe_part(path: Path, table: str) -> tuple[int, str | None]:
    """(rows, None) for a readable part of `table`; (0, why) for a damaged one."""
    try:
        data = pq.read_table(path, schema=logschema.SCHEMAS[table])
        return data.num_rows, None
    except Exception as exc:  # noqa: BLE001 - any failure to read is damage to report
        return 0, f"{type(exc).__name__}: {exc}".strip()


def lacks_magic(path: Path, contents: SegmentContents) -> bool:
    """A non-empty segment with nothing readable: not a segment (or its start overwritten)."""
    return contents.valid_bytes == 0 and path.stat().st_size > 0


def quarantine(data_dir: Path, path: Path, reason: str) -> Path:
    """Move `path` (inside `data_dir`) under `data_dir/quarantine/<time>/`; returns the new path."""
    data_dir, path = Path(data_dir), Path(path)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = data_dir / QUARANTINE_DIR / stamp / path.relative_to(data_dir)
    makedirs_durable(target.parent)
    note = target.with_name(target.name + ".reason")
    note.write_text(f"{reason}\nfrom: {path}\nat: {stamp}\n")
    os.replace(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)
    return target


@dataclass(slots=True)
class LogCheck:
    parts: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # table -> readable rows in Parquet
    bad_parts: list[dict[str, Any]] = field(default_factory=list)  # {path, table, error, moved_to}
    segments: int = 0
    wal_records: int = 0
    torn_segments: list[dict[str, Any]] = field(default_factory=list)  # {path, torn_bytes, records}
    bad_segments: list[dict[str, Any]] = field(default_factory=list)  # no magic: {path, moved_to}
    quarantined_before: int = 0  # files already in quarantine/

    @property
    def damaged(self) -> int:
        """Damaged files still in the log (quarantined ones no longer count)."""
        return sum(1 for b in self.bad_parts + self.bad_segments if not b.get("moved_to"))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "damaged": self.damaged}


def check_log(data_dir: Path, *, repair: bool = False, skip_segments: frozenset[Path] = frozenset()
              ) -> LogCheck:
    """Read every part and segment of the logs in `data_dir` (every replica's); with `repair`,
    quarantine damaged parts and segments without magic. `skip_segments`: segments a live
    writer may be appending to."""
    data_dir = Path(data_dir)
    out = LogCheck()
    qdir = data_dir / QUARANTINE_DIR
    if qdir.is_dir():  # counted before this check moves anything there
        out.quarantined_before = sum(1 for p in qdir.rglob("*")
                                     if p.is_file() and not p.name.endswith(".reason"))
    for table in logschema.TABLES:
        out.rows[table] = 0
        for path in logschema.part_files(data_dir, table):
            out.parts += 1
            rows, error = probe_part(path, table)
            if error is None:
                out.rows[table] += rows
                continue
            bad = {"path": str(path), "table": table, "error": error, "moved_to": None}
            if repair:
                bad["moved_to"] = str(quarantine(data_dir, path, f"unreadable Parquet part: {error}"))
            out.bad_parts.append(bad)
    for _, _, path in segments_of_logs(logschema.wal_dirs(data_dir)):
        if path in skip_segments:
            continue
        try:
            contents = read_segment(path)
        except FileNotFoundError:  # compacted by its running writer meanwhile: now in a part
            continue
        out.segments += 1
        out.wal_records += len(contents.records)
        if lacks_magic(path, contents):
            bad = {"path": str(path), "bytes": contents.torn_bytes, "moved_to": None}
            if repair:
                bad["moved_to"] = str(quarantine(data_dir, path, "WAL segment without its magic"))
            out.bad_segments.append(bad)
        elif contents.torn_bytes:
            out.torn_segments.append({"path": str(path), "torn_bytes": contents.torn_bytes,
                                      "records": len(contents.records)})
    return out
