"""ABRouter: which Generator serves a request while an A/B test runs.

The main Generator serves the current (control) version; while a test runs, a second Generator
serves the candidate (`Generator.load_beside`: its own engine and KV cache, or, for a LoRA adapter
over the control's version, an `AdapterGenerator` on the control's engine). A request goes to the
candidate with probability `traffic`, decided by a stable hash of its user id (or session id, or
nothing: per request), so one user keeps seeing one version. Compare requests get both, in random
order. `sync(state)` follows the registry's A/B state: loads the candidate when a test starts,
retires it when the test ends (requests running on it finish first; no request fails).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random

from prefloop.server.ab.state import ABState
from prefloop.server.serving.generator import Generator
from prefloop.server.serving.memory import release_when_collected

log = logging.getLogger(__name__)


def assignment_key(sticky: str, user_id: str, session_id: str) -> str | None:
    """The id that pins a request to a version (None: decide per request)."""
    if sticky == "user":
        return user_id or session_id or None
    if sticky == "session":
        return session_id or user_id or None
    return None


def goes_to_candidate(key: str | None, traffic: float, salt: str, rng=random) -> bool:
    """Stable hash of (salt, key) mapped to [0, 1) below `traffic`; random without a key."""
    if key is None:
        return rng.random() < traffic
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < traffic


class ABRouter:
    def __init__(self, control: Generator, version_dir) -> None:
        self.control = control
        self.version_dir = version_dir  # version -> its weights folder (Registry.version_dir)
        self.candidate: Generator | None = None
        self.state: ABState | None = None
        self._retiring: list[asyncio.Task] = []
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self.candidate is not None and self.state is not None and self.state.running

    def pick(self, user_id: str = "", session_id: str = "") -> Generator:
        if not self.running:
            return self.control
        key = assignment_key(self.state.sticky, user_id, session_id)
        salt = self.state.started_at  # a new test reshuffles users
        return self.candidate if goes_to_candidate(key, self.state.traffic, salt) else self.control

    def pair(self) -> list[Generator] | None:
        """Both versions in random order (a blind compare request), or None without a test."""
        if not self.running:
            return None
        both = [self.control, self.candidate]
        random.shuffle(both)
        return both

    async def sync(self, state: ABState | None) -> None:
        """Load the candidate of a running test, or retire it once the test is over."""
        async with self._lock:
            if state is not None and state.running:
                if self.candidate is None or self.candidate.info.model_version != state.candidate \
                        or self.state is None or self.state.started_at != state.started_at:
                    await self._retire()
                    self.candidate = await self.control.load_beside(
                        self.version_dir(state.candidate), state.candidate)
                    log.info("A/B test: %s serves %.0f%% of requests beside %s", state.candidate,
                             state.traffic * 100, self.control.info.model_version)
                self.state = state
            else:
                self.state = state
                await self._retire()

    async def _retire(self) -> None:
        candidate, self.candidate = self.candidate, None
        if candidate is not None:
            log.info("A/B test over: unloading %s once its requests finish",
                     candidate.info.model_version)
            self._retiring.append(asyncio.ensure_future(self._close_when_idle(candidate)))

    @staticmethod
    async def _close_when_idle(generator: Generator) -> None:
        while generator.active_requests:
            await asyncio.sleep(0.05)
        version = generator.info.model_version
        await generator.close()
        release_when_collected(generator, f"A/B candidate {version}")  # (memory.py)

    async def close(self) -> None:
        await self._retire()
        for task in self._retiring:
            await task
        self._retiring.clear()
