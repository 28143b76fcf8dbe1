"""ModelSwitcher: keeps the server on the registry's current version without dropping a request.

It follows the registry pointer (`<data-dir>/registry/CURRENT`, looked at on each poll of the
`RegistryWatcher` it subscribes to with `watch`) and serves the Models RPCs Promote / Rollback. A
switch verifies the version (checksums via the registry, shapes by the strict loader), then
`Generator.swap` moves new requests to it — on the serving engine when it is that engine's weights
plus LoRA adapters, else loaded beside the serving one (off the event loop) —; requests already
running finish on the weights they started with. A version that fails is refused
with a clear error and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from prefloop.server.errors import FailedPrecondition, PrefloopError, Unavailable
from prefloop.server.registry import BASE_VERSION, Registry
from prefloop.server.serving.generator import Generator
from prefloop.server.serving.registry_watcher import RegistryWatcher

log = logging.getLogger(__name__)


class ModelSwitcher:
    def __init__(self, generator: Generator, registry: Registry, poll_interval_s: float = 2.0):
        """`poll_interval_s` > 0: `watch` follows the pointer on every poll of the watcher (whose
        own interval sets how often); 0: only Promote / Rollback / `follow_now` switch."""
        self.generator = generator
        self.registry = registry
        self.poll_interval_s = poll_interval_s
        self._lock = asyncio.Lock()
        self._refused: str | None = None  # a pointer target that failed; not retried every poll
        self.on_swap: Callable[[str, float], None] | None = None  # (version, seconds), e.g. metrics

    @property
    def serving(self) -> str:
        return self.generator.info.model_version

    def watch(self, watcher: RegistryWatcher) -> None:
        """Follow the registry pointer on each poll of `watcher` (unless poll_interval_s is 0)."""
        if self.poll_interval_s > 0:
            watcher.subscribe(self.poll)

    def _is_copy_of_served(self, version: str) -> bool:
        """Whether `version` is the base version copied from the folder being served (then a
        switch to it only renames what is served)."""
        manifest = self.registry.manifest(version)
        served = getattr(self.generator.info, "model_path", "") or ""
        return bool(manifest.source and served) and version == BASE_VERSION \
            and Path(manifest.source).resolve() == Path(served).resolve()

    async def _switch_to(self, version: str) -> None:
        """Verify and load `version`, then move new requests to it (raises on failure)."""
        started = time.perf_counter()
        await asyncio.to_thread(self.registry.check, version)  # sha256 of every file
        if self._is_copy_of_served(version):
            self.generator.relabel(version)
        else:
            await self.generator.swap(self.registry.version_dir(version), version)
        if self.on_swap is not None:
            self.on_swap(version, time.perf_counter() - started)

    async def promote(self, version: str, reason: str = "", actor: str = "",
                      force: bool = False) -> tuple[str, str]:
        async with self._lock:
            previous = self.serving
            manifest = self.registry.manifest(version)  # NotFound for an unknown version
            if manifest.kind != "policy":
                raise FailedPrecondition(f"{version} is a {manifest.kind} model; only policy "
                                         "versions can be served")
            if manifest.gate_passed is False and not force:
                raise FailedPrecondition(f"{version} was rejected by the eval gate; pass force "
                                         "to promote it anyway")
            if version != previous:
                await self._switch_to(version)
            if self.registry.current() != version:
                self.registry.promote(version, reason=reason, actor=actor, force=force,
                                      verify=False)  # verified above
            self._refused = None
            log.info("promoted %s -> %s (%s)", previous, version, reason or "no reason given")
            return previous, version

    async def rollback(self, reason: str = "", actor: str = "") -> tuple[str, str]:
        async with self._lock:
            previous = self.serving
            stack = self.registry.served_stack()
            if len(stack) < 2:
                raise FailedPrecondition("nothing to roll back to: no earlier promotion")
            target = stack[-2]
            await self._switch_to(target)
            self.registry.rollback(reason=reason, actor=actor, verify=False)
            log.info("rolled back %s -> %s (%s)", previous, target, reason or "no reason given")
            return previous, target

    def list_versions(self) -> list[dict]:
        current = self.registry.current()
        out = []
        for version in self.registry.list_versions():
            m = self.registry.manifest(version)
            out.append({"version": version, "parent": m.parent or "", "created_at": m.created_at,
                        "kind": m.kind, "method": m.method, "current": version == current,
                        "metrics_json": json.dumps(m.metrics or {}),
                        "gate_json": json.dumps(m.gate) if m.gate else ""})
        return out

    async def follow_now(self) -> None:
        """Serve the registry's current version if it moved (e.g. an A/B test promoted)."""
        target = self.registry.current()
        if not target or target == self.serving or target == self._refused:
            return
        async with self._lock:
            if self.registry.current() != target or target == self.serving:
                return
            log.info("registry pointer moved to %s: switching", target)
            await self._switch_to(target)

    async def poll(self) -> None:
        """One watcher look: `follow_now`, remembering a version that fails so that it is not
        retried every poll (an unreadable registry is retried)."""
        target = None
        try:
            target = self.registry.current()
            await self.follow_now()
        except Unavailable as exc:  # for now (an A/B test holds the weights): the next poll retries
            log.info("not serving registry version %s yet, keeping %s: %s", target, self.serving,
                     exc)
        except PrefloopError as exc:
            self._refused = target
            log.error("cannot serve registry version %s, keeping %s: %s", target,
                      self.serving, exc)
        except Exception:  # a bad version must not be retried every poll
            self._refused = target
            log.exception("cannot serve registry version %s, keeping %s", target, self.serving)
