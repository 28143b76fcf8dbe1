"""The versioned Arrow schemas of the preference log, and how its files are laid out on disk.

Two tables live under a server's `--data-dir`, each a hive-partitioned Parquet dataset:

    <data-dir>/generations/date=YYYY-MM-DD/part-<segment id>.parquet   one row per completion served
    <data-dir>/feedback/date=YYYY-MM-DD/part-<segment id>.parquet      one row per accepted submission
    <data-dir>/wal/<segment id>.wal                                    not yet compacted (server/feedback/wal.py)

Replicas (`serve --replica ID`, docs/scaling.md) share the data root: each writes its parts into
the same table directories under its own names, `part-<replica>-<segment id>.parquet`, and keeps
its WAL and lock in `<data-dir>/replicas/<replica>/` — so the tables stay one hive-partitioned
dataset (DuckDB: `read_parquet('<data-dir>/feedback/*/*.parquet', hive_partitioning = true)`)
and no file is written by two processes.

`docs/logging.md` documents every field. This module is what readers import (align reads the log
through `server/feedback/export.py`, which builds on it): the schemas, `open_dataset`, the prompt
fingerprint that decides "same prompt", and `normalize_generation`, the one place a generation row
dict is checked and shaped for the log. It has no I/O besides opening datasets.

Versioning: `SCHEMA_VERSION` is stored in every row (`schema_version`) and in the Parquet key-value
metadata (`prefloop.schema`). Adding a nullable column is a minor change (readers that pass an
older schema simply do not see it); renaming or retyping a column bumps the version.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.dataset as ds

SCHEMA_VERSION = 1
GENERATIONS = "generations"
FEEDBACK = "feedback"
TABLES = (GENERATIONS, FEEDBACK)
WAL_DIR = "wal"

KIND_PREFERENCE = "preference"
KIND_RATING = "rating"
SCALE_THUMBS = "thumbs"  # score -1 or +1
SCALE_STARS = "stars"  # score 1..5

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
TIMESTAMP = pa.timestamp("us", tz="UTC")

SAMPLING = pa.struct([
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("top_k", pa.int32()),
    ("max_tokens", pa.int32()),
    ("stop", pa.list_(pa.string())),
    ("seed", pa.int64()),
    ("n", pa.int32()),
    ("repetition_penalty", pa.float64()),
    # added 2026-12-08 (a minor change: older parts read them as null)
    ("frequency_penalty", pa.float64()),
    ("presence_penalty", pa.float64()),
])
SAMPLING_FIELDS = tuple(f.name for f in SAMPLING)


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"prefloop.schema": f"{name}/{SCHEMA_VERSION}".encode()})


GENERATIONS_SCHEMA = _schema(GENERATIONS, [
    pa.field("response_id", pa.string(), nullable=False),
    pa.field("request_id", pa.string()),
    pa.field("created_at", TIMESTAMP, nullable=False),
    pa.field("session_id", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("prompt", pa.string()),  # raw-prompt requests; null for chat requests
    pa.field("messages", MESSAGES),  # chat requests; null for raw-prompt requests
    pa.field("prompt_fingerprint", pa.string(), nullable=False),
    pa.field("completion", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("stop_reason", pa.string()),  # the request's stop string that ended it (null: none)
    # the output constraint: "json_object" or "json_schema:<sha256 of the schema, 16 hex>" (null: text)
    pa.field("response_format", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("sampling", SAMPLING),
    pa.field("latency_ms", pa.float64()),
    pa.field("ttft_ms", pa.float64()),
    pa.field("source", pa.string()),  # the API that served it: "grpc" | "http" (null: older rows)
    pa.field("schema_version", pa.int16(), nullable=False),
])

FEEDBACK_SCHEMA = _schema(FEEDBACK, [
    pa.field("feedback_id", pa.string(), nullable=False),
    pa.field("created_at", TIMESTAMP, nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # "preference" | "rating"
    pa.field("user_id", pa.string()),
    pa.field("session_id", pa.string()),
    pa.field("idempotency_key", pa.string()),
    # preference by reference: two completions this server produced for the same prompt
    pa.field("chosen_response_id", pa.string()),
    pa.field("rejected_response_id", pa.string()),
    # explicit preference: the conversation plus two answer texts
    pa.field("prompt_messages", MESSAGES),
    pa.field("chosen_text", pa.string()),
    pa.field("rejected_text", pa.string()),
    # rating
    pa.field("response_id", pa.string()),
    pa.field("score", pa.int8()),
    pa.field("scale", pa.string()),  # "thumbs" | "stars"
    pa.field("comment", pa.string()),
    # [chosen, rejected] for preferences by reference, [rated] for ratings, [] for explicit ones
    pa.field("model_versions", pa.list_(pa.string())),
    pa.field("prompt_fingerprint", pa.string()),
    pa.field("schema_version", pa.int16(), nullable=False),
])

SCHEMAS: dict[str, pa.Schema] = {GENERATIONS: GENERATIONS_SCHEMA, FEEDBACK: FEEDBACK_SCHEMA}
PRIMARY_KEY: dict[str, str] = {GENERATIONS: "response_id", FEEDBACK: "feedback_id"}
PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


# ---------------------------------------------------------------------------------------------
# Layout


REPLICAS_DIR = "replicas"
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_replica_id(replica: str) -> str:
    """`replica` if it can name a replica's files, else ValueError saying what may."""
    if not isinstance(replica, str) or not REPLICA_ID.fullmatch(replica):
        raise ValueError(f"replica id {replica!r} must be 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return replica


def log_dir(data_dir: str | Path, replica: str | None = None) -> Path:
    """Where one log keeps what is its own (its WAL directory and its lock): the data dir for a
    server alone, `<data-dir>/replicas/<replica>` for a replica."""
    return Path(data_dir) if replica is None else Path(data_dir) / REPLICAS_DIR / replica


def wal_dirs(data_dir: str | Path) -> list[tuple[str | None, Path]]:
    """(replica or None, WAL directory) of every log on the data root, the lone server's first."""
    root = Path(data_dir)
    found: list[tuple[str | None, Path]] = [(None, root / WAL_DIR)]
    replicas = root / REPLICAS_DIR
    if replicas.is_dir():
        found += [(p.name, p / WAL_DIR) for p in sorted(replicas.iterdir())
                  if p.is_dir() and REPLICA_ID.fullmatch(p.name)]
    return found


def part_name(segment_id: int, replica: str | None = None) -> str:
    """Parquet part written from WAL segment `segment_id` (of `replica`): re-compacting it
    overwrites the same name."""
    if replica is None:
        return f"part-{segment_id:012d}.parquet"
    return f"part-{replica}-{segment_id:012d}.parquet"


def part_owner(name: str) -> tuple[str | None, int] | None:
    """(replica or None, segment id) of a part's file name; None when it is not a part."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    stem = name[len("part-"):-len(".parquet")]
    if stem.isdigit():
        return None, int(stem)
    replica, _, segment = stem.rpartition("-")
    if segment.isdigit() and REPLICA_ID.fullmatch(replica):
        return replica, int(segment)
    return None


def segment_id_of_part(name: str, replica: str | None = None) -> int | None:
    """The segment id of a part `replica` wrote (None for anyone else's, or not a part)."""
    owner = part_owner(name)
    return owner[1] if owner is not None and owner[0] == replica else None


def partition_dir(data_dir: Path, table: str, date: str) -> Path:
    return Path(data_dir) / table / f"date={date}"


def date_of_micros(created_at_us: int) -> str:
    """The UTC date partition ("YYYY-MM-DD") of a created_at in microseconds since the epoch."""
    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=created_at_us)).strftime("%Y-%m-%d")


