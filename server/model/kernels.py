"""The native decode-attention kernel (server/model/csrc/paged_decode.cpp): building, loading, choosing.

`--attention` picks how decode tokens attend over the paged KV cache on CPU:
- `native`: the C++ kernel, which reads the cache in place through the block tables on torch's own
  thread pool (no gather copy, no mask); faster than gather + SDPA per call and per step
  (docs/performance.md, "The vectorized native paged decode-attention kernel"). Built once with
  torch's extension builder (g++/clang++ and ninja, `-O3 -march=native`; the build time is in
  docs/performance.md) into prefloop's cache
  (`<cache>/kernels/<name>`, cache = $PREFLOOP_CACHE_DIR or ~/.cache/prefloop), the name keyed by
  the sources, the flags, this CPU's flags, the torch version and torch's install path — so two
  virtualenvs on one machine each keep their own build instead of rebuilding each other's; later
  starts load the built library in well under a second. A start killed mid-build is finished by
  the next one (`_one_builder`), which before 2026-12-07 waited forever on the dead build's lock.
- `sdpa`: gather the context blocks and call torch's scaled_dot_product_attention (the portable
  path; also what CUDA and prefill chunks always use).
- `auto` (default): `native` on CPU when the kernel builds, else `sdpa` with a warning saying why.

The same library carries the eager fused norm / residual / RoPE / SiLU ops (server/model/csrc/fused_ops.cpp):
`load_model` turns them on (`LlamaModel.fused_ops`) for bfloat16 whenever the decode kernel is in use,
the batched LoRA update (server/model/csrc/lora_update.cpp) that per-request adapters use on CPU, and
the integer-dot int4 / int8 matmuls of quantized decode steps (server/model/csrc/quant_gemv.cpp).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from prefloop.server.errors import InvalidArgument
from prefloop.server.model.compile import has_cxx_compiler
from prefloop.server.model.default_model import cache_root
from prefloop.server.model.options import ATTENTION_CHOICES

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
# built into the same library: eager-mode fused norm / residual / RoPE / SiLU ops (LlamaModel.fused_ops)
FUSED_SOURCE = Path(__file__).parent / "csrc" / "fused_ops.cpp"
# and the batched LoRA update of one projection (server/model/lora.py)
LORA_SOURCE = Path(__file__).parent / "csrc" / "lora_update.cpp"
# and the integer-dot int4 / int8 matmuls of quantized decode steps (server/model/quant_gemv.py)
QUANT_SOURCE = Path(__file__).parent / "csrc" / "quant_gemv.cpp"
# and a decode layer in one call (LlamaModel's decode-only steps on quantized or packed bf16 weights)
LAYER_SOURCE = Path(__file__).parent / "csrc" / "decode_layer.cpp"
SOURCES = (SOURCE, FUSED_SOURCE, LORA_SOURCE, QUANT_SOURCE, LAYER_SOURCE)
HEADERS = (Path(__file__).parent / "csrc" / "vec_math.h",)
# -fopenmp: at::parallel_for's OpenMP pragmas must be compiled in (the symbols resolve to torch's
# own libgomp, so the kernel runs on torch's thread pool); without it the kernel is single-threaded.
# PREFLOOP_KERNEL_MARCH (default native) builds for another CPU level, e.g. `haswell` (AVX2, no
# AVX-512) to test and measure that path of the kernels on a newer CPU; a separate build (the flags
# are in its name).
CFLAGS = ["-O3", f"-march={os.environ.get('PREFLOOP_KERNEL_MARCH', 'native')}", "-fopenmp"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what paged_decode.cpp is instantiated for

DecodeKernel = Callable[..., torch.Tensor]  # (q, k_cache, v_cache, block_tables, ctx_lens, scale) -> out

_lock = threading.Lock()
_loaded: DecodeKernel | None = None
_failure: str | None = None


class NativeAttentionUnavailable(InvalidArgument):
    """`--attention native` was asked for and the kernel cannot be built or loaded here."""

    def __init__(self, reason: str):
        super().__init__(f"--attention native: the decode-attention kernel is not available: {reason}; "
                         "use --attention sdpa (or auto) to run without it")
        self.reason = reason


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_name(torch_version: str | None = None, install_path: str | None = None) -> str:
    """The library's name: a hash of everything the built file depends on. torch's version and
    install path are in it (default: this process's), so each virtualenv has its own build: torch
    rebuilds a library whose inputs changed (another venv's include paths), so one shared name
    made two venvs rebuild each other's kernels at every start."""
    torch_version = torch_version or torch.__version__
    install_path = install_path or f"{Path(torch.__file__).resolve().parent}:{sys.prefix}"
    # -march=native: a library built on one CPU must not load on another (shared home folders).
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(code + " ".join(CFLAGS).encode() + torch_version.encode()
                         + install_path.encode() + _cpu_flags().encode())
    return f"prefloop_kernels_{key.hexdigest()[:16]}"


def build_dir(name: str | None = None) -> Path:
    """Where the library is built and cached: `<cache>/kernels/<name>` (cache = $PREFLOOP_CACHE_DIR
    or ~/.cache/prefloop)."""
    return cache_root() / "kernels" / (name or build_name())


def _missing_tools() -> str | None:
    if not has_cxx_compiler():
        return "no C++ compiler on PATH (install g++ or set CXX)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability
        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


TORCH_BATON = "lock"  # the file torch's extension builder holds while it builds (FileBaton)


@contextlib.contextmanager
def _one_builder(directory: Path):
    """Build in `directory` one process at a time, and survive a builder that was killed.

    torch's builder guards a build with a plain file (`lock`) that the waiting processes poll
    for; a builder killed mid-build (SIGKILL, OOM, a reboot) leaves it behind, and every later
    start then waits on it forever — or, once someone deletes it, loads a library that was never
    linked. So prefloop's processes first take an advisory lock on their own file (`flock`: the
    kernel drops it when its holder dies, however it dies). Whoever holds it is the only one of
    them building here, so a `lock` file it finds was left by a dead builder: it is removed, and
    torch's builder (ninja) finishes what the dead one started instead of trusting it."""
    with open(directory / ".build.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            baton = directory / TORCH_BATON
            if baton.exists():
                log.warning("removing %s, left by a kernel build that did not finish (a killed "
                            "process); building again", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def load_decode_kernel() -> DecodeKernel:
    """Build (first time on this machine) and load the kernel; raises NativeAttentionUnavailable
    saying why when it cannot. Loaded once per process (the op library can be registered once)."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is None:
            _failure = _missing_tools()
        if _failure is None:
            try:
                from torch.utils.cpp_extension import load
                log.info("building/loading prefloop's CPU kernels (first build ≈ 25 s on 2 cores)")
                name = build_name()
                directory = build_dir(name)
                directory.mkdir(parents=True, exist_ok=True)
                with _one_builder(directory):
                    load(name=name, sources=[str(src) for src in SOURCES], extra_cflags=CFLAGS,
                         build_directory=str(directory), is_python_module=False, verbose=False)
                _loaded = torch.ops.prefloop_kernels.paged_decode
                return _loaded
            except Exception as e:  # compiler errors, a broken build folder, a locked-down /tmp ...
                _failure = f"building it failed: {type(e).__name__}: {str(e).strip()[-400:]}"
        raise NativeAttentionUnavailable(_failure)


def resolve_decode_kernel(choice: str, device: str | torch.device,
                          dtype: torch.dtype = torch.float32) -> DecodeKernel | None:
    """The kernel to use for `--attention choice` on `device` with `dtype` weights and cache, or
    None for the SDPA path."""
    if choice not in ATTENTION_CHOICES:
        raise InvalidArgument(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    on_cpu = torch.device(device).type == "cpu"
    if choice == "sdpa":
        return None
    if choice == "native":
        if not on_cpu:
            raise InvalidArgument("--attention native is a CPU kernel; on CUDA use --attention sdpa or auto")
        if dtype not in KERNEL_DTYPES:
            raise InvalidArgument(f"--attention native supports float32 and bfloat16, not {dtype}; "
                                  "use --attention sdpa or auto")
        return load_decode_kernel()
    if not on_cpu or dtype not in KERNEL_DTYPES:
        return None
    try:
        return load_decode_kernel()
    except NativeAttentionUnavailable as e:
        log.warning("native decode-attention kernel not available (%s); decoding with SDPA instead "
                    "(slower at high concurrency)", e.reason)
        return None
