"""The per-step state every attention layer reads, and the attention call as one opaque op.

`LlamaModel.forward` publishes the step's KV caches and `AttentionMetadata` here (thread-local:
each engine runs its steps on its own thread, and during a hot swap two engines step at once);
each layer then calls `layer_attention(q, k, v, layer_idx, scale)`, which writes the new K/V into
that layer's cache and attends over it.

Under `torch.compile` the call goes through the custom op `prefloop::layer_attention`, which the
compiler treats as a black box: the dense math around it (norms, projections, RoPE, MLP) is traced
into one graph with a dynamic token count, while the paged attention (Python-built metadata,
variable prefill chunks, in-place cache writes) keeps running eagerly. This is the same split
vLLM uses for its compiled CPU/GPU graphs.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from prefloop.server.model.attention import AttentionMetadata, paged_attention, write_kv

_state = threading.local()


@contextmanager
def step_context(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata):
    """Make the step's caches and metadata visible to the layers for the duration of a forward."""
    previous = getattr(_state, "step", None)
    _state.step = (kv_caches, meta)
    try:
        yield
    finally:
        _state.step = previous


def current_step():
    """(kv_caches, AttentionMetadata) of the step being run, or None outside one."""
    return getattr(_state, "step", None)


def current_adapter_rows():
    """The step's `StepAdapters` (server/model/lora.py: which adapter each token row uses); None
    outside a step or when no sequence of the step uses an adapter."""
    step = current_step()
    return None if step is None else step[1].adapter_rows


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    step = getattr(_state, "step", None)
    if step is None:
        raise RuntimeError("layer attention called outside step_context (LlamaModel.forward sets it)")
    kv_caches, meta = step
    k_cache, v_cache = kv_caches[layer_idx]
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)  # rotated once, at the absolute position
    return paged_attention(q, k_cache, v_cache, meta, scale)


@torch.library.custom_op("prefloop::layer_attention", mutates_args=())
def _layer_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                        scale: float) -> torch.Tensor:
    # The KV cache it writes is not an argument: the compiled graph never sees the cache.
    return _attend(q, k, v, layer_idx, scale)


@_layer_attention_op.register_fake
def _(q, k, v, layer_idx, scale):
    return torch.empty_like(q)


def layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                    scale: float) -> torch.Tensor:
    """Write k/v [n, kvh, hd] at the step's slots in layer `layer_idx`'s cache; attend with q [n, H, hd]."""
    if torch.compiler.is_compiling():
        return _layer_attention_op(q, k, v, layer_idx, scale)
    return _attend(q, k, v, layer_idx, scale)  # eager: skip the dispatcher round trip
