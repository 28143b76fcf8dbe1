"""Which thread steps the native engines: one background thread per engine, or the main thread.

`AsyncEngine` does its work in `run_once()` (apply queued adds/aborts, run one step); a driver calls
it in a loop. `ThreadDriver` gives each engine its own daemon thread (in-process use: tests, the
Python API). `MainThreadDriver` steps every engine of the process (the served version, a hot-swap's
draining one, an A/B candidate) in turn on the thread that calls `run_beside`, the main thread of
`prefloop serve`, while the servers' event loop runs on a second thread.

Why the main thread: on an AMX Xeon the same engine stepped from a `threading.Thread` decoded at
17.8 tok/s against 41.3 on the main thread (issue 32, 2026-12-03), the main thread idle in
`join()`; on an AVX2 EPYC the thread cost bfloat16 about 12 %, on an AVX-512 EPYC 28 % (bf16) to
59 % (int4). The cause, measured 2026-12-05 (docs/performance.md, "Why an engine stepped from a
worker thread is slow"): a parallel region started from a thread other than the process's first
does not find its OpenMP worker spinning, and waking it costs 40-50 µs per region — about 150
regions a decode step. No OpenMP setting removes it; stepping on the main thread does. Stepping
all engines on one thread also keeps an A/B test's two engines from fighting over the cores with
two OpenMP teams.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Steppable(Protocol):
    wake: threading.Event | None

    def run_once(self) -> bool: ...  # True when it ran a step (more may be waiting)

    def finish(self) -> None: ...  # fail what is still running; the engine is detached

    @property
    def stopping(self) -> bool: ...


class ThreadDriver:
    """Each engine on its own daemon thread (the default outside `prefloop serve`)."""

    def __init__(self):
        self._threads: dict[int, threading.Thread] = {}

    def attach(self, engine: Steppable) -> None:
        engine.wake = threading.Event()
        thread = threading.Thread(target=self._loop, args=(engine,), name="prefloop-engine", daemon=True)
        self._threads[id(engine)] = thread
        thread.start()

    @staticmethod
    def _loop(engine: Steppable) -> None:
        while not engine.stopping:
            if not engine.run_once():
                engine.wake.wait(timeout=0.5)
                engine.wake.clear()
        engine.finish()

    def alive(self, engine: Steppable) -> bool:
        thread = self._threads.get(id(engine))
        return thread is not None and thread.is_alive()

    def detach(self, engine: Steppable, timeout: float = 30) -> bool:
        """Wait for the engine's thread to finish (the engine has been told to stop); whether
        nothing steps it any more."""
        thread = self._threads.pop(id(engine), None)
        if thread is not None:
            engine.wake.set()
            thread.join(timeout)
            return not thread.is_alive()
        return True


class MainThreadDriver:
    """Every attached engine stepped in turn on the thread that runs `run_beside` (the main one)."""

    def __init__(self):
        self.wake = threading.Event()
        self._engines: list[Steppable] = []
        self._finished: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._running = False

    def attach(self, engine: Steppable) -> None:
        engine.wake = self.wake
        with self._lock:
            self._engines.append(engine)
            self._finished[id(engine)] = threading.Event()
        self.wake.set()

    def alive(self, engine: Steppable) -> bool:
        with self._lock:
            return self._running and engine in self._engines

    def detach(self, engine: Steppable, timeout: float = 30) -> bool:
        """Wait until the stepping thread has finished the (stopping) engine; whether it has."""
        with self._lock:
            done = self._finished.get(id(engine))
            running = self._running
        if done is None:
            return True
        self.wake.set()
        if running and not done.wait(timeout):
            log.warning("an engine did not stop within %.0f s", timeout)
            return False
        if not running:  # nothing steps it: finish it here
            self._drop(engine)
        return True

    def _drop(self, engine: Steppable) -> None:
        with self._lock:
            if engine not in self._engines:
                return
            self._engines.remove(engine)
            done = self._finished.pop(id(engine))
        engine.finish()
        done.set()

    def run_beside(self, fn: Callable[[], T], name: str = "prefloop-api",
                   on_failure: Callable[[], None] | None = None) -> T:
        """Run `fn` on a new thread and step the engines on this one until it returns; then
        finish any engine still attached and return `fn`'s result (or raise its exception).
        Should the stepping itself fail (a bug: a step's own errors fail only its requests), every
        engine is finished and `on_failure()` asks `fn` to return."""
        result: dict = {}

        def target() -> None:
            try:
                result["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
                result["error"] = exc
            finally:
                self.wake.set()

        with self._lock:
            self._running = True
        thread = threading.Thread(target=target, name=name)
        thread.start()
        try:
            while thread.is_alive():
                self._step_all()
        except Exception:  # noqa: BLE001 - logged; fn is asked to end, then we wait for it
            log.exception("the engine loop failed; stopping")
            if on_failure is not None:
                on_failure()
        finally:
            with self._lock:
                self._running = False
                engines = list(self._engines)
            for engine in engines:
                self._drop(engine)
            thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _step_all(self) -> None:
        with self._lock:
            engines = list(self._engines)
        busy = False
        for engine in engines:
            if engine.stopping:
                self._drop(engine)
            else:
                busy = engine.run_once() or busy
        engines = engine = None  # a dropped engine must not live on in this frame while it waits
        if not busy:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
