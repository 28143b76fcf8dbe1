"""Keep what an align job's process frees for its next step, instead of handing it back to the
kernel and faulting it in again.

glibc's malloc serves every request over its mmap threshold (at most 32 MiB) with a fresh `mmap`
and returns it with `munmap` on free. A training step on a CPU allocates and frees the same
large temporaries every step — the logits of a batch of whole answers over a 49,152-token
vocabulary are hundreds of MB — so each step faults every page of them in again, zero-filled by
the kernel: 1.5 million page faults a KTO step on 256-token answers, a fifth of the job's CPU time
spent in the kernel (`benchmarks/kto_step_profile.py --heap`, docs/align.md "Measured").
`keep_freed_memory` tells malloc to serve large requests from its heap and keep freed memory there
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 1 GiB)`): the next step reuses it. The
process holds on to its peak memory until it exits — right for a job, which exits when done, so
`prefloop align` runs it when it is the process's own command (cli/main.py), not when a caller
imports the CLI. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept, up to this much


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory in the process (module docstring). True when it
    did; False where the C library is not glibc or refused."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl and macOS lack it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc keeps freed memory: %s", kept)
    return kept
