"""Give the memory of an unloaded model version back to the operating system.

A hot-swap loads the new version beside the serving one, and an A/B test loads a second engine;
when the old one is retired its tensors are freed, but glibc's allocator keeps much of what it
freed (its mmap threshold rises after the first large frees, so later weight-sized blocks come
from heaps that are only trimmed at their top). Without this the server's RSS stepped up by a
whole model after a swap and fell back only later and partly (docs/reliability.md, 60 minutes
of steady load). `release_freed_memory` runs a garbage collection and `malloc_trim(0)`, which
returns every free page of every arena, and logs what it gave back. It does nothing on a C
library without `malloc_trim` (musl, macOS). `release_when_collected` waits, on a thread of its
own, until the unloaded object is really gone (a stepping loop or a finishing stream may hold it a
moment longer than the code that retired it) and releases then. `limit_malloc_arenas` and
`limit_shape_caches` bound what a long-running server keeps: glibc's arenas, and the CPU matmul
caches keyed by shape.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident set size (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()
_M_ARENA_MAX = -8  # glibc's mallopt parameter
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the server starts its threads). Each thread that
    allocates while another holds an arena gets an arena of its own (up to 8 per core); the
    worker threads that load a hot-swapped version or an A/B candidate each left fragments in
    theirs, and the served RSS stepped up with every load (docs/reliability.md). An explicit
    MALLOC_ARENA_MAX in the environment wins. Whether the cap was set."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_ARENA_MAX, arenas) == 1


SHAPE_CACHE_ENTRIES = 64
# torch's ideep computation cache and oneDNN's primitive cache: 1024 entries each by default
_SHAPE_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def limit_shape_caches(entries: int = SHAPE_CACHE_ENTRIES) -> dict[str, str]:
    """Cap the CPU matmul caches keyed by shape (call before the process's first matmul); the
    variables it set. torch's ideep and oneDNN each keep up to 1024 matmul primitives, one per
    shape seen, some with a scratchpad sized to it; a server sees a new row count at almost every
    prefill chunk, so both filled for hours with entries that never hit again: 1,500 shapes of
    one 576x1536 bf16 linear held +650 MB, and the 60-minute soak's RSS crept up by 10-30 MB per
    A/B cycle (docs/reliability.md). Decode steps reuse a few shapes every step, so they stay in
    an LRU cache of 64 (decode tok/s unchanged, measured there); with no cache at all a step is
    3.5x slower. A value in the environment wins."""
    set_now = {}
    for name in _SHAPE_CACHES:
        if not os.environ.get(name):
            os.environ[name] = set_now[name] = str(entries)
    return set_now


def release_freed_memory(what: str) -> int | None:
    """Collect garbage and trim the allocator after `what` was unloaded; the bytes of RSS given
    back (None when they cannot be measured)."""
    before = rss_bytes()
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    after = rss_bytes()
    if before is None or after is None:
        return None
    log.info("unloaded %s: resident memory %.0f -> %.0f MB", what, before / 2**20, after / 2**20)
    return before - after


def release_when_collected(obj: Any, what: str, timeout: float = 60.0) -> threading.Thread:
    """Release (as `release_freed_memory`) once `obj` has been garbage collected, or after
    `timeout` seconds whatever holds it; the caller must drop its own references to `obj`."""
    gone = threading.Event()
    weakref.finalize(obj, gone.set)

    def wait() -> None:
        for _ in range(int(timeout / 0.5)):
            if gone.wait(0.5):
                break
            gc.collect()  # a reference cycle may be all that holds it
        release_freed_memory(what)

    thread = threading.Thread(target=wait, name="prefloop-release", daemon=True)
    thread.start()
    return thread
