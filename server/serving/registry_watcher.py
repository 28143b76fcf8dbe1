"""RegistryWatcher: the one task that looks at the registry files every `poll_s` seconds.

Subscribers are async callables taking no arguments (the `ModelSwitcher` following CURRENT, the
`ABController` following AB.json). Each poll awaits them once, in the order they subscribed; one
that raises is logged and the others, and the next poll, still run. `start()` creates the task
(none when `poll_s` <= 0), `close()` cancels it and waits for it to end.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Subscriber = Callable[[], Awaitable[object]]


class RegistryWatcher:
    def __init__(self, poll_s: float = 2.0) -> None:
        self.poll_s = poll_s
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task | None = None

    def subscribe(self, callback: Subscriber) -> None:
        """Await `callback()` on every poll, after the subscribers already there."""
        self._subscribers.append(callback)

    async def poll_once(self) -> None:
        """Call every subscriber once, in order; a failing one is logged and skipped."""
        for callback in list(self._subscribers):
            try:
                await callback()
            except Exception:  # one subscriber must not stop the others
                log.exception("registry watcher: %s failed",
                              getattr(callback, "__qualname__", repr(callback)))

    async def start(self) -> None:
        if self.poll_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll_once()
