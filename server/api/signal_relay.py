"""Forwarding SIGTERM/SIGINT from the main thread to an event loop running on another thread.

Python runs signal handlers on the main thread only, and `loop.add_signal_handler` works only for a
loop on the main thread. Under `prefloop serve` the main thread steps the engines
(server/engine/driver.py) and the servers' loop runs on a second thread: a `SignalRelay` installed
on the main thread hands each signal to the loop that `connect`ed (the server's graceful-shutdown
handler). A signal before any loop connected acts as it would without the relay (the default
action: the process ends).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalRelay:
    def __init__(self):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a SignalRelay is installed from the main thread")
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[int], None]] | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def connect(self, loop: asyncio.AbstractEventLoop, handler: Callable[[int], None]) -> None:
        """From now on each signal calls `handler(signum)` on `loop`."""
        self._target = (loop, handler)

    def disconnect(self) -> None:
        self._target = None

    def raise_signal(self, signum: int = signal.SIGTERM) -> None:
        """Deliver `signum` as if it came from outside (e.g. to stop the server from the main
        thread)."""
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _on_signal(self, signum: int, frame) -> None:
        target = self._target
        if target is None:  # nothing to shut down gracefully yet: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        loop, handler = target
        try:
            loop.call_soon_threadsafe(handler, signum)
        except RuntimeError:  # the loop has closed: the server is already on its way out
            pass
