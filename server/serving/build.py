"""Building a Generator: checking the backend options, loading one model version per backend.

`build_generator` validates every option that needs no model (backend, context policy, quantize,
compiler, kernels) before it loads anything, then loads the native engine (`load_backend`) or vLLM
(`load_vllm_backend`); hot-swap reuses the same loader for the next version.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from prefloop.server.engine.async_engine import AsyncEngine
from prefloop.server.engine.context import DEFAULT_KEEP, ContextConfig
from prefloop.server.engine.grammar import GrammarCompiler
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.response_format import DEFAULT_MAX_GRAMMAR_SIZE
from prefloop.server.engine.scheduler import SchedulerConfig
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.compile import check_compiler
from prefloop.server.model.config import ModelConfig, read_sampling_defaults
from prefloop.server.model.kernels import resolve_decode_kernel
from prefloop.server.model.loader import (
    DTYPES,
    load_model,
    read_generation_eos,
    resolve_model_dir,
)
from prefloop.server.model.options import DTYPE_CHOICES, auto_dtype, check_model_path
from prefloop.server.model.packed_linear import resolve_weight_layout
from prefloop.server.model.quant_gemv import KERNELS as QUANT_KERNELS
from prefloop.server.model.quant_gemv import native_available, use_native
from prefloop.server.model.quantize import QUANT_MODES
from prefloop.server.serving.generator import Backend, Generator, ModelInfo
from prefloop.server.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BACKENDS = ("native", "vllm")


def resolve_dtype(dtype: str, device: str) -> str:
    """`--dtype` as a torch dtype name; "auto" is bfloat16 on CUDA or a CPU with native bf16,
    float32 elsewhere, said in one log line."""
    if dtype not in DTYPE_CHOICES and dtype not in DTYPES:
        raise InvalidArgument(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    chosen, why = auto_dtype(device, cuda_available=device == "cuda")
    log.info("--dtype auto: %s (%s)", chosen, why)
    return chosen


def build_generator(model: str | None = None, dtype: str = "auto", device: str = "cpu",
                    cache_dir: str | None = None, kv_cache_tokens: int | None = None,
                    kv_cache_gib: float = 1.0, block_size: int | None = None, max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                    model_version: str | None = None, context_overflow: str = "error",
                    context_keep: int = DEFAULT_KEEP, context_discard: int | None = None,
                    backend: str = "native", tensor_parallel_size: int = 1,
                    gpu_memory_utilization: float | None = None,
                    enforce_eager: bool = False, enable_lora: bool = False, max_loras: int = 4,
                    max_lora_rank: int = 64, quantize: str = "none", quant_kernel: str = "auto",
                    compile: bool = False, attention: str = "auto",
                    weight_layout: str = "auto", driver=None,
                    max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE,
                    merge_adapters: bool = False) -> Generator:
    """Load a model (None = the embedded default) and wrap it in an engine and a Generator.

    `dtype` "auto" (default) is bfloat16 on CUDA or on a CPU with native bf16, else float32
    (`resolve_dtype`); pass "float32" where results must match float32 references.

    `context_overflow` (error | truncate | shift), `context_keep` and `context_discard` set what the
    engine does when prompt + max_tokens outgrows the context (server/engine/context.py).
    `quantize` "int8" / "int4" makes the native engine's linear layers weight-only int8 / int4
    (server/model/quantize.py, int4.py); "auto" picks int4 where prefloop's quantized kernels
    make it the fastest mode (`auto_quantize`), else none.
    `compile` runs the native engine's model step through torch.compile (server/model/compile.py).
    `attention` (auto | native | sdpa) picks the native engine's decode attention
    (server/model/kernels.py); `weight_layout` (auto | packed | plain) whether its linear
    weights are prepacked for oneDNN (server/model/packed_linear.py). `driver` decides which
    thread steps the native engines (server/engine/driver.py; None: a thread per engine).
    `backend` "vllm" runs vLLM's AsyncLLM instead of the native engine (with
    `tensor_parallel_size`, `gpu_memory_utilization`, `enforce_eager`, and `enable_lora`,
    `max_loras`, `max_lora_rank` for adapter versions as LoRA requests; the device is the one vLLM
    was built for).
    `merge_adapters`: after a hot-swap to a version served as a per-request adapter, load its
    merged weights in the background and move to them (native only; generator.py).
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:  # checked before the model is loaded
        context = ContextConfig(overflow=context_overflow, keep=context_keep, discard=context_discard)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if quantize not in QUANT_MODES + ("auto",):
        raise InvalidArgument(f"quantize must be one of {QUANT_MODES + ('auto',)}, got {quantize!r}")
    if quant_kernel not in QUANT_KERNELS:
        raise InvalidArgument(f"quant kernel must be one of {QUANT_KERNELS}, got {quant_kernel!r}")
    check_model_path(model)  # a wrong --model fails now, before any kernel build or load
    dtype = resolve_dtype(dtype, "cuda" if backend == "vllm" and torch.cuda.is_available() else device)
    if quantize == "auto":
        quantize = auto_quantize(backend, device, dtype, quant_kernel)
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
            dtype_size = DTYPES[dtype].itemsize
            kv_bytes = (kv_cache_tokens * ModelConfig.from_dir(model_dir).kv_bytes_per_token(dtype_size)
                        if kv_cache_tokens else int(kv_cache_gib * 2**30))
        from prefloop.server.serving.vllm_engine import VllmConfig  # imports vllm: only when asked for
        config = VllmConfig(dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                            kv_cache_bytes=kv_bytes, gpu_memory_utilization=gpu_memory_utilization,
                            block_size=block_size, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens,
                            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                            enable_lora=enable_lora, max_loras=max_loras,
                            max_lora_rank=max_lora_rank)
        return Generator(load_vllm_backend(model_dir, model_version or Path(model_dir).name, config))
    if enable_lora:
        raise InvalidArgument("--enable-lora is a vLLM option; the native engine always serves "
                              "adapter versions over its weights as per-request adapters")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was asked for but no CUDA device is available")
    if device == "cuda" and quantize != "none":
        raise InvalidArgument(f"--quantize {quantize} runs on CPU only (torch's CPU "
                              "weight-only kernels)")
    if quantize == "int8" and dtype == "float32":
        log.warning("--quantize int8 with float32 activations is slower than plain float32 on "
                    "CPU; use --dtype bfloat16 --quantize int8 for speed (docs/performance.md)")
    model_dir = resolve_model_dir(model, cache_dir)  # (checked above; converts a .gguf once)
    if compile:
        check_compiler()  # before the weights are loaded
    # builds the kernel once (or refuses) before anything is loaded
    resolve_decode_kernel(attention, device, DTYPES.get(dtype, torch.float32))
    resolve_weight_layout(weight_layout, device, DTYPES.get(dtype, torch.float32))
    if quantize != "none" and quant_kernel == "native":
        try:  # refused now, before the weights are loaded
            use_native("native", DTYPES.get(dtype, torch.float32))
        except ValueError as exc:
            raise InvalidArgument(f"--quant-kernel native: {exc}") from exc
    loader = functools.partial(
        load_backend, dtype=dtype, device=device,
        cache=KVCacheConfig(block_size=block_size or 16, capacity_tokens=kv_cache_tokens,
                            capacity_gib=kv_cache_gib, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens),
        context=context, quantize=quantize, quant_kernel=quant_kernel, compile=compile,
        attention=attention, weight_layout=weight_layout, driver=driver,
        max_grammar_size=max_grammar_size)
    return Generator(loader(model_dir, model_version or Path(model_dir).name), loader,
                     merge_adapters=merge_adapters)


