"""The model registry: immutable model versions under `<data-dir>/registry/`, and which one is served.

    <data-dir>/registry/
      CURRENT                       the served version's name ("v0003\\n"), replaced atomically
      history.jsonl                 one line per init / promote / rollback (append-only, fsync'd)
      .pointer.lock                 flock'd while CURRENT and history.jsonl change
      versions/v0000/               the base model (copied from --model or the default model)
      versions/v0001/               config.json, *.safetensors, tokenizer files, manifest.json
      versions/.stage-<pid>-<hex>/  a version being written (never read; removed on failure)

A version folder is a Hugging Face model folder plus `manifest.json` (`Manifest`: version, parent,
created_at, kind, method, hyperparameters, data window and row counts, metrics, gate decision and
reasons, and the sha256 of every file). It is written into a stage directory, fsync'd, made
read-only and renamed to `vNNNN` in one step, so a version either exists complete or not at all.
Version folders are never modified afterwards; `verify()` recomputes the checksums.

One rule for what is served: v0000 *is* the served base from the moment it exists. Whoever creates
v0000 (`prefloop models init`, the first align job) writes CURRENT and its "init" history line in
the same locked step, so `current()`, `models list`, A/B tests and align agree from the first job
on; a server on that data directory follows the pointer and names what it serves v0000 (no reload
when v0000 is a copy of the folder it already serves). A registry written before this rule (v0000
without CURRENT) reads the same way: `current()` resolves a missing CURRENT to v0000. A first job
that fails removes the v0000 it created again (`discard_unused_base`).

The server reads this module (`current()`, `version_dir()`, `verify()`, `promote()`,
`rollback()`); align writes it (`ensure_base()`, `stage()` + `Stage.publish()`); `prefloop models prune/delete`
removes versions nothing needs (`delete_version()`, never the current one or its rollback stack). The align job
lock and job history (`job.lock`, `jobs.jsonl` in the same folder) are server/jobs.py's: align
writes them, `align jobs`, `/v1/admin/jobs` and the web page read them through the same code.
This module also names what every command shares about the data directory (`DATA_DIR_ENV`) and which files a model folder may hold (`MODEL_FILE_SUFFIXES`).
Pure standard library. User-facing failures raise the typed errors of `server/errors.py`
(NotFound, InvalidArgument, FailedPrecondition).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prefloop.server.durable_io import (
    append_line_durable,
    fsync_dir,
    fsync_file,
    makedirs_durable,
    read_jsonl,
    utc_now,
    write_file_atomic,
)
from prefloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from prefloop.server.version_summary import VersionSummary

DATA_DIR_ENV = "PREFLOOP_DATA_DIR"  # every command's --data-dir default (else ./data)
REGISTRY_DIR = "registry"
VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.jsonl"
POINTER_LOCK_FILE = ".pointer.lock"
MANIFEST_FILE = "manifest.json"
STAGE_PREFIX = ".stage-"
MANIFEST_SCHEMA = 1

KIND_POLICY = "policy"
KIND_REWARD = "reward"
KINDS = (KIND_POLICY, KIND_REWARD)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA adapter version (server/model/adapters.py)
MAX_ADAPTER_CHAIN = 8  # adapters over adapters before an align job publishes full weights again
MERGED_DIR = "merged"  # <registry>/merged/vNNNN-<hash>: an adapter version merged for vLLM

BASE_VERSION = "v0000"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
# What a version folder may hold besides manifest.json (copied from a source folder by name).
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Names, time, durable file helpers


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(name: str) -> int:
    """The number of a version name ("v0003" -> 3); InvalidArgument for anything else."""
    m = _VERSION_RE.match(str(name))
    if not m:
        raise InvalidArgument(f"{name!r} is not a version name (expected v0000, v0001, ...)")
    return int(m.group(1))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmtree(path: Path) -> None:
    """Remove a (possibly read-only) tree."""
    def onerror(func, p, exc_info):  # read-only dirs/files: make writable and retry once
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    if path.is_dir():  # make the tree writable first (onerror does not cover unlisting dirs)
        os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path, onerror=onerror)


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(slots=True)
class Manifest:
    """Everything known about one version; stored as `manifest.json` inside its folder."""

    version: str
    kind: str  # "policy" (servable) | "reward"
    method: str  # "base", "dpo", "kto", ...
    created_at: str  # ISO 8601 UTC
    files: dict[str, dict[str, Any]]  # file name -> {"sha256": hex, "bytes": n}
    parent: str | None = None  # the version it was trained from (None for the base)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # window (since/until) and row counts
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None  # {"passed": bool, "reasons": [...], ...}; None = not gated
    source: str | None = None  # where a base version was copied from
    job_id: str | None = None
    # a LoRA adapter version: {"base": parent, "base_manifest_sha256": hex} (server/model/adapters.py);
    # None: full weights
    adapter: dict[str, str] | None = None
    # the floating-point dtype of the stored weights ("float32", "bfloat16", ...; an adapter's: its
    # factors'); None in manifests written before it was recorded (stored_dtype reads the files)
    dtype: str | None = None
    schema: int = MANIFEST_SCHEMA

    def __post_init__(self) -> None:
        version_number(self.version)
        if self.parent is not None:
            version_number(self.parent)
        if self.kind not in KINDS:
            raise InvalidArgument(f"manifest kind {self.kind!r} is not one of {KINDS}")
        if not self.method:
            raise InvalidArgument("manifest method is empty")
        if not any(name.endswith(".safetensors") for name in self.files):
            raise InvalidArgument(f"version {self.version} has no *.safetensors weight file")
        for name, entry in self.files.items():
            if "/" in name or name.startswith(".") or name == MANIFEST_FILE:
                raise InvalidArgument(f"manifest lists an invalid file name {name!r}")
            if not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
                raise InvalidArgument(f"manifest entry of {name} has no sha256")
        if self.gate is not None and not isinstance(self.gate.get("passed"), bool):
            raise InvalidArgument("manifest gate needs a boolean 'passed'")
        if self.adapter is not None:
            if self.adapter.get("base") != self.parent or self.parent is None:
                raise InvalidArgument(f"adapter version {self.version}: its base must be its parent")
            if not re.fullmatch(r"[0-9a-f]{64}", str(self.adapter.get("base_manifest_sha256", ""))):
                raise InvalidArgument(f"adapter version {self.version} has no base manifest sha256")
            if ADAPTER_CONFIG_FILE not in self.files:
                raise InvalidArgument(f"adapter version {self.version} has no {ADAPTER_CONFIG_FILE}")

    @property
    def format(self) -> str:
        """"adapter" (LoRA weights over its base) or "full"."""
        return "adapter" if self.adapter is not None else "full"

    @property
    def weight_files(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    @property
    def gate_passed(self) -> bool | None:
        return None if self.gate is None else bool(self.gate["passed"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}  # newer minor fields are ignored
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(slots=True)
class VerifyResult:
    version: str
    ok: bool
    problems: list[str]
    checked_bytes: int


@dataclass(slots=True)
class HistoryEntry:
    action: str  # "init" | "promote" | "rollback"
    version: str  # the version current after this action
    previous: str | None
    at: str
    reason: str = ""
    actor: str = ""


# ---------------------------------------------------------------------------------------------
# Staging a new version


class Stage:
    """A version being written: fill `path` with an HF folder, then `publish(...)` (or let the
    `Registry.stage()` context manager delete it on any exception)."""

    def __init__(self, registry: "Registry", path: Path) -> None:
        self.registry = registry
        self.path = path
        self.version: str | None = None

    def publish(self, *, kind: str, method: str, parent: str | None = None,
                hyperparameters: dict | None = None, data: dict | None = None,
                metrics: dict | None = None, gate: dict | None = None, source: str | None = None,
                job_id: str | None = None, version: str | None = None,
                adapter: bool = False) -> Manifest:
        """Checksum, fsync, make read-only and rename the stage to the next free `vNNNN`.

        `version` pins the name (the base uses v0000); FailedPrecondition if it exists.
        `adapter`: the stage holds a LoRA adapter over `parent` (its manifest's hash is recorded).
        """
        files = {}
        for p in sorted(self.path.iterdir()):
            if p.name == MANIFEST_FILE:
                continue
            if not p.is_file() or p.name.startswith("."):
                raise InvalidArgument(f"unexpected entry {p.name!r} in a version folder")
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            fsync_file(p)
        if parent is not None:
            self.registry.manifest(parent)  # NotFound if the parent does not exist
        link = None
        if adapter:
            if parent is None:
                raise InvalidArgument("an adapter version needs its parent (its base)")
            link = {"base": parent, "base_manifest_sha256": sha256_file(
                self.registry.version_dir(parent) / MANIFEST_FILE)}
        versions_dir = self.registry.versions_dir
        number = version_number(version) if version else self.registry._next_number()
        while True:
            manifest = Manifest(
                version=version_name(number), kind=kind, method=method, created_at=utc_now(),
                files=files, parent=parent, hyperparameters=dict(hyperparameters or {}),
                data=dict(data or {}), metrics=dict(metrics or {}), gate=gate, source=source,
                job_id=job_id, adapter=link, dtype=stored_dtype(self.path))
            manifest_path = self.path / MANIFEST_FILE
            if manifest_path.exists():
                os.chmod(manifest_path, 0o644)
            write_file_atomic(manifest_path, manifest.to_json().encode())
            for p in self.path.iterdir():
                os.chmod(p, 0o444)
            os.chmod(self.path, 0o555)
            fsync_dir(self.path)
            target = versions_dir / manifest.version
            try:
                os.rename(self.path, target)  # fails if target exists and is not empty
            except OSError as exc:
                os.chmod(self.path, 0o755)
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if version:
                    raise FailedPrecondition(f"version {version} already exists") from None
                number = max(number + 1, self.registry._next_number())  # lost a race: next
                continue
            fsync_dir(versions_dir)
            self.path = target
            self.version = manifest.version
            return manifest


# ---------------------------------------------------------------------------------------------
# The registry


class Registry:
    """One registry folder (`<data-dir>/registry`). Cheap to construct; every call reads disk."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / REGISTRY_DIR
        self.versions_dir = self.root / VERSIONS_DIR
        self.current_path = self.root / CURRENT_FILE
        self.history_path = self.root / HISTORY_FILE

    # ---- reading ----------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.versions_dir.is_dir()

    def list_versions(self) -> list[str]:
        """Published version names, oldest first (stage folders are not versions)."""
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir()
                 if _VERSION_RE.match(p.name) and (p / MANIFEST_FILE).is_file()]
        return sorted(names, key=version_number)

    def version_dir(self, version: str) -> Path:
        """The folder of `version` (an HF model folder); NotFound if it is not published."""
        version_number(version)
        path = self.versions_dir / version
        if not (path / MANIFEST_FILE).is_file():
            known = ", ".join(self.list_versions()) or "none"
            raise NotFound(f"model version {version} does not exist in {self.root} (known: {known})")
        return path

    def manifest(self, version: str) -> Manifest:
        path = self.version_dir(version) / MANIFEST_FILE
        try:
            return Manifest.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise FailedPrecondition(f"{path} is not a valid manifest: {exc}") from None

    def current(self) -> str | None:
        """The served version's name: CURRENT, else v0000 when it exists (the served base), else
        None (no registry yet)."""
        try:
            text = self.current_path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):  # no pointer (or no usable data dir)
            return BASE_VERSION if self.has_base() else None
        except UnicodeDecodeError:
            text = "(bytes that are not text)"
        if not _VERSION_RE.match(text):
            last = self.last_named_version()
            hint = (f"the last version it named was {last}: `prefloop models promote {last} "
                    "--force` sets it again" if last else "`prefloop models promote VERSION "
                    "--force` sets it again")
            raise FailedPrecondition(f"the registry pointer {self.current_path} is damaged (it "
                                     f"holds {text[:40]!r}, not a version name); {hint}")
        return text

    def last_named_version(self) -> str | None:
        """The version of the newest readable history line that names a published version."""
        try:
            entries = read_jsonl(self.history_path)
        except (OSError, ValueError):  # unreadable, or not text
            return None
        published = set(self.list_versions())
        for entry in reversed(entries):
            if isinstance(entry, dict) and entry.get("version") in published:
                return entry["version"]
        return None

    def current_dir(self) -> Path | None:
        cur = self.current()
        return None if cur is None else self.version_dir(cur)

    def history(self) -> list[HistoryEntry]:
        known = set(HistoryEntry.__dataclass_fields__)
        return [HistoryEntry(**{k: v for k, v in e.items() if k in known})
                for e in read_jsonl(self.history_path)]

    def verify(self, version: str) -> VerifyResult:
        """Recompute every file's sha256 and compare with the manifest (also: missing or extra
        weight files, a manifest naming another version)."""
        path = self.version_dir(version)
        problems: list[str] = []
        checked = 0
        try:
            manifest = self.manifest(version)
        except (FailedPrecondition, InvalidArgument) as exc:
            return VerifyResult(version, False, [str(exc)], 0)
        if manifest.version != version:
            problems.append(f"manifest names version {manifest.version}, folder is {version}")
        for name, entry in sorted(manifest.files.items()):
            file = path / name
            if not file.is_file():
                problems.append(f"{name} is missing")
                continue
            size = file.stat().st_size
            if size != entry.get("bytes", size):
                problems.append(f"{name} has {size} bytes, manifest says {entry['bytes']}")
                continue
            checked += size
            if sha256_file(file) != entry["sha256"]:
                problems.append(f"{name} sha256 mismatch")
        for extra in sorted(path.glob("*.safetensors")):
            if extra.name not in manifest.files:
                problems.append(f"{extra.name} is not listed in the manifest")
        return VerifyResult(version, not problems, problems, checked)

    def check(self, version: str) -> Manifest:
        """`verify()` that raises FailedPrecondition naming the problems; returns the manifest."""
        result = self.verify(version)
        if not result.ok:
            raise FailedPrecondition(f"model version {version} failed verification: "
                                     + "; ".join(result.problems))
        return self.manifest(version)

    # ---- writing versions ---------------------------------------------------------------------

    def _next_number(self) -> int:
        names = self.list_versions()
        return version_number(names[-1]) + 1 if names else 0

    @contextlib.contextmanager
    def stage(self) -> Iterator[Stage]:
        """A fresh stage folder; removed unless `publish()` renamed it into place."""
        makedirs_durable(self.versions_dir)
        path = self.versions_dir / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        stage = Stage(self, path)
        try:
            yield stage
        finally:
            if stage.version is None and path.exists():
                _rmtree(path)

    def cleanup_stages(self) -> list[str]:
        """Remove stage folders left by processes that died (their pid is not running)."""
        removed = []
        if not self.versions_dir.is_dir():
            return removed
        for p in self.versions_dir.iterdir():
            if not p.name.startswith(STAGE_PREFIX):
                continue
            try:
                pid = int(p.name[len(STAGE_PREFIX):].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                _rmtree(p)
                removed.append(p.name)
        return removed

    def has_base(self) -> bool:
        return (self.versions_dir / BASE_VERSION / MANIFEST_FILE).is_file()

    def ensure_base(self, model_dir: str | os.PathLike | None = None, *,
                    source: str | None = None) -> str:
        """Create v0000 from an HF folder on first use and point CURRENT at it (with its "init"
        history line) in one locked step; idempotent. Returns "v0000".

        `model_dir` must be an HF folder (resolve `--model` with `model.loader.resolve_model_dir`
        first); None only writes the pointer of an existing v0000 (a registry from before the
        rule that v0000 is current from its creation).
        """
        if self.has_base() and self.current_path.is_file():
            return BASE_VERSION
        makedirs_durable(self.root)
        with self._pointer_lock():
            if not (self.versions_dir / BASE_VERSION / MANIFEST_FILE).is_file():
                if model_dir is None:
                    raise FailedPrecondition(
                        f"{self.root} has no {BASE_VERSION}: create it from a model folder first "
                        "(`prefloop models init [--model PATH]`)")
                src = Path(model_dir)
                if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
                    raise InvalidArgument(f"{src} is not a Hugging Face model folder "
                                          "(config.json + *.safetensors)")
                with self.stage() as stage:
                    for p in sorted(src.iterdir()):
                        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES \
                                and not p.name.startswith(".") and p.name != MANIFEST_FILE:
                            shutil.copyfile(p, stage.path / p.name)
                    stage.publish(kind=KIND_POLICY, method="base", version=BASE_VERSION,
                                  source=source or str(src.resolve()))
            if not self.current_path.is_file():
                self._set_current(BASE_VERSION, "init", None, "base model", "")
        return BASE_VERSION

    # ---- the pointer --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _pointer_lock(self) -> Iterator[None]:
        makedirs_durable(self.root)
        fd = os.open(self.root / POINTER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _set_current(self, version: str, action: str, previous: str | None, reason: str,
                     actor: str) -> HistoryEntry:
        """Pointer first (it is the truth the server follows), then the history line."""
        write_file_atomic(self.current_path, f"{version}\n".encode())
        entry = HistoryEntry(action=action, version=version, previous=previous, at=utc_now(),
                             reason=reason, actor=actor)
        append_line_durable(self.history_path, asdict(entry))
        return entry

    def promote(self, version: str, *, reason: str = "", actor: str = "", force: bool = False,
                verify: bool = True) -> HistoryEntry:
        """Make `version` current. Refused (FailedPrecondition) for a reward model, a version
        that fails verification, or one its gate rejected (unless `force`). On a registry without
        the CURRENT file (v0000 made before v0000 was current from its creation) v0000's init is
        recorded first, so a rollback returns to the base."""
        manifest = self.manifest(version)
        if manifest.kind != KIND_POLICY:
            raise FailedPrecondition(f"{version} is a {manifest.kind} model; only policy "
                                     "versions can be served")
        if manifest.gate_passed is False and not force:
            reasons = "; ".join(manifest.gate.get("reasons", [])) if manifest.gate else ""
            raise FailedPrecondition(f"{version} was rejected by the eval gate ({reasons}); "
                                     "pass force to promote it anyway")
        if verify:
            self.check(version)
        with self._pointer_lock():
            previous = self.current()
            if previous == version:
                raise FailedPrecondition(f"{version} is already the current version")
            if not self.current_path.is_file() and previous == BASE_VERSION:
                append_line_durable(self.history_path, asdict(HistoryEntry(
                    action="init", version=BASE_VERSION, previous=None, at=utc_now(),
                    reason="base model", actor=actor)))
                previous = BASE_VERSION
            return self._set_current(version, "promote", previous, reason, actor)

    def served_stack(self) -> list[str]:
        """Versions that rollbacks would return to, oldest first; the last one is current.

        init/promote push, rollback pops. If CURRENT disagrees with the history (edited by
        hand, or a crash between pointer and history), the current version is pushed on top.
        """
        stack: list[str] = []
        for e in self.history():
            if e.action == "rollback":
                if stack:
                    stack.pop()
                if not stack or stack[-1] != e.version:
                    stack.append(e.version)
            elif not stack or stack[-1] != e.version:
                stack.append(e.version)
        cur = self.current()
        if cur is not None and (not stack or stack[-1] != cur):
            stack.append(cur)
        return stack

    def rollback(self, *, reason: str = "", actor: str = "", verify: bool = True) -> HistoryEntry:
        """Return to the version that was current before the latest promotion still in effect."""
        with self._pointer_lock():
            stack = self.served_stack()
            if len(stack) < 2:
                raise FailedPrecondition("nothing to roll back to: no earlier promotion in "
                                         f"{self.history_path}")
            target = stack[-2]
            if verify:
                self.check(target)
            return self._set_current(target, "rollback", stack[-1], reason, actor)


    # ---- removing versions --------------------------------------------------------------------

    def version_bytes(self, version: str) -> int:
        """Bytes on disk of one version folder."""
        return sum(p.stat().st_size for p in self.version_dir(version).rglob("*") if p.is_file())

    def protected_versions(self, also: dict[str, str] | None = None) -> dict[str, str]:
        """version -> why it may not be removed: the current version, every version on its
        rollback stack, and `also` (what the caller knows more, e.g. a running A/B test's
        candidate and control)."""
        why: dict[str, str] = {}
        for v in self.served_stack():
            why.setdefault(v, "on the rollback stack")
        cur = self.current()
        if cur is not None:
            why[cur] = "the current version"
        for v, reason in (also or {}).items():
            why.setdefault(v, reason)
        for v in list(why):  # what an adapter is applied to stays while the adapter does
            for base in self.adapter_bases(v):
                why.setdefault(base, f"the base of adapter {v}")
        return why

    def adapter_base(self, version: str) -> str | None:
        """The version an adapter version is applied to (None: full weights)."""
        link = self.manifest(version).adapter
        return None if link is None else link["base"]

    def adapter_bases(self, version: str) -> list[str]:
        """Every version `version`'s weights need besides its own folder, nearest first."""
        chain, seen = [], {version}
        base = self.adapter_base(version)
        while base is not None and base not in seen:
            chain.append(base)
            seen.add(base)
            base = self.adapter_base(base) if (self.versions_dir / base).is_dir() else None
        return chain

    def adapters_on(self, version: str) -> list[str]:
        """The adapter versions applied directly to `version`."""
        return [v for v in self.list_versions() if self.adapter_base(v) == version]

    def prune_plan(self, keep: int, also: dict[str, str] | None = None) -> list[str]:
        """The versions `prune(keep)` would remove: all but the newest `keep` of each kind
        (policy, reward), never a protected one (`protected_versions`)."""
        if keep < 0:
            raise InvalidArgument("--keep must be >= 0")
        protected = self.protected_versions(also)
        by_kind: dict[str, list[str]] = {}
        for v in self.list_versions():
            by_kind.setdefault(self.manifest(v).kind, []).append(v)
        doomed = {v for names in by_kind.values() for v in names[:max(len(names) - keep, 0)]
                  if v not in protected}
        for v in [v for v in self.list_versions() if v not in doomed]:
            doomed.difference_update(self.adapter_bases(v))  # a kept adapter keeps its bases
        return sorted(doomed, key=version_number)

    def delete_version(self, version: str, *, also: dict[str, str] | None = None) -> int:
        """Remove one version (FailedPrecondition if protected, see `protected_versions`); the
        bytes freed. Atomic: the folder is renamed to a stage name first (so it is no longer a
        version), then removed; a crash in between leaves a stage `cleanup_stages` removes."""
        with self._pointer_lock():  # no promote / rollback moves the pointer meanwhile
            path = self.version_dir(version)
            reason = self.protected_versions(also).get(version)
            if reason is None and (users := self.adapters_on(version)):
                reason = f"the base of adapter {', '.join(users)} (delete those first)"
            if reason is not None:
                raise FailedPrecondition(f"{version} cannot be deleted: it is {reason}")
            size = self.version_bytes(version)
            doomed = self.versions_dir / f"{STAGE_PREFIX}{os.getpid()}-deleting-{version}"
            os.rename(path, doomed)
            fsync_dir(self.versions_dir)
        _rmtree(doomed)
        for merged in (self.root / MERGED_DIR).glob(f"{version}-*"):  # vLLM's merged copies
            size += sum(p.stat().st_size for p in merged.rglob("*") if p.is_file())
            _rmtree(merged)
        return size

    def discard_unused_base(self) -> bool:
        """Undo `ensure_base` on a registry that has nothing else: remove v0000, CURRENT and
        the history when v0000 is the only version and the history holds only its init (an align
        job that failed after creating the base). True if it removed something."""
        with self._pointer_lock():
            history = self.history()
            if self.list_versions() != [BASE_VERSION] or self.current() not in (None, BASE_VERSION) \
                    or any(e.action != "init" for e in history):
                return False
            doomed = self.versions_dir / f"{STAGE_PREFIX}{os.getpid()}-deleting-{BASE_VERSION}"
            os.rename(self.versions_dir / BASE_VERSION, doomed)
            for p in (self.current_path, self.history_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            fsync_dir(self.versions_dir)
            fsync_dir(self.root)
        _rmtree(doomed)
        return True


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(folder: Path) -> str | None:
    """The floating-point dtype of the weights in `folder`'s *.safetensors files (read from the
    headers only): the one holding the most elements (a bfloat16 checkpoint with a few float32
    norms or rotary buffers is bfloat16); None when there is none or a header cannot be read
    (the loader reports a broken file; the record is only informative)."""
    elements: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 100 * 2**20:
                    return None
                header = json.loads(f.read(size))
            for name, t in header.items():
                if name != "__metadata__" and isinstance(t, dict) \
                        and t.get("dtype") in _SAFETENSORS_DTYPES:
                    dtype = _SAFETENSORS_DTYPES[t["dtype"]]
                    elements[dtype] = elements.get(dtype, 0) + math.prod(t.get("shape") or [1])
        except (OSError, ValueError, AttributeError, TypeError):
            return None
    return max(elements, key=elements.get) if elements else None


def version_info(registry: Registry, version: str) -> dict[str, Any]:
    """A flat summary of one version for listings and the Models RPCs."""
    m = registry.manifest(version)
    return {"version": m.version, "parent": m.parent, "kind": m.kind, "method": m.method,
            "created_at": m.created_at, "current": registry.current() == m.version,
            "gate_passed": m.gate_passed, "gate_reasons": list((m.gate or {}).get("reasons", [])),
            "gate": m.gate, "summary": VersionSummary.of(m.metrics, m.gate).to_dict(),
            "metrics": m.metrics, "data": m.data, "bytes": sum(int(f.get("bytes", 0))
                                                              for f in m.files.values()),
            "format": m.format, "base": None if m.adapter is None else m.adapter["base"],
            "dtype": m.dtype or stored_dtype(registry.version_dir(version))}
