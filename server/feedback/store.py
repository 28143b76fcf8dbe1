"""FeedbackStore: the domain API of the preference log — generation rows in, feedback validated,
made durable, and answered with (feedback_id, duplicate).

    store = FeedbackStore(StoreConfig(data_dir="data"))
    store.record_generation(row)                       # request path: never blocks, never raises
    ack = await store.asubmit_rating(response_id=..., score=+1, idempotency_key=...)
    ack.feedback_id, ack.duplicate                     # OK means fsync'd (WAL, group commit)
    store.close()                                      # commits, compacts everything to Parquet

What it owns:
- validation of submissions (typed errors from `server/errors.py`, messages naming the limit);
- the response-id index (response_id → prompt fingerprint, model version) and the idempotency
  index (key → feedback_id), both rebuilt on start from the Parquet parts plus the WAL segments
  not yet compacted, so ids from earlier runs stay valid and retried keys stay duplicates;
- recovery on start (temp files removed, old segments replayed and queued for compaction,
  new segment ids beyond every id ever used, damaged Parquet parts and segments without magic
  quarantined — integrity.py) and an exclusive lock on the data directory;
- the rate limits of votes per voter and per caller (`vote_rate.py`; off unless
  `votes_per_minute` / `caller_votes_per_minute` are set; `serve` sets both);
- replicas (`replica`, docs/scaling.md): several servers on one data root, each with its own
  WAL, parts and lock (schema.py's layout); each follows the others' logs (peers.py) so a vote
  on an answer any replica served is accepted (after waiting up to `peer_wait_s` for that
  answer's row to reach the disk). Idempotency keys are checked against this log only: a vote
  retried on another replica is logged there too, and readers keep one row per key;
- degraded mode: when the data directory cannot be used, submissions fail with `Unavailable`
  (with the reason) and generation records are dropped with a warning; serving is unaffected.
  Opening is retried at most every `reopen_interval_s` on the next submission.

Generation rows are appended to the WAL without waiting: they are fsync'd with the next batch, at
most `wal.linger_s` (50 ms) later, and always before any feedback that refers to them (one
ordered log), so an acknowledged rating never points at a response lost in a crash.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from prefloop.server.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from prefloop.server.feedback import integrity
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.compactor import Compactor, makedirs_durable, remove_temp_files
from prefloop.server.feedback.peers import PeerLogs
from prefloop.server.feedback.vote_rate import ANONYMOUS, VoteRateLimiter, voter_of
from prefloop.server.feedback.wal import WalConfig, WriteAheadLog, list_segments, read_segment

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass(slots=True)
class StoreConfig:
    data_dir: Path
    wal: WalConfig = field(default_factory=WalConfig)
    max_text_chars: int = 32_768  # chosen_text, rejected_text, each message's content
    max_comment_chars: int = 4_096
    max_messages: int = 256  # prompt_messages entries
    max_id_chars: int = 256  # response ids, idempotency keys, user and session ids
    reopen_interval_s: float = 5.0  # after a failed open, retry no more often than this
    compact_retry_s: float = 5.0
    votes_per_minute: float = 0.0  # per voter (vote_rate.py); 0: no limit (`serve` sets one)
    caller_votes_per_minute: float = 0.0  # per caller (token), all its voters together
    replica: str | None = None  # this server's replica id on a shared data root; None: alone
    peer_poll_s: float = 0.1  # how often a replica reads what the other replicas' logs gained
    peer_wait_s: float = 2.0  # how long a replica waits for an unknown response id to appear

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.replica is not None:
            logschema.check_replica_id(self.replica)
        if self.peer_poll_s <= 0 or self.peer_wait_s < 0:
            raise ValueError("peer_poll_s must be > 0 and peer_wait_s >= 0")
        for name in ("max_text_chars", "max_comment_chars", "max_messages", "max_id_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Ack(NamedTuple):
    feedback_id: str
    duplicate: bool


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class _RateLimitedLog:
    """At most one log line per `interval_s` per key; counts what it suppressed."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        log.warning(msg + (f" ({suppressed} more suppressed)" if suppressed else ""), *args)


