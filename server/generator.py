"""Generator: the text-level front of a backend — tokenize, stream token deltas as text, stop strings.

Both `prefloop generate` and the gRPC servicers use it. It owns the tokenizer and chat template,
incremental detokenization and stop strings; the engine below it sees token ids only, through the
`EngineBackend` protocol (server/engine_protocol.py), so the same Generator serves the native
engine (`load_backend`) and vLLM (`load_vllm_backend`).

Hot-swap keeps one promise on both: no request fails, and every response names the version that
produced all of its tokens. Native: the new version is loaded beside the old one and new requests
move to it while running ones finish on the old weights. vLLM (one copy of the weights, reloaded in
place): new requests wait while running ones finish, the weights are reloaded, then they start.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import AsyncIterator

import torch

from .async_engine import AsyncEngine
from .context_shift import DEFAULT_KEEP, ContextConfig
from .engine import LLMEngine
from .engine_protocol import EngineBackend
from .errors import InvalidArgument
from .kv_cache import KVCacheConfig
from .model_config import ModelConfig
from .model_loader import DTYPES, load_model, read_generation_eos, resolve_model_dir
from .native_attention import resolve_decode_kernel
from .packed_linear import resolve_weight_layout
from .quantize import QUANT_MODES
from .torch_compile import check_compiler
from .sampling_params import SamplingParams
from .scheduler import SchedulerConfig
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

BACKENDS = ("native", "vllm")


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

    engine: EngineBackend
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
        self._admitting = asyncio.Event()  # cleared while an in-place reload drains and reloads
        self._admitting.set()

    @property
    def info(self) -> ModelInfo:
        return self._current.info

    @property
    def healthy(self) -> bool:
        return self._current.engine.healthy

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
        """Serve `model_dir` as `version` from now on: native engines load it beside the serving
        one (strict shapes) and switch; in-place engines (vLLM) drain and reload their weights."""
        if self._current.engine.reloads_in_place:
            return await self._reload_in_place(model_dir, version)
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

    async def _reload_in_place(self, model_dir, version: str) -> ModelInfo:
        """Hold new requests, let running ones finish on the old weights, reload, resume."""
        backend = self._current
        model_dir = Path(model_dir)
        tokenizer = await asyncio.to_thread(Tokenizer, model_dir)  # fails before anything waits
        self._admitting.clear()
        try:
            if backend.active:
                log.info("swap to %s: waiting for %d running request(s) to finish on %s", version,
                         backend.active, backend.info.model_version)
            while backend.active:
                await asyncio.sleep(0.01)
            await backend.engine.reload_weights(model_dir)
            backend.tokenizer = tokenizer
            backend.info = replace(backend.info, model_version=version, model_path=str(model_dir))
        finally:
            self._admitting.set()
        log.info("now serving %s (%s, weights reloaded in place)", version, backend.info.dtype)
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
        if not self._admitting.is_set():  # an in-place reload is running: start after it
            await self._admitting.wait()
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
                    kv_cache_gib: float = 1.0, block_size: int | None = None, max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                    model_version: str | None = None, context_overflow: str = "error",
                    context_keep: int = DEFAULT_KEEP, context_discard: int | None = None,
                    backend: str = "native", tensor_parallel_size: int = 1,
                    gpu_memory_utilization: float | None = None,
                    enforce_eager: bool = False, quantize: str = "none",
                    compile: bool = False, attention: str = "auto",
                    weight_layout: str = "auto") -> Generator:
    """Load a model (None = the embedded default) and wrap it in an engine and a Generator.

    `context_overflow` (error | truncate | shift), `context_keep` and `context_discard` set what the
    engine does when prompt + max_tokens outgrows the context (server/context_shift.py).
    `quantize` "int8" makes the native engine's linear layers weight-only int8 (server/quantize.py).
    `compile` runs the native engine's model step through torch.compile (server/torch_compile.py).
    `attention` (auto | native | sdpa) picks the native engine's decode attention
    (server/native_attention.py); `weight_layout` (auto | packed | plain) whether its linear
    weights are prepacked for oneDNN (server/packed_linear.py).
    `backend` "vllm" runs vLLM's AsyncLLM instead of the native engine (with
    `tensor_parallel_size`, `gpu_memory_utilization`, `enforce_eager`; the device is the one vLLM
    was built for).
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:  # checked before the model is loaded
        context = ContextConfig(overflow=context_overflow, keep=context_keep, discard=context_discard)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if quantize not in QUANT_MODES:
        raise InvalidArgument(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
    if backend == "vllm":
        if quantize != "none":
            raise InvalidArgument("--quantize is a native-engine option; vLLM reads the "
                                  "quantization of the checkpoint itself")
        if compile:
            raise InvalidArgument("--compile is a native-engine option; vLLM compiles by default "
                                  "(--enforce-eager turns that off)")
        if attention != "auto":
            raise InvalidArgument("--attention is a native-engine option; vLLM picks its own "
                                  "attention backend")
        if weight_layout != "auto":
            raise InvalidArgument("--weight-layout is a native-engine option; vLLM lays out its "
                                  "own weights")
        if context.overflow != "error":
            raise InvalidArgument(f"--context-overflow {context.overflow} needs the native backend; "
                                  "with --backend vllm a request that does not fit is rejected")
        model_dir = resolve_model_dir(model, cache_dir)
        kv_bytes = None
        if gpu_memory_utilization is None:
            dtype_size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
            kv_bytes = (kv_cache_tokens * ModelConfig.from_dir(model_dir).kv_bytes_per_token
                        * dtype_size // 4 if kv_cache_tokens else int(kv_cache_gib * 2**30))
        from .vllm_engine import VllmConfig  # imports vllm: only when asked for
        config = VllmConfig(dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                            kv_cache_bytes=kv_bytes, gpu_memory_utilization=gpu_memory_utilization,
                            block_size=block_size, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens,
                            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager)
        return Generator(load_vllm_backend(model_dir, model_version or Path(model_dir).name, config))
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was asked for but no CUDA device is available")
    if device == "cuda" and quantize != "none":
        raise InvalidArgument("--quantize int8 runs on CPU only (torch's int8-weight kernel)")
    if quantize == "int8" and dtype == "float32":
        log.warning("--quantize int8 with float32 activations is slower than plain float32 on "
                    "CPU; use --dtype bfloat16 --quantize int8 for speed (docs/performance.md)")
    if compile:
        check_compiler()  # before the weights are loaded
    # builds the kernel once (or refuses) before anything is loaded
    resolve_decode_kernel(attention, device, DTYPES.get(dtype, torch.float32))
    resolve_weight_layout(weight_layout, device, DTYPES.get(dtype, torch.float32))
    model_dir = resolve_model_dir(model, cache_dir)
    loader = functools.partial(
        load_backend, dtype=dtype, device=device,
        cache=KVCacheConfig(block_size=block_size or 16, capacity_tokens=kv_cache_tokens,
                            capacity_gib=kv_cache_gib, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
        context=context, quantize=quantize, compile=compile, attention=attention,
        weight_layout=weight_layout)
    return Generator(loader(model_dir, model_version or Path(model_dir).name), loader)


def _eos_ids(model_dir: Path, config_eos, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: config.json, generation_config.json and the tokenizer's."""
    eos = set(config_eos) | set(read_generation_eos(model_dir))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return tuple(sorted(eos))


def load_backend(model_dir: Path, version: str, *, dtype: str, device: str, cache: KVCacheConfig,
                 scheduler: SchedulerConfig, context, quantize: str = "none",
                 compile: bool = False, attention: str = "auto", weight_layout: str = "auto") -> Backend:
    """Load one model version (strict: every weight present with the config's shape)."""
    model_dir = Path(model_dir)
    tokenizer = Tokenizer(model_dir)
    llama = load_model(model_dir, dtype=dtype, device=device, quantize=quantize, compile=compile,
                       attention=attention, weight_layout=weight_layout)
    eos = _eos_ids(model_dir, llama.config.eos_token_ids, tokenizer)
    engine = LLMEngine(llama, cache, scheduler, eos_token_ids=eos, context=context)
    info = ModelInfo(model_version=version, architecture=llama.config.architecture,
                     context_length=engine.max_model_len,
                     dtype=dtype if quantize == "none" else f"{dtype}+{quantize}", backend="native",
                     model_path=str(model_dir))
    log.info("loaded %s (%s, %s) with %d KV blocks of %d tokens, %s decode attention, %s linear "
             "weights%s", version, info.architecture, dtype, engine.blocks.num_blocks, cache.block_size,
             "native" if llama.decode_kernel is not None else "SDPA",
             "packed" if llama.packed_weights else "plain",
             ", fused norm/RoPE/SiLU ops" if llama.fused_ops else "")
    return Backend(AsyncEngine(engine), tokenizer, info)


def load_vllm_backend(model_dir: Path, version: str, config) -> Backend:
    """One model version on vLLM (`config` is a `vllm_engine.VllmConfig`); swaps reload in place."""
    from .vllm_engine import VllmEngine

    model_dir = Path(model_dir)
    tokenizer = Tokenizer(model_dir)
    eos = _eos_ids(model_dir, ModelConfig.from_dir(model_dir).eos_token_ids, tokenizer)
    engine = VllmEngine(model_dir, config, eos)
    info = ModelInfo(model_version=version, architecture=engine.model_config.architecture,
                     context_length=engine.max_model_len, dtype=config.dtype, backend="vllm",
                     model_path=str(model_dir))
    log.info("loaded %s (%s, %s) on vLLM, tensor parallel %d", version, info.architecture,
             config.dtype, config.tensor_parallel_size)
    return Backend(engine, tokenizer, info)
