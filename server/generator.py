"""Generator: the text-level front of a backend — tokenize, stream token deltas as text, stop strings.

Both `prefloop generate` and the gRPC servicers use it. It owns the tokenizer and chat template,
incremental detokenization and stop strings; the engine below it sees token ids only.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator

import torch

from .async_engine import AsyncEngine
from .context_shift import DEFAULT_KEEP, ContextConfig
from .engine import LLMEngine
from .errors import InvalidArgument
from .kv_cache import KVCacheConfig
from .model_loader import load_model, read_generation_eos, resolve_model_dir
from .sampling_params import SamplingParams
from .scheduler import SchedulerConfig
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInfo:
    model_version: str
    architecture: str
    context_length: int
    dtype: str
    backend: str
    model_path: str


@dataclass(slots=True)
class CompletionDelta:
    index: int  # which of the request's n candidates
    text_delta: str
    token_ids: list[int]  # token ids produced in this delta
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" on the last one
    completion_tokens: int  # tokens generated so far for this candidate
    model_version: str = ""  # the weights that produced it (fixed for the whole request)


@dataclass(eq=False)
class Backend:
    """One loaded model version: its engine, tokenizer and description."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    info: ModelInfo
    active: int = 0  # requests streaming on it


class Generator:
    """Serves requests on the current Backend; `swap` moves new requests to another version while
    requests already running finish on the weights (and KV cache) they started with."""

    def __init__(self, backend: Backend, loader=None):
        self._current = backend
        self._loader = loader  # (model_dir, version) -> Backend, for swap()
        self._draining: list[Backend] = []
        self._by_request: dict[str, Backend] = {}
        self._retiring: list[threading.Thread] = []

    @property
    def info(self) -> ModelInfo:
        return self._current.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._current.tokenizer

    async def start(self) -> None:
        self._current.engine.start()

    async def close(self) -> None:
        for backend in [self._current, *self._draining]:
            await asyncio.to_thread(backend.engine.stop)
        self._draining.clear()
        for thread in self._retiring:  # no engine thread may outlive the interpreter's torch
            await asyncio.to_thread(thread.join)
        self._retiring.clear()

    async def swap(self, model_dir, version: str) -> ModelInfo:
        """Load `model_dir` beside the serving model (strict shapes), then switch to it."""
        if self._loader is None:
            raise InvalidArgument("this generator cannot load other versions")
        backend = await asyncio.to_thread(self._loader, model_dir, version)
        backend.engine.start()
        old, self._current = self._current, backend
        self._draining.append(old)
        self._retire_idle()
        log.info("now serving %s (%s); %d request(s) finishing on %s", version, backend.info.dtype,
                 old.active, old.info.model_version)
        return backend.info

    def _retire_idle(self) -> None:
        for backend in [b for b in self._draining if b.active == 0]:
            self._draining.remove(backend)
            thread = threading.Thread(target=backend.engine.stop, name="prefloop-retire")
            thread.start()
            self._retiring.append(thread)

    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidArgument("prompt is empty")
        return self.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    async def stream(self, request_id: str, prompt_ids: list[int],
                     params: SamplingParams) -> AsyncIterator[CompletionDelta]:
        backend = self._current  # the whole request stays on these weights
        backend.active += 1
        self._by_request[request_id] = backend
        version = backend.info.model_version
        decoders = [IncrementalDecoder(backend.tokenizer, params.stop) for _ in range(params.n)]
        done = [False] * params.n
        try:
            async for out in backend.engine.generate(request_id, prompt_ids, params):
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
                                      out.num_output_tokens, version)
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


def build_generator(model: str | None = None, dtype: str = "float32", device: str = "cpu",
                    cache_dir: str | None = None, kv_cache_tokens: int | None = None,
                    kv_cache_gib: float = 1.0, block_size: int = 16, max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                    model_version: str | None = None, context_overflow: str = "error",
                    context_keep: int = DEFAULT_KEEP, context_discard: int | None = None) -> Generator:
    """Load a model (None = the embedded default) and wrap it in an engine and a Generator.

    `context_overflow` (error | truncate | shift), `context_keep` and `context_discard` set what the
    engine does when prompt + max_tokens outgrows the context (server/context_shift.py).
    """
    try:  # checked before the model is loaded
        context = ContextConfig(overflow=context_overflow, keep=context_keep, discard=context_discard)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was asked for but no CUDA device is available")
    model_dir = resolve_model_dir(model, cache_dir)
    loader = functools.partial(
        load_backend, dtype=dtype, device=device,
        cache=KVCacheConfig(block_size=block_size, capacity_tokens=kv_cache_tokens,
                            capacity_gib=kv_cache_gib, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
        context=context)
    return Generator(loader(model_dir, model_version or Path(model_dir).name), loader)


def load_backend(model_dir: Path, version: str, *, dtype: str, device: str, cache: KVCacheConfig,
                 scheduler: SchedulerConfig, context) -> Backend:
    """Load one model version (strict: every weight present with the config's shape)."""
    model_dir = Path(model_dir)
    tokenizer = Tokenizer(model_dir)
    llama = load_model(model_dir, dtype=dtype, device=device)
    eos = set(llama.config.eos_token_ids) | set(read_generation_eos(model_dir))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = LLMEngine(llama, cache, scheduler, eos_token_ids=tuple(sorted(eos)), context=context)
    info = ModelInfo(model_version=version, architecture=llama.config.architecture,
                     context_length=engine.max_model_len, dtype=dtype, backend="native",
                     model_path=str(model_dir))
    log.info("loaded %s (%s, %s) with %d KV blocks of %d tokens", version, info.architecture,
             dtype, engine.blocks.num_blocks, cache.block_size)
    return Backend(AsyncEngine(engine), tokenizer, info)