def part_files(data_dir: Path, table: str) -> list[Path]:
    """Every committed part of `table` (temp files start with "." and are never listed)."""
    root = Path(data_dir) / table
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("date=*/part-*.parquet") if p.is_file())


def open_dataset(data_dir: str | Path, table: str, files: list[Path] | None = None) -> ds.Dataset:
    """The committed Parquet parts of `table` (of every replica) as one dataset, with a string
    `date` column; `files`: just these parts.

    Works on an empty or missing directory (zero rows). Same as
    `ds.dataset(f"{data_dir}/{table}", partitioning="hive")` with the schema pinned.
    """
    schema = SCHEMAS[table].append(pa.field("date", pa.string()))
    files = [str(p) for p in (part_files(Path(data_dir), table) if files is None else files)]
    if not files:
        return ds.dataset(pa.table({f.name: pa.array([], f.type) for f in schema}, schema=schema))
    return ds.dataset(files, schema=schema, format="parquet", partitioning=PARTITIONING,
                      partition_base_dir=str(Path(data_dir) / table))


# ---------------------------------------------------------------------------------------------
# Rows


def now_micros() -> int:
    return int(dt.datetime.now(dt.timezone.utc).timestamp() * 1_000_000)


def to_micros(value: Any) -> int:
    """created_at as microseconds since the epoch (UTC); naive datetimes are taken as UTC."""
    if value is None:
        return now_micros()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return delta // dt.timedelta(microseconds=1)
    if isinstance(value, (int, float)):  # seconds since the epoch
        return int(value * 1_000_000)
    raise TypeError(f"created_at must be a datetime, got {type(value).__name__}")


def canonical_messages(messages: Iterable[Any] | None) -> list[dict[str, str]] | None:
    """[{role, content}] from dicts or objects with .role/.content (e.g. proto messages)."""
    if messages is None:
        return None
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            role, content = getattr(m, "role", None), getattr(m, "content", None)
        out.append({"role": "" if role is None else str(role),
                    "content": "" if content is None else str(content)})
    return out


