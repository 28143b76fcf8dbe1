"""Generator: the text-level front of a backend — tokenize, stream token deltas as text, stop strings.

Both `prefloop generate` and the gRPC servicers use it. It owns the tokenizer and chat template,
incremental detokenization and stop strings; the engine below it sees token ids only, through the
`EngineBackend` protocol (server/serving/protocol.py), so the same Generator serves the native
engine and vLLM (both built by `build.py`).

Hot-swap keeps one promise on both: no request fails, and every response names the version that
produced all of its tokens. A version that is the serving engine's weights plus LoRA adapters
(what align jobs publish) is served at once on that engine, every new request with the chain's
adapters as one per-request adapter (a `Backend` "view": same engine, its own adapter id), on both
backends (vLLM with --enable-lora). Any other version: native loads it beside the old one and new
requests move to it while running ones finish on the old weights; vLLM (one copy of the weights,
reloaded in place) holds new requests while running ones finish, reloads, then starts them.

A view decodes slower than plain weights (the LoRA update on every projection: 0.6x per token in
a real loop's server on 2026-12-08, 0.74x in benchmarks/merged_adapter.py, 0.86-0.92x in the
engine's pure-decode benchmark), and a promoted version is served for days. So with `merge_adapters` (the server's default) a native generator then loads
the version's merged weights on an engine of their own in the background, and moves new requests
there once they are ready, exactly as a swap to a full version does; requests that started on the
view finish there, and the view's engine stops once nothing runs on it (an A/B candidate served
beside on it keeps it until its test ends). The swap itself stays instant.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator

from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import FailedPrecondition, InvalidArgument, Unavailable, UnsupportedModel
from prefloop.server.model.config import read_sampling_defaults
from prefloop.server.serving.memory import release_when_collected
from prefloop.server.serving.protocol import EngineBackend
from prefloop.server.serving.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


def check_prompt_text(prompt: str) -> None:
    """The text-level prompt check (before tokenizing; the token-level one is the engine's
    `check_prompt`). Needs no model, so `prefloop generate` runs it before loading one."""
    if not prompt:
        raise InvalidArgument("prompt is empty")


@dataclass(slots=True)
class ModelInfo:
    model_version: str
    architecture: str
    context_length: int
    dtype: str
    backend: str
    model_path: str
    # the checkpoint's generation_config.json sampling values (temperature, top_p, top_k: the keys
    # it has), for the API layer's defaults; {} when it has none
    sampling_defaults: dict = field(default_factory=dict)


@dataclass(slots=True)
class CompletionDelta:
    index: int  # which of the request's n candidates
    text_delta: str
    token_ids: list[int]  # token ids produced in this delta
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" on the last one
    completion_tokens: int  # tokens generated so far for this candidate
    model_version: str = ""  # the weights that produced it (fixed for the whole request)
    stop_reason: str | None = None  # the request's stop string that ended it (with "stop")


@dataclass(eq=False)
class Backend:
    """One loaded model version: its engine, tokenizer and description."""

    engine: EngineBackend
    tokenizer: Tokenizer
    info: ModelInfo
    active: int = 0  # requests streaming on it
    owns_weights: bool = False  # its model was loaded for it alone: freed when it is retired
    adapter: int = 0  # the engine's per-request adapter every request here runs with (0: none)
    weights_version: str = ""  # the version whose full weights the engine holds ("": info's)

    def __post_init__(self):
        self.weights_version = self.weights_version or self.info.model_version


class Generator:
    """Serves requests on the current Backend; `swap` moves new requests to another version while
    requests already running finish on the weights (and KV cache) they started with."""

    def __init__(self, backend: Backend, loader=None, merge_adapters: bool = False):
        self._current = backend
        self._loader = loader  # (model_dir, version) -> Backend, for swap()
        # after a swap to an adapter view, load the version's merged weights in the background
        self.merge_adapters = merge_adapters
        self._merging: asyncio.Task | None = None
        self._draining: list[Backend] = []
        self._by_request: dict[str, Backend] = {}
        self._retiring: list[threading.Thread] = []
        self._admitting = asyncio.Event()  # cleared while an in-place reload drains and reloads
        self._admitting.set()
        self._slots: set[AdapterSlot] = set()  # adapter versions served beside (A/B candidates)

    @property
    def info(self) -> ModelInfo:
        return self._current.info

    @property
    def healthy(self) -> bool:
        return self._current.engine.healthy

    @property
    def active_requests(self) -> int:
        """Requests streaming on this generator (any of its versions)."""
        return len(self._by_request)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._current.tokenizer

    @property
    def reloads_in_place(self) -> bool:
        return bool(getattr(self._current.engine, "reloads_in_place", False))

    @property
    def supports_adapters(self) -> bool:
        """Whether versions that are adapters over the served weights run on this engine."""
        return bool(getattr(self._current.engine, "supports_adapters", False))

    async def start(self) -> None:
        self._current.engine.start()

    async def close(self) -> None:
        if self._merging is not None:
            self._merging.cancel()
            await asyncio.gather(self._merging, return_exceptions=True)
        stopped: list = []
        for backend in [self._current, *self._draining]:
            if any(backend.engine is e for e in stopped):  # versions sharing one engine
                continue
            stopped.append(backend.engine)
            await asyncio.to_thread(backend.engine.stop)
            release_weights(backend)
        self._draining.clear()
        for thread in self._retiring:  # no engine thread may outlive the interpreter's torch
            await asyncio.to_thread(thread.join)
        self._retiring.clear()

    async def swap(self, model_dir, version: str) -> ModelInfo:
        """Serve `model_dir` as `version` from now on: native engines switch at once to a version
        that is the serving engine's weights plus LoRA adapters (a per-request adapter every new
        request runs with, no load), else load it beside the serving one (strict shapes) and
        switch; in-place engines (vLLM; with --enable-lora it takes adapters too) drain and reload
        their weights."""
        backend = await self._adapter_view(model_dir, version)
        if backend is None:
            if self.reloads_in_place:
                return await self._reload_in_place(model_dir, version)
            if self._loader is None:
                raise InvalidArgument("this generator cannot load other versions")
            backend = await asyncio.to_thread(self._loader, model_dir, version)
            backend.engine.start()
        old, self._current = self._current, backend
        self._draining.append(old)
        self._retire_idle()
        if backend.engine is not old.engine:
            how = backend.info.dtype
        elif backend.adapter:
            how = f"an adapter on the engine of {backend.weights_version}"
        else:
            how = f"the weights of {backend.weights_version}"
        log.info("now serving %s (%s); %d request(s) finishing on %s", version, how, old.active,
                 old.info.model_version)
        self._merge_later(model_dir, version, backend)
        return backend.info

    def _merge_later(self, model_dir, version: str, view: Backend) -> None:
        """With `merge_adapters`, load `version`'s merged weights in the background when `view`
        serves it as an adapter (module docstring); a newer swap cancels an earlier merge."""
        if self._merging is not None:
            self._merging.cancel()
            self._merging = None
        if self.merge_adapters and view.adapter and self._loader is not None \
                and not self.reloads_in_place:
            self._merging = asyncio.get_running_loop().create_task(
                self._merge(model_dir, version, view), name=f"prefloop-merge-{version}")

    async def _merge(self, model_dir, version: str, view: Backend) -> None:
        """Serve `version` from its merged weights on an engine of their own, if `view` is still
        what new requests run on once they are loaded; else drop them. A failed load leaves the
        view serving (logged)."""
        merged: Backend | None = None
        try:
            merged = await asyncio.to_thread(self._loader, model_dir, version)
            if self._current is not view:
                return  # another swap came first (the finally releases the weights)
            merged.engine.start()
            self._current = merged
            self._draining.append(view)
            self._retire_idle()
            log.info("now serving %s from its merged weights (%s, an engine of its own); %d "
                     "request(s) finishing on the adapter over %s", version, merged.info.dtype,
                     view.active, view.weights_version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the view serves on: slower, never wrong
            log.warning("%s stays a per-request adapter on the engine of %s: loading its merged "
                        "weights failed: %s", version, view.weights_version, exc)
        finally:
            if merged is not None and merged is not self._current:
                release_weights(merged)
            if self._merging is asyncio.current_task():
                self._merging = None

    async def _adapter_view(self, model_dir, version: str) -> Backend | None:
        """`version` served on the current engine, with the adapter that turns its weights into
        the version's, or None where that cannot be (full weights of another version, another
        chain, an engine without per-request adapters, a compiled step)."""
        found = await self._engine_adapter(model_dir, version)
        if found is None:
            return None
        host, adapter_id, info = found
        return Backend(host.engine, host.tokenizer, info, owns_weights=host.owns_weights,
                       adapter=adapter_id, weights_version=host.weights_version)

    async def _engine_adapter(self, model_dir, version: str
                              ) -> tuple[Backend, int, ModelInfo] | None:
        """(the backend whose engine now holds `version`'s adapter, the adapter id there — 0 for
        the engine's own weights —, `version`'s ModelInfo), or None where `version` cannot run on
        the current engine as a per-request adapter (full weights of another version, another
        chain, no per-request adapters, a compiled step, a rank over vLLM's limit)."""
        from prefloop.server.model import adapters  # torch: not for the CLI's quick refusals

        host = self._current  # the engine the adapter is made for, whatever swaps meanwhile
        if not getattr(host.engine, "supports_adapters", False):
            return None
        adapter_id = 0
        try:
            factors = await asyncio.to_thread(adapters.chain_factors, Path(model_dir),
                                              host.weights_version)
            if factors is None:
                return None
            if factors:
                adapter_id = await asyncio.to_thread(host.engine.add_adapter, factors)
                preload = getattr(host.engine, "preload_adapter", None)
                if preload is not None:  # vLLM: load it now, so a bad adapter fails the swap
                    await preload(adapter_id)
            info = replace(host.info, model_version=version, model_path=str(model_dir),
                           sampling_defaults=read_sampling_defaults(Path(model_dir)))
        except UnsupportedModel as exc:
            self._drop_adapter(host, adapter_id)
            log.info("%s: not served as an adapter on the engine of %s (%s)", version,
                     host.weights_version, exc)
            return None
        except BaseException:
            self._drop_adapter(host, adapter_id)
            raise
        return host, adapter_id, info

    @staticmethod
    def _drop_adapter(backend: Backend, adapter_id: int) -> None:
        if adapter_id:
            backend.engine.remove_adapter(adapter_id)

    def relabel(self, version: str) -> ModelInfo:
        """Name the weights being served `version` without loading anything (the registry made
        a version that is a copy of them, e.g. v0000 of the served model folder). Requests
        already running keep the name they started with."""
        current = self._current
        current.info = replace(current.info, model_version=version)
        if not current.adapter:
            current.weights_version = version
        log.info("now serving %s (the same weights, registered as that version)", version)
        return self._current.info

    async def load_beside(self, model_dir, version: str) -> "Generator | AdapterGenerator":
        """A Generator serving `version` next to this one (an A/B test's candidate). A LoRA
        adapter version over the version served here runs on this engine, each of its requests
        with the adapter (server/model/lora.py): a few MB instead of a second copy of the weights
        and KV cache. Anything else gets its own engine and KV cache, same options. Engines that
        reload in place (vLLM) hold one copy of the weights and cannot."""
        adapter = await self._load_adapter(model_dir, version)
        if adapter is not None:
            return adapter
        if self.reloads_in_place or self._loader is None:
            raise FailedPrecondition(
                f"the {self.info.backend} backend holds one set of weights: an A/B candidate must "
                f"be a LoRA adapter version over {self._current.weights_version} served with "
                "--enable-lora (or serve with --backend native, which loads a second engine)")
        generator = Generator(await asyncio.to_thread(self._loader, model_dir, version),
                              self._loader)
        await generator.start()
        return generator

    async def _load_adapter(self, model_dir, version: str) -> "AdapterGenerator | None":
        """`version` as a per-request adapter on the serving engine, or None where it cannot be
        (see `_engine_adapter`)."""
        if not self._admitting.is_set():  # an in-place reload replaces the weights: after it
            await self._admitting.wait()
        found = await self._engine_adapter(model_dir, version)
        if found is None:
            return None
        host, adapter_id, info = found
        log.info("%s serves as a LoRA adapter on the engine of %s", version, host.weights_version)
        slot = AdapterSlot(host, adapter_id, info)
        self._slots.add(slot)
        return AdapterGenerator(self, slot)

    def release_slot(self, slot: "AdapterSlot") -> None:
        """An adapter served beside is over (its requests have finished): unload it, and stop
        its engine if the control moved to another one meanwhile."""
        self._slots.discard(slot)
        if self._engine_in_use(slot.backend.engine):
            self._drop_adapter(slot.backend, slot.adapter_id)
        else:
            self._stop_engine(slot.backend)

    async def _reload_in_place(self, model_dir, version: str) -> ModelInfo:
        """Hold new requests, let running ones finish on the old weights (every version served on
        this engine), reload, resume. Refused while an adapter candidate runs on the engine: its
        adapter was made for the weights being replaced."""
        backend = self._current
        model_dir = Path(model_dir)
        self._refuse_reload_under_slots(version)
        tokenizer = await asyncio.to_thread(Tokenizer, model_dir)  # fails before anything waits
        self._admitting.clear()
        try:
            on_engine = [b for b in [backend, *self._draining] if b.engine is backend.engine]
            running = sum(b.active for b in on_engine)
            if running:
                log.info("swap to %s: waiting for %d running request(s) to finish on %s", version,
                         running, backend.info.model_version)
            while any(b.active for b in on_engine):
                await asyncio.sleep(0.01)
            self._refuse_reload_under_slots(version)  # one may have started during the drain
            await backend.engine.reload_weights(model_dir)
            for old in on_engine:  # every adapter was over the weights just replaced
                if old.adapter:
                    backend.engine.remove_adapter(old.adapter)
            self._draining = [b for b in self._draining if b.engine is not backend.engine]
            backend.tokenizer = tokenizer
            backend.adapter, backend.weights_version = 0, version
            backend.info = replace(backend.info, model_version=version, model_path=str(model_dir),
                                   sampling_defaults=read_sampling_defaults(model_dir))
        finally:
            self._admitting.set()
        log.info("now serving %s (%s, weights reloaded in place)", version, backend.info.dtype)
        return backend.info

    def _refuse_reload_under_slots(self, version: str) -> None:
        engine = self._current.engine
        if any(slot.backend.engine is engine for slot in self._slots):
            raise Unavailable(
                f"an A/B test's candidate runs as an adapter over {self._current.weights_version} "
                f"on this engine; {version} (whose weights replace them) is served once the test "
                "is over")

    def _retire_idle(self) -> None:
        for backend in [b for b in self._draining if b.active == 0]:
            self._draining.remove(backend)
            if self._engine_in_use(backend.engine):  # only this version's adapter goes
                self._drop_adapter(backend, backend.adapter)
            else:
                self._stop_engine(backend)
        backend = None  # the retire thread holds the last reference

    def _engine_in_use(self, engine) -> bool:
        """Whether a version served here (current, draining, or beside) still runs on `engine`."""
        users = [self._current, *self._draining, *(slot.backend for slot in self._slots)]
        return any(b.engine is engine for b in users)

    def _stop_engine(self, backend: Backend) -> None:
        thread = threading.Thread(target=_stop_and_release, args=([backend],),
                                  name="prefloop-retire")
        thread.start()
        self._retiring.append(thread)

    def prompt_ids(self, prompt: str) -> list[int]:
        check_prompt_text(prompt)
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     slot: "AdapterSlot | None" = None) -> AsyncIterator[CompletionDelta]:
        """Stream the request on the current version, or with `slot` on that adapter."""
        if not self._admitting.is_set():  # an in-place reload is running: start after it
            await self._admitting.wait()
        backend = self._current if slot is None else slot.backend  # the whole request stays here
        backend.active += 1
        self._by_request[request_id] = backend
        version = backend.info.model_version if slot is None else slot.info.model_version
        decoders = [IncrementalDecoder(backend.tokenizer, params.stop) for _ in range(params.n)]
        done = [False] * params.n
        adapter = backend.adapter if slot is None else slot.adapter_id
        extra = {"adapter": adapter} if adapter else {}
        try:
            async for out in backend.engine.generate(request_id, prompt_ids, params, **extra):
                if done[out.index]:
                    continue
                dec = decoders[out.index]
                reason = out.finish_reason
                text = dec.push(out.new_token_ids, final=reason is not None)
                if dec.stopped and reason is None:
                    reason = "stop"
                    backend.engine.abort(request_id, out.index)
                if reason is not None:
                    done[out.index] = True
                yield CompletionDelta(out.index, text, out.new_token_ids, reason,
                                      out.num_output_tokens, version,
                                      dec.stop_string if reason is not None else None)
                if all(done):
                    return
        finally:
            backend.active -= 1
            self._by_request.pop(request_id, None)
            if backend is not self._current:
                self._retire_idle()

    async def abort(self, request_id: str) -> None:
        backend = self._by_request.get(request_id)
        if backend is not None:
            backend.engine.abort(request_id)

    def stats(self) -> dict:
        stats = asdict(self._current.engine.stats())
        stats["draining_versions"] = len(self._draining)
        return stats


