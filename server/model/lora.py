"""Per-request LoRA adapters over one base model: each sequence of a batch runs with its own
adapter (or none), as Punica / S-LoRA serve many adapters from one copy of the weights.

An A/B test whose candidate is an adapter over the served version then costs the adapter's few MB
instead of a second engine (weights and KV cache). `enable(model)` wraps the four projections of
every block (fused q/k/v, o, fused gate/up, down) in `LoraLinear`; `add_adapter(model, id,
factors)` stores an adapter's factors in them, fused the way the base weights are (q/k/v: A
stacked, B block-diagonal; gate/up the same); the model runner marks which token rows of a step
use which adapter (`AttentionMetadata.adapter_rows`, read here through step_context.py; None for
"every row", the common case once a version served as an adapter is CURRENT), and each wrapped
projection adds `(x[rows] @ A.T) @ B.T` (B carries the LoRA scale) to those rows. With no
adapter rows in a step a wrapped projection costs one dictionary look-up. Adapter ids are never
reused, so prefix-cache blocks computed under one adapter can never be matched under another.

Only eager steps: under `torch.compile` the row grouping is data dependent, so `supports(model)`
is False and callers load a second engine instead.
"""
from __future__ import annotations

import torch
from torch import nn

from prefloop.server.errors import UnsupportedModel
from prefloop.server.model.step_context import current_adapter_rows

# fused projection of a block -> the HF projections it stacks, in output order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


class LoraLinear(nn.Module):
    """A projection plus the LoRA update of the adapters its step's rows use."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (A [r, in], B [out, r])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = current_adapter_rows()
        if rows:
            for adapter_id, index in rows.items():
                factors = self.adapters.get(adapter_id)
                if factors is None:
                    continue
                a, b = factors
                if index is None:  # every row of the step: no gather, one fused add
                    y.addmm_(x @ a.t(), b.t())
                else:
                    y.index_add_(0, index, (x.index_select(0, index) @ a.t()) @ b.t())
        return y


def supports(model: nn.Module) -> bool:
    """Whether this model can serve per-request adapters (eager steps only)."""
    return not getattr(model, "compiled", False)


def _block_modules(model: nn.Module):
    for i, layer in enumerate(model.layers):
        for fused in FUSED:
            owner_name, attr = fused.split(".")
            yield i, fused, getattr(layer, owner_name), attr


def enable(model: nn.Module) -> None:
    """Wrap every block projection in a LoraLinear (once; idempotent)."""
    if not supports(model):
        raise UnsupportedModel("per-request adapters need eager steps (serve without --compile)")
    for _, _, owner, attr in _block_modules(model):
        module = getattr(owner, attr)
        if not isinstance(module, LoraLinear):
            setattr(owner, attr, LoraLinear(module))


def fused_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """HF-named factors {"model.layers.3.self_attn.q_proj.weight": (A [r, in], B*scale [out, r])}
    -> {(layer, fused projection): (A, B)} in the model's dtype, fused like its weights."""
    cfg = model.config
    out_sizes = {"self_attn.q_proj": cfg.num_heads * cfg.head_dim,
                 "self_attn.k_proj": cfg.num_kv_heads * cfg.head_dim,
                 "self_attn.v_proj": cfg.num_kv_heads * cfg.head_dim,
                 "self_attn.o_proj": cfg.hidden_size,
                 "mlp.gate_proj": cfg.intermediate_size, "mlp.up_proj": cfg.intermediate_size,
                 "mlp.down_proj": cfg.hidden_size}
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
    in_sizes = {"self_attn.q_proj": cfg.hidden_size, "self_attn.k_proj": cfg.hidden_size,
                "self_attn.v_proj": cfg.hidden_size, "self_attn.o_proj": cfg.num_heads * cfg.head_dim,
                "mlp.gate_proj": cfg.hidden_size, "mlp.up_proj": cfg.hidden_size,
                "mlp.down_proj": cfg.intermediate_size}
    remaining = dict(factors)
    fused: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(cfg.num_layers):
        for target, parts in FUSED.items():
            found = [(p, remaining.pop(f"model.layers.{layer}.{p}.weight", None)) for p in parts]
            if all(f is None for _, f in found):
                continue
            total_out = sum(out_sizes[p] for p in parts)
            a_parts = []
            rank = sum(f[0].shape[0] for _, f in found if f is not None)
            b = torch.zeros(total_out, rank)
            row, col = 0, 0
            for part, f in found:
                if f is not None:
                    a, bp = f
                    if bp.shape[0] != out_sizes[part] or a.shape[1] != in_sizes[part]:
                        raise UnsupportedModel(
                            f"adapter factors of layer {layer} {part} map {a.shape[1]} -> "
                            f"{bp.shape[0]}, the model {in_sizes[part]} -> {out_sizes[part]}")
                    a_parts.append(a)
                    b[row:row + out_sizes[part], col:col + a.shape[0]] = bp
                    col += a.shape[0]
                row += out_sizes[part]
            fused[(layer, target)] = (torch.cat(a_parts).to(device, dtype).contiguous(),
                                      b.to(device, dtype).contiguous())
    if remaining:
        raise UnsupportedModel(f"adapter changes weights per-request serving does not cover: "
                               f"{sorted(remaining)[:3]}")
    return fused


def add_adapter(model: nn.Module, adapter_id: int,
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Store an adapter under `adapter_id` (enabling the wrappers first); its bytes."""
    enable(model)
    fused = fused_factors(model, factors)
    size = 0
    for layer, target, owner, attr in _block_modules(model):
        f = fused.get((layer, target))
        if f is not None:
            getattr(owner, attr).adapters[adapter_id] = f
            size += f[0].nbytes + f[1].nbytes
    return size


def remove_adapter(model: nn.Module, adapter_id: int) -> None:
    for _, _, owner, attr in _block_modules(model):
        module = getattr(owner, attr)
        if isinstance(module, LoraLinear):
            module.adapters.pop(adapter_id, None)
