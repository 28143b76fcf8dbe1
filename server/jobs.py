"""The align job lock and the job history, beside the registry they belong to:

    <data-dir>/registry/job.lock     flock'd by the one align job running (its pid inside)
    <data-dir>/registry/jobs.jsonl   one line per job event: its start, then its outcome
                                     (append-only, fsync'd; a torn last line is skipped)

`JobRecord` is the one schema of a job: `record_job` refuses a field it does not have, and
`job_history` merges each job's events into one `JobRecord` (oldest job first), so align (which
writes), `prefloop align jobs`, `/v1/admin/jobs` and the web page (which read) see the same fields.
A job whose last event says "running" while its process is gone died without an outcome (SIGKILL,
power loss): it reads as "crashed". Pure standard library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prefloop.server.durable_io import append_line_durable, makedirs_durable, read_jsonl, utc_now
from prefloop.server.errors import InvalidArgument, Unavailable
from prefloop.server.registry import Registry, pid_alive

JOBS_FILE = "jobs.jsonl"
JOB_LOCK_FILE = "job.lock"
SKIPPED, REJECTED, PUBLISHED, PROMOTED, FAILED, RUNNING, CRASHED = (
    "skipped", "rejected", "published", "promoted", "failed", "running", "crashed")
STATUSES = (SKIPPED, REJECTED, PUBLISHED, PROMOTED, FAILED, RUNNING)  # CRASHED is read, never written


@dataclass(slots=True)
class JobRecord:
    """One align job as the history knows it (its events merged)."""

    job_id: str
    status: str  # skipped | rejected | published | promoted | failed | running | crashed
    at: str = ""  # the time of its latest event
    pid: int | None = None
    command: str = ""  # the align subcommand: dpo, kto, sft, rm, ppo, run, schedule
    method: str | None = None  # dpo, kto, sft, rm, ppo
    started_at: str | None = None
    finished_at: str | None = None
    reason: str = ""
    version: str | None = None  # the version it published, if any
    base: str | None = None
    gate: dict | None = None  # the gate's verdict (align/gate.py GateDecision.to_record)
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # its data window and row counts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = frozenset(f.name for f in dataclasses.fields(JobRecord))


def jobs_path(registry: Registry) -> Path:
    return registry.root / JOBS_FILE


@contextlib.contextmanager
def job_lock(registry: Registry) -> Iterator[None]:
    """Exclusive lock for one align job; Unavailable at once if another job holds it."""
    makedirs_durable(registry.root)
    path = registry.root / JOB_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Unavailable(f"another align job is running (pid {holder}; lock {path})") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def record_job(registry: Registry, entry: dict[str, Any]) -> None:
    """Append one job event to jobs.jsonl: `job_id` and a written status required, only
    `JobRecord`'s fields (InvalidArgument otherwise); `at` defaults to now."""
    if not entry.get("job_id") or entry.get("status") not in STATUSES:
        raise InvalidArgument(f"a job record needs job_id and a status of {STATUSES}")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise InvalidArgument(f"a job record has no field(s) {unknown}")
    makedirs_durable(registry.root)
    append_line_durable(jobs_path(registry), dict(entry, at=entry.get("at") or utc_now()))


def job_history(registry: Registry) -> list[JobRecord]:
    """One JobRecord per job (its events merged in order), oldest first; "crashed" for a job
    still "running" whose process is gone. Fields a newer writer added are dropped."""
    merged: dict[str, dict[str, Any]] = {}
    for event in read_jsonl(jobs_path(registry)):
        if isinstance(event, dict) and event.get("job_id"):
            merged.setdefault(event["job_id"], {}).update(
                {k: v for k, v in event.items() if k in FIELDS})
    jobs = []
    for fields in merged.values():
        job = JobRecord(**{"status": RUNNING, **fields})
        if job.status == RUNNING and not pid_alive(int(job.pid or 0)):
            job.status = CRASHED
        jobs.append(job)
    return jobs
