"""The `scores` table: reward-model scores of logged generations, queryable next to the log.

    <data-dir>/scores/rm=v0003/part-20260105T101500Z-3fa9c1.parquet

One folder per reward-model version (hive partition `rm`), one Parquet part per `prefloop align
score` run holding the generations that version had not scored yet. Parts are written to a
`.`-prefixed temp file, fsync'd and renamed (`durable_io.write_atomic`: never visible
half-written). Columns (`SCHEMA`):

| column | type | meaning |
|---|---|---|
| `response_id` | string | the scored completion (joins `generations.response_id`) |
| `rm_version` | string | the reward model (same as the `rm` partition) |
| `score` | float64 | the reward model's scalar for prompt + completion |
| `model_version` | string | the version that generated the completion |
| `prompt_fingerprint` | string | the prompt's fingerprint (joins feedback / generations) |
| `generated_at` | timestamp[us, UTC] | the generation's `created_at` |
| `scored_at` | timestamp[us, UTC] | when this run scored it |

Readers: `load_scores(data_dir)` (pyarrow), or DuckDB
`read_parquet('data/scores/*/*.parquet', hive_partitioning=true)`.
"""
from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prefloop.server.durable_io import makedirs_durable, write_atomic
from prefloop.server.feedback import schema as logschema
from prefloop.server.registry import version_number

SCORES_DIR = "scores"
TIMESTAMP = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("response_id", pa.string()),
    ("rm_version", pa.string()),
    ("score", pa.float64()),
    ("model_version", pa.string()),
    ("prompt_fingerprint", pa.string()),
    ("generated_at", TIMESTAMP),
    ("scored_at", TIMESTAMP),
])


def partition_dir(data_dir: str | Path, rm_version: str) -> Path:
    version_number(rm_version)
    return Path(data_dir) / SCORES_DIR / f"rm={rm_version}"


def part_files(data_dir: str | Path, rm_version: str | None = None) -> list[Path]:
    root = Path(data_dir) / SCORES_DIR
    pattern = f"rm={rm_version}/part-*.parquet" if rm_version else "rm=*/part-*.parquet"
    return sorted(p for p in root.glob(pattern) if p.is_file())


def load_scores(data_dir: str | Path, rm_version: str | None = None) -> pa.Table:
    """Every score row (of one reward model, or all), the latest per (response, rm version)."""
    files = part_files(data_dir, rm_version)
    if not files:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in files])
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in table.to_pylist():
        key = (row["response_id"], row["rm_version"])
        if key not in latest or row["scored_at"] > latest[key]["scored_at"]:
            latest[key] = row
    rows = sorted(latest.values(), key=lambda r: (r["rm_version"], r["generated_at"] or
                                                  dt.datetime.min.replace(tzinfo=dt.timezone.utc),
                                                  r["response_id"]))
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def scored_ids(data_dir: str | Path, rm_version: str) -> set[str]:
    files = part_files(data_dir, rm_version)
    ids: set[str] = set()
    for p in files:
        ids.update(pq.read_table(p, columns=["response_id"]).column("response_id").to_pylist())
    return ids


def write_part(data_dir: str | Path, rm_version: str, rows: list[dict[str, Any]]) -> Path | None:
    """Write one part (temp, fsync, rename, fsync dir); None when `rows` is empty."""
    if not rows:
        return None
    folder = partition_dir(data_dir, rm_version)
    makedirs_durable(folder)
    now = dt.datetime.now(dt.timezone.utc)
    name = f"part-{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}.parquet"
    table = pa.Table.from_pylist([dict(r, rm_version=rm_version, scored_at=now) for r in rows],
                                 schema=SCHEMA)
    write_atomic(folder / name, lambda f: pq.write_table(table, f))
    return folder / name


def generations_to_score(data_dir: str | Path, rm_version: str, *, since: str | None = None,
                         rescore: bool = False, limit: int | None = None
                         ) -> list[dict[str, Any]]:
    """Generations with a non-empty completion that `rm_version` has not scored (all of them
    with `rescore`), oldest first: response_id, prompt (messages), completion, model_version,
    prompt_fingerprint, generated_at."""
    from prefloop.server.feedback import export as log_export
    table = log_export.load_table(data_dir, logschema.GENERATIONS, since=since)
    done = set() if rescore else scored_ids(data_dir, rm_version)
    rows = []
    for g in table.to_pylist():
        if not g.get("completion") or g["response_id"] in done:
            continue
        rows.append({"response_id": g["response_id"],
                     "prompt": logschema.prompt_as_messages(g["prompt"], g["messages"]),
                     "completion": g["completion"], "model_version": g["model_version"],
                     "prompt_fingerprint": g["prompt_fingerprint"],
                     "generated_at": g["created_at"]})
    rows.sort(key=lambda r: (r["generated_at"], r["response_id"]))
    return rows[:limit] if limit else rows


def summary_by_model_version(table: pa.Table) -> list[dict[str, Any]]:
    """Count and mean score per (rm_version, model_version), for the command's report."""
    if table.num_rows == 0:
        return []
    grouped = table.group_by(["rm_version", "model_version"], use_threads=False).aggregate(
        [("score", "count"), ("score", "mean")])
    out = [{"rm_version": r["rm_version"], "model_version": r["model_version"],
            "count": r["score_count"], "mean_score": r["score_mean"]}
           for r in grouped.to_pylist()]
    return sorted(out, key=lambda r: (r["rm_version"], str(r["model_version"])))