def auto_quantize(backend: str, device: str, dtype: str, quant_kernel: str) -> str:
    """`--quantize auto`: int4 for the native engine on a CPU in bfloat16 where prefloop's
    integer-dot kernels run (AVX512-VNNI or AVX2) and `--quant-kernel` allows them — there int4 is
    the fastest mode at 1 and 8 streams and ties bf16 at 32, with perplexity within 0.5 % of
    float32 (docs/performance.md) — else none (torch's int4 kernel is no faster than bf16 beyond a
    few streams). Logged with the reason either way."""
    why = None
    if backend != "native" or device != "cpu":
        why = "it is a native-engine CPU option"
    elif dtype != "bfloat16":
        why = f"the dtype is {dtype} (the integer-dot kernels take bfloat16)"
    elif quant_kernel == "torch":
        why = "--quant-kernel torch"
    elif not native_available():
        why = "prefloop's quantized kernels do not run fast on this CPU (no AVX512-VNNI or AVX2)"
    if why is not None:
        log.info("--quantize auto: none, because %s", why)
        return "none"
    log.info("--quantize auto: int4 (bfloat16 with prefloop's integer-dot kernels on this CPU)")
    return "int4"


def _eos_ids(model_dir: Path, config_eos, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: config.json, generation_config.json and the tokenizer's."""
    eos = set(config_eos) | set(read_generation_eos(model_dir))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return tuple(sorted(eos))


def load_backend(model_dir: Path, version: str, *, dtype: str, device: str, cache: KVCacheConfig,
                 scheduler: SchedulerConfig, context, quantize: str = "none", quant_kernel: str = "auto",
                 compile: bool = False, attention: str = "auto", weight_layout: str = "auto",
                 driver=None, max_grammar_size: int = DEFAULT_MAX_GRAMMAR_SIZE) -> Backend:
    """Load one model version (strict: every weight present with the config's shape)."""
    model_dir = Path(model_dir)
    tokenizer = Tokenizer(model_dir)
    llama = load_model(model_dir, dtype=dtype, device=device, quantize=quantize, compile=compile,
                       attention=attention, weight_layout=weight_layout, quant_kernel=quant_kernel)
    eos = _eos_ids(model_dir, llama.config.eos_token_ids, tokenizer)
    grammar = GrammarCompiler.for_model(model_dir, llama.config.vocab_size, eos, max_grammar_size)
    engine = LLMEngine(llama, cache, scheduler, eos_token_ids=eos, context=context, grammar=grammar)
    info = ModelInfo(model_version=version, architecture=llama.config.architecture,
                     context_length=engine.max_model_len,
                     dtype=dtype if quantize == "none" else f"{dtype}+{quantize}", backend="native",
                     model_path=str(model_dir), sampling_defaults=read_sampling_defaults(model_dir))
    quantized = [m for m in llama.modules() if hasattr(m, "native") and hasattr(m, "max_rows")]
    kernels = {"native integer-dot" if m.native else "torch" for m in quantized}
    log.info("loaded %s (%s, %s) with %d KV blocks of %d tokens, %s decode attention, %s linear "
             "weights%s%s", version, info.architecture, info.dtype, engine.blocks.num_blocks,
             cache.block_size, "native" if llama.decode_kernel is not None else "SDPA",
             "packed" if llama.packed_weights else "plain",
             ", fused norm/RoPE/SiLU ops" if llama.fused_ops else "",
             f", {' + '.join(sorted(kernels))} quantized matmuls" if kernels else "")
    return Backend(AsyncEngine(engine, driver), tokenizer, info, owns_weights=True)


def load_vllm_backend(model_dir: Path, version: str, config) -> Backend:
    """One model version on vLLM (`config` is a `vllm_engine.VllmConfig`); swaps reload in place."""
    from prefloop.server.serving.vllm_engine import VllmEngine

    model_dir = Path(model_dir)
    tokenizer = Tokenizer(model_dir)
    eos = _eos_ids(model_dir, ModelConfig.from_dir(model_dir).eos_token_ids, tokenizer)
    engine = VllmEngine(model_dir, config, eos)
    info = ModelInfo(model_version=version, architecture=engine.model_config.architecture,
                     context_length=engine.max_model_len, dtype=config.dtype, backend="vllm",
                     model_path=str(model_dir), sampling_defaults=read_sampling_defaults(model_dir))
    log.info("loaded %s (%s, %s) on vLLM, tensor parallel %d", version, info.architecture,
             config.dtype, config.tensor_parallel_size)
    return Backend(engine, tokenizer, info)
