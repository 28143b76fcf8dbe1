"""AsyncEngine: drives `LLMEngine` for asyncio callers from another thread.

Callers (on an event loop) submit requests and aborts through a thread-safe inbox; the stepping
thread applies them at step boundaries (`run_once`), runs steps while there is work, and hands each
`SeqOutput` back to the caller's loop with `call_soon_threadsafe`. Which thread steps is the
driver's choice (server/engine/driver.py): its own background thread by default, the main thread
under `prefloop serve`. torch releases the GIL inside kernels, so the event loop keeps serving
network traffic while the model runs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from prefloop.server.engine.driver import MainThreadDriver, ThreadDriver
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import PrefloopError, Unavailable

log = logging.getLogger(__name__)


class AsyncEngine:
    """The native engine as an `EngineBackend` (server/serving/protocol.py)."""

    reloads_in_place = False  # a new version gets its own engine beside this one

    def __init__(self, engine: LLMEngine, driver: ThreadDriver | MainThreadDriver | None = None):
        self.engine = engine
        self._driver = driver or ThreadDriver()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake: threading.Event | None = None  # set by the driver: wakes the stepping thread
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._started = False
        self._stopping = False
        self._stats = engine.stats()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._driver.attach(self)

    def stop(self) -> None:
        """Fail what is still running, wait until the stepping thread has let the engine go,
        then free its KV cache: a stopped engine's memory comes back even while something (a
        finished stream, a stats reference) still holds the engine object."""
        self._stopping = True
        if not self._started or self._driver.detach(self):
            self.engine.release_kv_cache()

    supports_adapters = True  # per-request LoRA adapters over its weights (server/model/lora.py)

    def add_adapter(self, factors: dict) -> int:
        """Load a LoRA adapter beside the weights; its id for `generate(..., adapter=id)`."""
        return self.engine.add_adapter(factors)

    def remove_adapter(self, adapter_id: int) -> None:
        self.engine.remove_adapter(adapter_id)

    def release_weights(self) -> None:
        """After `stop`: free the model's tensors too (only for a model this engine owns)."""
        if self._stopping and not self._driver.alive(self):
            self.engine.release_weights()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def healthy(self) -> bool:
        return self._started and not self._stopping and self._driver.alive(self)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams, adapter: int = 0) -> AsyncIterator[SeqOutput]:
        """Yield the request's outputs as they are produced; leaving early aborts the request.
        `adapter`: a per-request LoRA adapter of this engine (`add_adapter`), 0 for none."""
        if self._stopping or not self._started:
            raise Unavailable("the engine is not running")
        if request_id in self._streams:
            raise PrefloopError(f"request id {request_id!r} is already streaming")
        num_dropped = self.engine.validate(prompt_ids, params)  # the one check, raised in the caller
        out_queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._inbox.put(("add", request_id, prompt_ids, params, num_dropped, adapter))
        self._wakeup()
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
        self._wakeup()

    def _wakeup(self) -> None:
        if self.wake is not None:
            self.wake.set()

    async def reload_weights(self, model_dir) -> None:
        raise NotImplementedError("the native engine swaps versions by loading a second engine")

    # -- the stepping thread -------------------------------------------------------------------
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
                _, rid, ids, params, num_dropped, adapter = cmd
                try:
                    self.engine.add_request(rid, ids, params, num_dropped, adapter)
                except PrefloopError as exc:
                    self._deliver(exc, rid)
            else:
                _, rid, index = cmd
                self.engine.abort(rid, index)

    def run_once(self) -> bool:
        """Apply the queued adds and aborts, then run one step if there is work; True if it did."""
        self._drain_inbox()
        if not self.engine.has_unfinished():
            self._stats = self.engine.stats()
            return False
        try:
            outputs = self.engine.step()
        except Exception as exc:  # fail the running requests, keep the engine alive
            log.exception("engine step failed; aborting the running requests")
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
                self._deliver(RuntimeError(f"engine step failed: {exc}"), rid)
            outputs = []
        self._deliver_step(outputs)
        self._stats = self.engine.stats()
        return True

    def _deliver_step(self, outputs: list[SeqOutput]) -> None:
        """A step's outputs to their streams: one `call_soon_threadsafe` per event loop for the
        whole step (each call wakes the loop through its self-pipe, a syscall: at 32 streams that
        was 32 wake-ups a step for the loop, on the cores the next step needs)."""
        by_loop: dict = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def finish(self) -> None:
        """The engine stops: every request still running fails with UNAVAILABLE."""
        self._stopping = True
        self._drain_inbox()
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(Unavailable("the engine stopped"), rid)
        self._stats = self.engine.stats()


def _put_all(items: list) -> None:
    """On the event loop: each (queue, output) of one step into its stream's queue."""
    for q, out in items:
        q.put_nowait(out)
