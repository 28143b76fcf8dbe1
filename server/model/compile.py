"""`--compile`: the model step through torch.compile (inductor), and the checks around it.

What is compiled is `LlamaModel.step_logits`: embedding, every layer's norms, projections, RoPE
and MLP, the final norm and the LM head, as one graph whose token count is dynamic (one graph for
single-token steps, one for the rest). Attention is the opaque op of `server/model/step_context.py`.
Inductor fuses the elementwise work (RMSNorm + residual, RoPE, SiLU x up) into a few C++ loops and
removes most of the per-op Python dispatch: measured in docs/performance.md.

Costs: a C++ compiler at run time (inductor writes C++), and tens of seconds of compilation
(docs/performance.md, "Start-up costs") when the first engine of a process starts (inductor's
on-disk cache makes later starts quicker; another engine on a model of the same shapes, e.g. a
hot-swapped version, reuses the graphs). The engine compiles at start-up (`ModelRunner.warm_up`),
never on a user's request.
"""
from __future__ import annotations

import logging
import os
import shutil

import torch

from prefloop.server.errors import InvalidArgument

log = logging.getLogger(__name__)

# Every engine (one per served version, a new one per hot swap) compiles its own model instance;
# dynamo's default of 8 cached graphs per function would silently fall back to eager after a few
# swaps.
RECOMPILE_LIMIT = 64


class CompileUnavailable(InvalidArgument):
    """torch.compile cannot run here (no C++ compiler for inductor)."""


def has_cxx_compiler() -> bool:
    """A C++ compiler on PATH (or $CXX): inductor and torch's extension builder both need one."""
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++"))


def check_compiler() -> None:
    if not has_cxx_compiler():
        raise CompileUnavailable("--compile needs a C++ compiler for torch inductor (g++ or clang++ on "
                                 "PATH, or CXX set); install one (e.g. apt install g++) or run without "
                                 "--compile")


def compiled_step(fn):
    """torch.compile `fn` (LlamaModel.step_logits) with a dynamic token count and no graph breaks."""
    check_compiler()
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * RECOMPILE_LIMIT)
    log.info("compiling the model step with torch.compile (inductor); the first start takes 25-100 s on 2 cores")
    return torch.compile(fn, dynamic=True, fullgraph=True)
