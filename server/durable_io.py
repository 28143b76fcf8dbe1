"""Durable file-system steps shared by the WAL, the Parquet compactor, the registry and align.

Every name that becomes visible is complete: files are written under a temp name, fsync'd and
renamed, and the directory holding a new name is fsync'd so the rename survives a crash.
Append-only files get whole lines appended with O_APPEND and fsync'd (`append_durable`); JSON-lines
files (the registry's history, the job history, the A/B log) are written with `append_line_durable`
and read back with `read_jsonl`, which skips a torn last line. `utc_now` is the one timestamp format
of those lines.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file that is already written and closed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durable(path: Path, data: bytes) -> None:
    """Append `data` (one or more whole lines) with O_APPEND and fsync it; fsync the directory
    when the file is new. A torn last line after a crash is for readers to skip."""
    path = Path(path)
    existed = path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not existed:
        fsync_dir(path.parent)


def makedirs_durable(directory: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory it creates."""
    directory = Path(directory)
    if directory.is_dir():
        return
    makedirs_durable(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
    fsync_dir(directory.parent)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temp file beside `path` (`.NAME.PID.HEX.tmp`), fsync, rename over `path`,
    fsync the directory: readers see the old content or the new, never half."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_file_atomic(path: Path, data: bytes) -> None:
    """`data` to `path` through `write_atomic`."""
    write_atomic(path, lambda f: f.write(data))


def utc_now() -> str:
    """Now as an ISO-8601 UTC time with microseconds and a Z ("2026-12-03T09:00:00.000000Z")."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def append_line_durable(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line with O_APPEND and fsync it (a torn last line is skipped by readers)."""
    append_durable(path, (json.dumps(obj, sort_keys=True) + "\n").encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of `path` ([] when absent); a torn final line is ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