def prompt_fingerprint(prompt: str | None, messages: list[dict[str, str]] | None) -> str:
    """Identity of a prompt: two completions answer "the same prompt" iff their fingerprints match.

    Chat prompts hash the (role, content) list exactly; raw prompts hash the text. The two forms
    never collide (different prefixes). 32 hex chars of BLAKE2b.
    """
    if messages is not None:
        body = "m" + json.dumps([[m["role"], m["content"]] for m in messages],
                                ensure_ascii=False, separators=(",", ":"))
    else:
        body = "p" + (prompt or "")
    return hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def prompt_as_messages(prompt: str | None, messages: list[dict[str, str]] | None
                       ) -> list[dict[str, str]]:
    """The prompt as chat messages (a raw prompt becomes one user message)."""
    if messages is not None:
        return messages
    return [{"role": "user", "content": prompt or ""}]


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def normalize_sampling(sampling: Any) -> dict[str, Any] | None:
    """The sampling struct from a dict or a `SamplingParams`-like object (missing fields are null)."""
    if sampling is None:
        return None
    get = sampling.get if isinstance(sampling, Mapping) else (lambda k: getattr(sampling, k, None))
    stop = get("stop")
    return {
        "temperature": _opt_float(get("temperature")),
        "top_p": _opt_float(get("top_p")),
        "top_k": _opt_int(get("top_k")),
        "max_tokens": _opt_int(get("max_tokens")),
        "stop": None if stop is None else [str(s) for s in stop],
        "seed": _opt_int(get("seed")),
        "n": _opt_int(get("n")),
        "repetition_penalty": _opt_float(get("repetition_penalty")),
        "frequency_penalty": _opt_float(get("frequency_penalty")),
        "presence_penalty": _opt_float(get("presence_penalty")),
    }


@dataclass(slots=True)
class GenerationRecord:
    """One served completion, as the API layer hands it to the log (`FeedbackStore.record_generation`).

    `prompt` is set for raw-prompt requests, `messages` ([{role, content}]) for chat requests;
    `sampling` is the dict of the SamplingParams used; latencies are from the request's start.
    """

    response_id: str
    request_id: str
    created_at: dt.datetime  # UTC
    session_id: str
    user_id: str
    model_version: str
    backend: str
    prompt: str | None
    messages: list[dict] | None
    completion: str
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    sampling: dict
    latency_ms: float | None
    ttft_ms: float | None
    source: str = "grpc"  # which API served it: "grpc" | "http"
    stop_reason: str | None = None  # with finish_reason "stop": the stop string that ended it
    response_format: str | None = None  # the constraint's key (ResponseFormat.key); None: text


def normalize_generation(row: GenerationRecord | Mapping[str, Any]) -> dict[str, Any]:
    """A generation record (or row dict) → the JSON-safe WAL/Parquet row (created_at in epoch
    microseconds).

    Raises ValueError/TypeError on a malformed row (missing response_id, bad types).
    """
    if isinstance(row, GenerationRecord):
        row = {name: getattr(row, name) for name in GenerationRecord.__slots__}
    response_id = row.get("response_id")
    if not response_id:
        raise ValueError("a generation row needs a non-empty response_id")
    messages = canonical_messages(row.get("messages"))
    prompt = _opt_str(row.get("prompt"))
    return {
        "response_id": str(response_id),
        "request_id": _opt_str(row.get("request_id")),
        "created_at": to_micros(row.get("created_at")),
        "session_id": _opt_str(row.get("session_id")),
        "user_id": _opt_str(row.get("user_id")),
        "model_version": _opt_str(row.get("model_version")),
        "backend": _opt_str(row.get("backend")),
        "prompt": prompt,
        "messages": messages,
        "prompt_fingerprint": prompt_fingerprint(prompt, messages),
        "completion": _opt_str(row.get("completion")),
        "finish_reason": _opt_str(row.get("finish_reason")),
        "stop_reason": _opt_str(row.get("stop_reason")),
        "response_format": _opt_str(row.get("response_format")),
        "prompt_tokens": _opt_int(row.get("prompt_tokens")),
        "completion_tokens": _opt_int(row.get("completion_tokens")),
        "sampling": normalize_sampling(row.get("sampling")),
        "latency_ms": _opt_float(row.get("latency_ms")),
        "ttft_ms": _opt_float(row.get("ttft_ms")),
        "source": _opt_str(row.get("source")),
        "schema_version": SCHEMA_VERSION,
    }


def rows_to_table(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Normalized rows (created_at in epoch microseconds) → an Arrow table of `table`'s schema."""
    return pa.Table.from_pylist(rows, schema=SCHEMAS[table])  # keys outside the schema are ignored


# ---------------------------------------------------------------------------------------------
# WAL records: one JSON object per record, the row plus "t" naming its table

_TAG_OF = {GENERATIONS: "g", FEEDBACK: "f"}
_TABLE_OF = {tag: table for table, tag in _TAG_OF.items()}


def encode_record(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """The WAL record of a normalized row (the row dict itself, tagged in place with its table)."""
    row["t"] = _TAG_OF[table]
    return row


def record_bytes(record: dict[str, Any]) -> bytes:
    # lone surrogates (possible only from Python callers, never from gRPC) become "?"
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def decode_record(payload: bytes) -> tuple[str, dict[str, Any]]:
    """(table, row) of a WAL payload written by `record_bytes(encode_record(...))`."""
    row = json.loads(payload)
    return _TABLE_OF[row.pop("t")], row