class FeedbackStore:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.replica = config.replica
        self.log_dir = logschema.log_dir(config.data_dir, config.replica)  # WAL and lock
        self._peers = PeerLogs(config.data_dir, config.replica)
        self._peer_lock = threading.Lock()
        self._peer_stop = threading.Event()
        self._peer_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # idempotency state
        self._open_lock = threading.Lock()
        self._responses: dict[str, tuple[str, str | None]] = {}
        self._keys: dict[str, str] = {}  # idempotency_key → feedback_id (durable)
        self._inflight: dict[str, tuple[str, Future]] = {}  # key → (feedback_id, WAL future)
        self._versions: dict[str | None, str | None] = {}  # interned model versions
        self._wal: WriteAheadLog | None = None
        self._compactor: Compactor | None = None
        self._lock_fd: int | None = None
        self._unavailable = "the feedback log is not open"
        self._last_open_attempt = -1e9
        self._closed = False
        self._rl = _RateLimitedLog()
        self.vote_rate = VoteRateLimiter(config.votes_per_minute)
        self.caller_vote_rate = VoteRateLimiter(config.caller_votes_per_minute)
        self._open()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._wal is not None and self._wal.broken is None

    @property
    def unavailable_reason(self) -> str | None:
        if self._wal is None:
            return self._unavailable
        return self._wal.broken

    @property
    def wal(self) -> WriteAheadLog | None:
        return self._wal

    def health(self) -> dict[str, Any]:
        """What /health and /metrics say about the log: `status` "ok" or "unavailable" (cannot
        open, broken, or its last write failed, e.g. a full disk: it turns "ok" with the next
        write that commits — a generation row of any chat, or a vote), `reason`, the free bytes
        of its filesystem, the rows waiting for the disk and the failed writes so far."""
        wal = self._wal
        reason = self.unavailable_reason or (wal.last_failure if wal is not None else None)
        try:
            st = os.statvfs(self.data_dir)
            free: int | None = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        return {"status": "ok" if reason is None else "unavailable", "reason": reason,
                "free_bytes": free, "pending_rows": wal.pending if wal is not None else 0,
                "write_failures": wal.stats.failures if wal is not None else 0}

    @property
    def compactor(self) -> Compactor | None:
        return self._compactor

    def close(self, timeout: float | None = 60.0, *, compact: bool = True) -> None:
        """Commit pending records, compact every segment into Parquet (unless `compact` is
        False: then the next start does), release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._peer_stop.set()
        if self._peer_thread is not None:
            self._peer_thread.join(timeout)
        if self._compactor is not None and not compact:
            self._compactor.close(drain=False, timeout=timeout)  # before the WAL hands it more
        if self._wal is not None:
            self._wal.close(timeout)
        if self._compactor is not None and compact:
            self._compactor.close(drain=True, timeout=timeout)
        self._release_lock()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self, timeout: float | None = 60.0) -> None:
        """Close the active segment and compact everything now (tests, tools)."""
        if self._wal is None:
            return
        closed_below = self._wal.rotate().result(timeout)
        compactor = self._compactor
        assert compactor is not None
        for segment_id, path in list_segments(self._wal.directory):
            if segment_id < closed_below:  # never the segment a writer may have opened since
                compactor.compact(segment_id, path)

    def _open(self) -> None:
        self._last_open_attempt = time.monotonic()
        try:
            self._recover()
        except Exception as exc:  # an unusable directory must not stop the server
            self._release_lock()
            if isinstance(exc, Unavailable):
                self._unavailable = str(exc)
            else:
                if isinstance(exc, OSError) and exc.strerror:
                    what = exc.strerror + (f" ({errno.errorcode[exc.errno]})"
                                           if exc.errno in errno.errorcode else "")
                else:  # e.g. an unreadable Parquet part
                    what = f"{type(exc).__name__}: {exc}"
                self._unavailable = (f"the feedback log cannot use data directory "
                                     f"{self.data_dir}: {what}")
            log.error("%s; feedback submissions fail with UNAVAILABLE and generation rows are "
                      "not logged until it is fixed (retried every %.0f s)", self._unavailable,
                      self.config.reopen_interval_s)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        path = self.log_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Unavailable(f"the feedback log in {self.log_dir} is in use by another "
                              f"process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _recover(self) -> None:
        t0 = time.perf_counter()
        wal_dir = self.log_dir / logschema.WAL_DIR
        makedirs_durable(wal_dir)
        self._take_lock()
        remove_temp_files(self.data_dir, self.replica)
        max_id = self._index_parquet()
        segments = list_segments(wal_dir)
        replayed = 0
        for segment_id, path in list(segments):
            contents = read_segment(path)
            if integrity.lacks_magic(path, contents):
                target = integrity.quarantine(self.data_dir, path, "WAL segment without its magic")
                log.error("WAL segment %s has no magic (not a segment, or overwritten): "
                          "quarantined as %s", path, target)
                segments.remove((segment_id, path))
                max_id = max(max_id, segment_id)  # its id is never used again
                continue
            if contents.torn_bytes:
                log.warning("WAL segment %s: ignoring %d bytes after its last intact record "
                            "(a write cut off by a crash)", path, contents.torn_bytes)
            for payload in contents.records:
                self._index_row(*logschema.decode_record(payload))
                replayed += 1
            max_id = max(max_id, segment_id)
        peer_rows = self.poll_peers()
        compactor = Compactor(self.data_dir, retry_interval_s=self.config.compact_retry_s,
                              replica=self.replica)
        wal = WriteAheadLog(wal_dir, self.config.wal, encode=logschema.record_bytes,
                            on_segment_closed=compactor.submit)
        compactor.start()
        for segment_id, path in segments:
            compactor.submit(segment_id, path)
        wal.start(next_segment_id=max_id + 1)
        self._compactor, self._wal = compactor, wal
        if self._peer_thread is None:  # cheap while no other log shares the root
            self._peer_thread = threading.Thread(target=self._follow_peers, daemon=True,
                                                 name="prefloop-peer-logs")
            self._peer_thread.start()
        log.info("feedback log %s%s: %d responses, %d feedback keys indexed; %d WAL records "
                 "replayed from %d segments, %d rows of other replicas' logs (%.2f s)",
                 self.data_dir, f" (replica {self.replica})" if self.replica else "",
                 len(self._responses), len(self._keys), replayed, len(segments), peer_rows,
                 time.perf_counter() - t0)

    @property
    def follows_peers(self) -> bool:
        """Whether other logs share the data root now (this is a replica, or replicas log beside
        this lone server): then a vote naming an unknown response id waits for their logs."""
        return self.replica is not None or len(logschema.wal_dirs(self.data_dir)) > 1

    def poll_peers(self) -> int:
        """Index what the other logs on the data root gained (peers.py); how many rows."""
        if not self.follows_peers:  # alone on the root: one stat
            return 0
        with self._peer_lock:
            try:
                rows = self._peers.poll()
            except Exception as exc:  # noqa: BLE001 - e.g. a network filesystem hiccup
                self._rl.warning("peers", "reading the other replicas' logs failed: %s", exc)
                return 0
            for table, row in rows:
                self._index_row(table, row)
            return len(rows)

    def _follow_peers(self) -> None:
        while not self._peer_stop.wait(self.config.peer_poll_s):
            self.poll_peers()

    def _index_parquet(self) -> int:
        """Load both indexes from the committed parts; returns the largest part segment id.

        When a part cannot be read (cut short by a power cut, garbage), every part is probed and
        the damaged ones are quarantined (integrity.py) before reading again: the server starts
        with every good row, and `prefloop logs check` reports what was moved."""
        try:
            return self._read_indexes()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
            first_error = exc
        self._responses.clear()
        self._keys.clear()
        moved, skipped = 0, set()
        for table in logschema.TABLES:
            for path in logschema.part_files(self.data_dir, table):
                _, error = integrity.probe_part(path, table)
                if error is None:
                    continue
                owner = logschema.part_owner(path.name)
                if owner is not None and owner[0] != self.replica:
                    log.error("feedback log: %s of replica %s is unreadable (%s); skipped here, "
                              "its replica quarantines it when it starts", path,
                              owner[0] or "(alone)", error)
                    skipped.add(path)
                    continue
                target = integrity.quarantine(self.data_dir, path,
                                              f"unreadable Parquet part: {error}")
                log.error("feedback log: quarantined %s (%s) as %s; its rows are not in "
                          "the log", path, error, target)
                moved += 1
        if not moved and not skipped:
            raise first_error
        return self._read_indexes(skipped)

    def _read_indexes(self, skip: set[Path] = frozenset()) -> int:
        """Index every part on the data root (every replica's); the largest segment id of this
        log's own parts."""
        max_id = -1
        files = {t: [p for p in logschema.part_files(self.data_dir, t) if p not in skip]
                 for t in logschema.TABLES}
        for table in logschema.TABLES:
            for p in files[table]:
                max_id = max(max_id, logschema.segment_id_of_part(p.name, self.replica) or 0)
        self._peers.mark_parts_seen([*files[logschema.GENERATIONS], *files[logschema.FEEDBACK],
                                     *skip])
        gen = logschema.open_dataset(self.data_dir, logschema.GENERATIONS,
                                     files[logschema.GENERATIONS]).to_table(
            columns=["response_id", "prompt_fingerprint", "model_version"])
        for rid, fp, mv in zip(*(gen.column(i).to_pylist() for i in range(3))):
            self._responses[rid] = (fp, self._intern(mv))
        fb = logschema.open_dataset(self.data_dir, logschema.FEEDBACK,
                                    files[logschema.FEEDBACK]).to_table(
            columns=["idempotency_key", "feedback_id"])
        for key, fid in zip(fb.column(0).to_pylist(), fb.column(1).to_pylist()):
            if key:
                self._keys.setdefault(key, fid)
        return max_id

    def _index_row(self, table: str, row: dict[str, Any]) -> None:
        if table == logschema.GENERATIONS:
            self._responses[row["response_id"]] = (row["prompt_fingerprint"],
                                                   self._intern(row.get("model_version")))
        elif row.get("idempotency_key"):
            self._keys.setdefault(row["idempotency_key"], row["feedback_id"])

    def _intern(self, version: str | None) -> str | None:
        return self._versions.setdefault(version, version)

    def _require_wal(self) -> WriteAheadLog:
        wal = self._wal
        if wal is None:
            if self._closed:
                raise Unavailable("the feedback log is closed")
            if time.monotonic() - self._last_open_attempt >= self.config.reopen_interval_s:
                with self._open_lock:
                    if self._wal is None:
                        self._open()
            wal = self._wal
            if wal is None:
                raise Unavailable(self._unavailable)
        return wal

    # -- generation rows (request path) ---------------------------------------------------------

    def record_generation(self, row: logschema.GenerationRecord | Mapping[str, Any]) -> bool:
        """Log one served completion; never raises, never waits. False when it was not logged.

        `row` is a `GenerationRecord` (what the API layer sends) or a dict with its field names.
        """
        try:
            wal = self._wal
            if wal is None:
                self._rl.warning("gen-unavailable", "generation row not logged: %s",
                                 self._unavailable)
                return False
            rec = logschema.normalize_generation(row)
            if not wal.append_background(logschema.encode_record(logschema.GENERATIONS, rec)):
                self._rl.warning("gen-refused", "generation row not logged: %s",
                                 wal.refusal_reason())
                return False
            # indexed after it is queued: feedback naming it is always logged after it
            self._responses[rec["response_id"]] = (rec["prompt_fingerprint"],
                                                   self._intern(rec["model_version"]))
            return True
        except Exception:
            log.exception("generation row not logged")
            return False

    def knows_response(self, response_id: str) -> bool:
        return response_id in self._responses

    # -- feedback -------------------------------------------------------------------------------

    def submit_preference(self, **kwargs: Any) -> Ack:
        """See `begin_preference`; blocks until the row is durable."""
        ack, future = self.begin_preference(**kwargs)
        future.result()
        return ack

    def submit_rating(self, **kwargs: Any) -> Ack:
        """See `begin_rating`; blocks until the row is durable."""
        ack, future = self.begin_rating(**kwargs)
        future.result()
        return ack

    async def asubmit_preference(self, **kwargs: Any) -> Ack:
        return await self._asubmit(self.begin_preference, kwargs)

    async def asubmit_rating(self, **kwargs: Any) -> Ack:
        return await self._asubmit(self.begin_rating, kwargs)

    async def _asubmit(self, begin, kwargs: dict[str, Any]) -> Ack:
        """`begin(**kwargs)`, awaiting durability. A replica that does not know a response id
        yet waits up to `peer_wait_s` for another replica's row of it before refusing."""
        deadline = None
        while True:
            try:
                ack, future = begin(**kwargs)
                break
            except NotFound:
                if deadline is None and not self.follows_peers:
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.config.peer_wait_s
                if now >= deadline:
                    raise
                await asyncio.sleep(min(self.config.peer_poll_s, deadline - now))
        if not future.done():
            await asyncio.wrap_future(future)
        future.result()
        return ack

    def begin_preference(self, *, chosen_response_id: str | None = None,
                         rejected_response_id: str | None = None,
                         prompt_messages: Iterable[Any] | None = None,
                         chosen_text: str | None = None, rejected_text: str | None = None,
                         comment: str | None = None, idempotency_key: str | None = None,
                         user_id: str | None = None, session_id: str | None = None,
                         caller: str | None = None) -> tuple[Ack, Future]:
        """Validate and queue a preference; returns the ack and a Future done once it is durable.

        Either `chosen_response_id` + `rejected_response_id` (two completions this server
        produced for the same prompt), or `prompt_messages` + `chosen_text` + `rejected_text`.
        `caller` names who sent it, for the rate limits (`vote_rate.caller_of_token`: a
        fingerprint of the bearer token); it is not logged.
        """
        wal = self._require_wal()  # first: without the log, the indexes may be incomplete
        messages = logschema.canonical_messages(prompt_messages) or None
        by_id = bool(chosen_response_id or rejected_response_id)
        explicit = bool(messages or chosen_text or rejected_text)
        if by_id and explicit:
            raise InvalidArgument("give either chosen_response_id + rejected_response_id, or "
                                  "prompt_messages + chosen_text + rejected_text, not both")
        if not by_id and not explicit:
            raise InvalidArgument("a preference needs chosen_response_id + rejected_response_id, "
                                  "or prompt_messages + chosen_text + rejected_text")
        row = self._common_fields(logschema.KIND_PREFERENCE, comment, idempotency_key, user_id,
                                  session_id)
        if by_id:
            chosen = self._response("chosen_response_id", chosen_response_id)
            rejected = self._response("rejected_response_id", rejected_response_id)
            if chosen_response_id == rejected_response_id:
                raise InvalidArgument("chosen_response_id and rejected_response_id are the same "
                                      f"response ({chosen_response_id!r})")
            if chosen[0] != rejected[0]:
                raise InvalidArgument(
                    f"responses {chosen_response_id!r} and {rejected_response_id!r} answer "
                    "different prompts; a preference compares two answers to the same prompt")
            row.update(chosen_response_id=chosen_response_id,
                       rejected_response_id=rejected_response_id, prompt_fingerprint=chosen[0],
                       model_versions=[chosen[1], rejected[1]])
        else:
            if not messages:
                raise InvalidArgument("prompt_messages is empty; an explicit preference needs "
                                      "the conversation it answers")
            self._check_messages(messages)
            chosen_text = self._check_text("chosen_text", chosen_text)
            rejected_text = self._check_text("rejected_text", rejected_text)
            if chosen_text == rejected_text:
                raise InvalidArgument("chosen_text and rejected_text are identical")
            row.update(prompt_messages=messages, chosen_text=chosen_text,
                       rejected_text=rejected_text, model_versions=[],
                       prompt_fingerprint=logschema.prompt_fingerprint(None, messages))
        return self._submit(wal, row, caller)

    def begin_rating(self, *, response_id: str, score: int, scale: str | None = None,
                     comment: str | None = None, idempotency_key: str | None = None,
                     user_id: str | None = None, session_id: str | None = None,
                     caller: str | None = None) -> tuple[Ack, Future]:
        """Validate and queue a rating of one response: thumbs (-1/+1) or stars (1..5).

        `scale` is "thumbs" or "stars"; unset, -1 and +1 mean thumbs and 2..5 mean stars (one
        star therefore needs scale="stars").
        """
        wal = self._require_wal()
        if isinstance(score, bool) or not isinstance(score, int):
            raise InvalidArgument(f"score must be an integer, got {score!r}")
        if scale in (None, ""):
            if score not in (-1, 1, 2, 3, 4, 5):
                raise InvalidArgument(f"score must be -1 or +1 (thumbs) or 1..5 (stars), "
                                      f"got {score}")
            scale = logschema.SCALE_THUMBS if score in (-1, 1) else logschema.SCALE_STARS
        if scale == logschema.SCALE_THUMBS:
            if score not in (-1, 1):
                raise InvalidArgument(f"a thumbs score must be -1 or +1, got {score}")
        elif scale == logschema.SCALE_STARS:
            if not 1 <= score <= 5:
                raise InvalidArgument(f"a star score must be in 1..5, got {score}")
        else:
            raise InvalidArgument(f"scale must be 'thumbs' or 'stars', got {scale!r}")
        fingerprint, version = self._response("response_id", response_id)
        row = self._common_fields(logschema.KIND_RATING, comment, idempotency_key, user_id,
                                  session_id)
        row.update(response_id=response_id, score=score, scale=scale,
                   prompt_fingerprint=fingerprint, model_versions=[version])
        return self._submit(wal, row, caller)

    # -- validation helpers ----------------------------------------------------------------------

    def _check_id(self, name: str, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
        if len(value) > self.config.max_id_chars:
            raise InvalidArgument(f"{name} is {len(value)} characters; the limit is "
                                  f"{self.config.max_id_chars} (max_id_chars)")
        return value

    def _check_text(self, name: str, value: str | None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(f"{name} is empty")
        if len(value) > self.config.max_text_chars:
            raise InvalidArgument(f"{name} is {len(value)} characters; the limit is "
                                  f"{self.config.max_text_chars} (max_text_chars)")
        return value

    def _check_messages(self, messages: list[dict[str, str]]) -> None:
        limit = self.config.max_messages
        if len(messages) > limit:
            raise InvalidArgument(f"prompt_messages has {len(messages)} messages; the limit is "
                                  f"{limit} (max_messages)")
        for i, m in enumerate(messages):
            if m["role"] not in MESSAGE_ROLES:
                raise InvalidArgument(f"prompt_messages[{i}].role must be one of "
                                      f"{', '.join(MESSAGE_ROLES)}, got {m['role']!r}")
            if len(m["content"]) > self.config.max_text_chars:
                raise InvalidArgument(
                    f"prompt_messages[{i}].content is {len(m['content'])} characters; the limit "
                    f"is {self.config.max_text_chars} (max_text_chars)")

    def _response(self, name: str, response_id: str | None) -> tuple[str, str | None]:
        if not response_id:
            raise InvalidArgument(f"{name} is empty")
        self._check_id(name, response_id)
        found = self._responses.get(response_id)
        if found is None:
            served_by = ("this server" if self.replica is None and len(
                logschema.wal_dirs(self.data_dir)) == 1 else
                f"any replica on {self.data_dir} (waited {self.config.peer_wait_s:g} s)")
            raise NotFound(f"{name} {response_id!r}: no response with this id was served by "
                           f"{served_by} (or its log was lost)")
        return found

    def _common_fields(self, kind: str, comment: str | None, idempotency_key: str | None,
                       user_id: str | None, session_id: str | None) -> dict[str, Any]:
        if comment is not None and not isinstance(comment, str):
            raise InvalidArgument(f"comment must be a string, got {type(comment).__name__}")
        if comment and len(comment) > self.config.max_comment_chars:
            raise InvalidArgument(f"comment is {len(comment)} characters; the limit is "
                                  f"{self.config.max_comment_chars} (max_comment_chars)")
        return {
            "created_at": logschema.now_micros(),
            "kind": kind,
            "user_id": self._check_id("user_id", user_id),
            "session_id": self._check_id("session_id", session_id),
            "idempotency_key": self._check_id("idempotency_key", idempotency_key),
            "comment": comment or None,
            "schema_version": logschema.SCHEMA_VERSION,
        }

    # -- the durable part ------------------------------------------------------------------------

    def _submit(self, wal: WriteAheadLog, row: dict[str, Any], caller: str | None
                ) -> tuple[Ack, Future]:
        key = row["idempotency_key"]
        charged = None
        if key is None or key not in self._keys:  # a retry of an acked vote is not charged
            caller = caller or ANONYMOUS
            voter = voter_of(caller, row["user_id"], row["session_id"])
            self.vote_rate.charge(voter)
            try:
                self.caller_vote_rate.charge(caller)
            except ResourceExhausted:
                self.vote_rate.refund(voter)  # a refused vote costs its voter nothing
                raise
            charged = (voter, caller)
        try:
            with self._lock:
                if key is not None:
                    first = self._keys.get(key)
                    inflight = self._inflight.get(key)
                    if first is not None or inflight is not None:  # a duplicate costs nothing
                        self._refund(charged)
                        if first is not None:
                            return Ack(first, True), _done(None)
                        return Ack(inflight[0], True), inflight[1]  # share the first's fate
                feedback_id = "fb-" + uuid.uuid4().hex
                row["feedback_id"] = feedback_id
                future = wal.append_durable(logschema.encode_record(logschema.FEEDBACK, row))
                if key is not None:
                    self._inflight[key] = (feedback_id, future)
        except Exception:
            self._refund(charged)
            raise
        if charged is not None:  # a vote the disk refused costs its voter nothing either
            future.add_done_callback(
                lambda f: self._refund(charged) if f.exception() is not None else None)
        if key is not None:  # outside the lock: a future already done runs it right here
            future.add_done_callback(lambda f: self._settle(key, feedback_id, f))
        return Ack(feedback_id, False), future

    def _refund(self, charged: tuple[str, str] | None) -> None:
        if charged is not None:
            self.vote_rate.refund(charged[0])
            self.caller_vote_rate.refund(charged[1])

    def _settle(self, key: str, feedback_id: str, future: Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if future.exception() is None:
                self._keys[key] = feedback_id


def lock_holder(data_dir: str | os.PathLike, replica: str | None = None) -> str | None:
    """The pid (as written in the lock file) of the process holding the feedback log of
    `data_dir` (of its `replica`), or None when it is free (or there is no log yet). Takes and
    drops the lock at once: a cheap check before a server loads its model."""
    path = logschema.log_dir(data_dir, replica) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (or unreadable): nobody holds it as far as we can tell
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # releases a lock we took
    return None


def open_store(data_dir: str | os.PathLike, **config: Any) -> FeedbackStore:
    """FeedbackStore(StoreConfig(data_dir, **config)); WAL settings go in `wal=WalConfig(...)`."""
    return FeedbackStore(StoreConfig(data_dir=Path(data_dir), **config))


__all__ = ["Ack", "FeedbackStore", "StoreConfig", "WalConfig", "open_store"]
