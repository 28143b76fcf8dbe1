"""AsyncEngine: drives `LLMEngine` from one background thread for asyncio callers.

Callers (on an event loop) submit requests and aborts through a thread-safe inbox; the engine thread
applies them at step boundaries, runs steps while there is work, and hands each `SeqOutput` back to
the caller's loop with `call_soon_threadsafe`. torch releases the GIL inside kernels, so the event
loop keeps serving network traffic while the model runs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import PrefloopError, Unavailable

log = logging.getLogger(__name__)


class AsyncEngine:
    """The native engine as an `EngineBackend` (server/serving/protocol.py)."""

    reloads_in_place = False  # a new version gets its own engine beside this one

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = engine.stats()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefloop-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[SeqOutput]:
        """Yield the request's outputs as they are produced; leaving early aborts the request."""
        if self._stopping or self._thread is None:
            raise Unavailable("the engine is not running")
        if request_id in self._streams:
            raise PrefloopError(f"request id {request_id!r} is already streaming")
        num_dropped = self.engine.validate(prompt_ids, params)  # the one check, raised in the caller
        out_queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._inbox.put(("add", request_id, prompt_ids, params, num_dropped))
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self._inbox.put(("abort", request_id, index))
        self._wake.set()

    async def reload_weights(self, model_dir) -> None:
        raise NotImplementedError("the native engine swaps versions by loading a second engine")

    # -- engine thread -------------------------------------------------------------------------
    def _deliver(self, out: SeqOutput | BaseException, request_id: str) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, num_dropped = cmd
                try:
                    self.engine.add_request(rid, ids, params, num_dropped)
                except PrefloopError as exc:
                    self._deliver(exc, rid)
            else:
                _, rid, index = cmd
                self.engine.abort(rid, index)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail the running requests, keep the engine alive
                log.exception("engine step failed; aborting the running requests")
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(RuntimeError(f"engine step failed: {exc}"), rid)
                outputs = []
            for out in outputs:
                self._deliver(out, out.request_id)
            self._stats = self.engine.stats()
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(Unavailable("the engine stopped"), rid)