@dataclass(eq=False)
class AdapterSlot:
    """A version served as a per-request LoRA adapter on another version's engine."""

    backend: Backend  # the engine holding the adapter
    adapter_id: int
    info: ModelInfo  # the adapter version's


class AdapterGenerator:
    """The Generator interface of an adapter version served on its base's engine (an A/B test's
    candidate): the host's tokenizer and engine, every request with the adapter."""

    def __init__(self, host: Generator, slot: AdapterSlot):
        self.host, self.slot = host, slot
        self._active: set[str] = set()

    @property
    def info(self) -> ModelInfo:
        return self.slot.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.slot.backend.tokenizer

    @property
    def healthy(self) -> bool:
        return self.slot.backend.engine.healthy

    @property
    def active_requests(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        pass

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.host.prompt_ids(prompt)  # an adapter keeps its base's tokenizer

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.host.chat_ids(messages)

    async def stream(self, request_id: str, prompt_ids: list[int],
                     params: SamplingParams) -> AsyncIterator[CompletionDelta]:
        self._active.add(request_id)
        try:
            async for delta in self.host.stream(request_id, prompt_ids, params, self.slot):
                yield delta
        finally:
            self._active.discard(request_id)

    async def abort(self, request_id: str) -> None:
        await self.host.abort(request_id)

    def stats(self) -> dict:
        return self.host.stats()

    async def close(self) -> None:
        """Unload the adapter (its requests have finished: ABRouter waits for them)."""
        self.host.release_slot(self.slot)


def release_weights(backend: Backend) -> None:
    """Free a stopped backend's model tensors when it owns them (native engines loaded by
    build.load_backend), so a retired version's memory does not wait for the last reference to
    its engine (a finished stream, a task) to go."""
    release = getattr(backend.engine, "release_weights", None)
    if backend.owns_weights and release is not None:
        release()


def _stop_and_release(holder: list[EngineBackend]) -> None:
    """Stop a retired version's engine and give its memory back once nothing holds it
    (memory.py). `holder` is a one-item list, emptied here, so this frame keeps nothing."""
    backend = holder.pop()
    version = backend.info.model_version
    backend.engine.stop()
    release_weights(backend)
    release_when_collected(backend.engine, f"version {version}")
    del backend
