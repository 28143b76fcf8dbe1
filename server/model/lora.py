"""Per-request LoRA adapters over one base model: each sequence of a batch runs with its own
adapter (or none), as Punica / S-LoRA serve many adapters from one copy of the weights.

An A/B test whose candidate is an adapter over the served version then costs the adapter's few MB
instead of a second engine (weights and KV cache). `enable(model)` wraps the four projections of
every block (fused q/k/v, o, fused gate/up, down) in `LoraLinear`; `add_adapter(model, id,
factors)` stores an adapter's factors in them, fused the way the base weights are (q/k/v: A
stacked, B block-diagonal; gate/up the same); the model runner says which adapter each token row
of a step uses (`StepAdapters`, in `AttentionMetadata.adapter_rows`, read here through
step_context.py), and each wrapped projection adds the LoRA update (B carries the LoRA scale):

On CPU, a step of up to KERNEL_ROWS rows (decode) runs the whole update of a projection as one
call of the native kernel (server/model/csrc/lora_update.cpp, built with the decode-attention
kernel): the step's adapters' float32 factors stacked once per set of adapters (A of each side by
side, B on top of each other; made when an adapter is added, alone and beside each adapter already
loaded: `prepare_stacks`), each row given the range of stacked columns its adapter owns
(`StepAdapters.ranges`, built once per step and rank layout, shared by every layer), rows on the
plain weights an empty range. For a bfloat16 model on a CPU with AVX512_BF16 the stacked factors
are kept in bfloat16 with pairs of rows interleaved, so one vdpbf16ps instruction does 32
multiply-adds; rank rows of B that are zero in a whole block of outputs (the fused q/k/v and
gate/up B are block-diagonal) are skipped. In eager PyTorch the same update took 3-4 small ops per
projection (two matmuls, a mask, an add, casts) of ~40 us each at a few rows (oneDNN's fixed
cost), 120 projections a step; decode with adapters ran at 0.6-0.8x of the plain weights
(docs/performance.md).

Elsewhere (CUDA, no C++ compiler, prefill chunks above KERNEL_ROWS rows) it runs in torch:

- every row on one adapter (the common case once a version served as an adapter is CURRENT):
  `y += (x @ A.T) @ B.T`, two small matmuls;
- anything else (an A/B test: two adapters, or one adapter and the plain weights, rows mixed):
  `y += ((x @ A_all.T) * M) @ B_all.T` over the stacked factors, where the 0/1 mask M [rows,
  ranks] keeps each row's own adapter's columns (built once per step and rank layout). Exact:
  the other adapters' columns are multiplied by zero.

The factors are kept in float32 and, for a bfloat16 model, also in bfloat16 (made at first use):
a torch step of fewer than SMALL_ROWS rows computes the update in float32 (x converted, the update
added into the bfloat16 output), a larger one in bfloat16 (float32 at 32 rows cost 35-85 us per
projection against ~40 us in bfloat16). With no adapter in a step a wrapped projection costs one
look-up. Adapter ids are never reused, so prefix-cache blocks computed under one adapter can never
be matched under another.

Only eager steps: under `torch.compile` the row grouping is data dependent, so `supports(model)`
is False and callers load a second engine instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from prefloop.server.errors import UnsupportedModel
from prefloop.server.model.step_context import current_adapter_rows

log = logging.getLogger(__name__)

# fused projection of a block -> the HF projections it stacks, in output order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


_MISSING = object()
MAX_STACKS = 8  # (adapter combination, dtype) stacks a projection keeps
FACTOR_DTYPE = torch.float32  # the dtype the factors are given and kept in
SMALL_ROWS = 16  # torch steps with fewer rows compute the update in float32 (module docstring)
KERNEL_ROWS = 64  # steps with at most this many rows use the native kernel on CPU
KERNEL_BLOCK = 128  # output columns per block of the kernel's second phase (lora_update.cpp)


@dataclass(slots=True)
class StepAdapters:
    """Which adapter each token row of one step uses (built by the model runner)."""

    ids: tuple[int, ...]  # the adapters of the step, sorted (one stack per set, whatever the order)
    every_row: int = 0  # the one adapter every row uses; 0: rows differ
    rows: tuple[int, ...] = ()  # the adapter id of each row (0: none)
    masks: dict = field(default_factory=dict)  # rank layout -> [rows, ranks] 0/1 mask
    spans: dict = field(default_factory=dict)  # rank layout -> [rows, 2] int32 column ranges

    @classmethod
    def of(cls, row_adapters: list[int]) -> "StepAdapters | None":
        """From the adapter id of each row (0: the plain weights); None when no row has one."""
        ids = tuple(sorted({a for a in row_adapters if a}))
        if not ids:
            return None
        if len(ids) == 1 and all(row_adapters):
            return cls(ids, every_row=ids[0], rows=tuple(row_adapters))
        return cls(ids, rows=tuple(row_adapters))

    def ranges(self, layout: tuple) -> torch.Tensor:
        """[rows, 2] int32: the stacked columns [start, end) of each row's adapter in `layout`
        ((id, rank) in stacking order); (0, 0) for a row on the plain weights (cached for the
        step)."""
        spans = self.spans.get(layout)
        if spans is None:
            owned, start = {}, 0
            for adapter_id, rank in layout:
                owned[adapter_id] = (start, start + rank)
                start += rank
            spans = torch.tensor([owned.get(a, (0, 0)) for a in self.rows], dtype=torch.int32)
            self.spans[layout] = spans
        return spans

    def mask(self, layout: tuple, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 where a row's adapter owns a column of the stacked factors (cached for the step)."""
        mask = self.masks.get((layout, dtype))
        if mask is None:
            row_ids = torch.tensor(self.rows, device=columns.device)
            mask = (row_ids[:, None] == columns[None, :]).to(dtype)
            self.masks[(layout, dtype)] = mask
        return mask


class LoraLinear(nn.Module):
    """A projection plus the LoRA update of the adapters its step's rows use."""

    def __init__(self, base: nn.Module, kernel=None):
        super().__init__()
        self.base = base
        self._base_forward = base.forward  # not base(x): no module-call machinery per step
        self.kernel = kernel  # the native update (lora_update.cpp) on CPU, else None
        # bfloat16 steps use the kernel's bfloat16 rank-pair form where the CPU has AVX512_BF16
        self.pairs = kernel is not None and torch.ops.prefloop_kernels.lora_bf16_pairs()
        # (adapter ids, pairs) -> (at, bt, live, layout) in the kernel's form, or None
        self._kernel_stacks: dict[tuple, tuple | None] = {}
        # id -> (A.T [in, r], B.T [r, out]) in float32, transposed once here, not at every step
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cast: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        # (adapter ids, dtype) -> (A.T side by side [in, R], B.T stacked [R, out], owner of each
        # column, layout)
        self._stacks: dict[tuple, tuple | None] = {}

    def set_adapter(self, adapter_id: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Store (A [r, in], B [out, r]) under `adapter_id`; None removes it."""
        if factors is None:
            self.adapters.pop(adapter_id, None)
        else:
            a, b = factors
            self.adapters[adapter_id] = (a.t().contiguous().to(FACTOR_DTYPE),
                                         b.t().contiguous().to(FACTOR_DTYPE))
        # only the stacks that hold this adapter are stale (an A/B candidate added beside the
        # served adapter leaves that one's stack as it is)
        self._cast = {k: v for k, v in self._cast.items() if k[0] != adapter_id}
        self._stacks = {k: v for k, v in self._stacks.items() if adapter_id not in k[0]}
        self._kernel_stacks = {k: v for k, v in self._kernel_stacks.items() if adapter_id not in k[0]}

    def _factors(self, adapter_id: int, dtype: torch.dtype) -> tuple | None:
        factors = self.adapters.get(adapter_id)
        if factors is None or dtype == FACTOR_DTYPE:
            return factors
        cast = self._cast.get((adapter_id, dtype))
        if cast is None:
            cast = self._cast[(adapter_id, dtype)] = (factors[0].to(dtype), factors[1].to(dtype))
        return cast

    def _stack(self, ids: tuple[int, ...], dtype: torch.dtype) -> tuple | None:
        present = [(i, self._factors(i, dtype)) for i in ids if i in self.adapters]
        stack = None
        if present:
            at = torch.cat([f[0] for _, f in present], dim=1)
            bt = torch.cat([f[1] for _, f in present])
            layout = tuple((i, f[1].shape[0]) for i, f in present)
            columns = torch.tensor([i for i, r in layout for _ in range(r)], device=at.device)
            stack = (at, bt, columns, layout)
        if len(self._stacks) >= MAX_STACKS:
            self._stacks.clear()
        self._stacks[(ids, dtype)] = stack
        return stack

    def _kernel_stack(self, ids: tuple[int, ...], pairs: bool) -> tuple | None:
        """The factors of `ids` stacked in the native kernel's form: float32 A.T side by side
        [in, R] and B.T on top [R, out], or (`pairs`) the same in bfloat16 with consecutive rows
        interleaved ([in/2, R, 2], [R/2, out, 2]; ranks padded to even with a zero column); the
        uint8 [rows of bt, blocks] map of which rank rows have a non-zero in each block of
        KERNEL_BLOCK outputs; and the (id, rank) layout of the columns."""
        present = [(i, self.adapters[i]) for i in ids if i in self.adapters]
        stack = None
        if present:
            parts = []
            for i, (at, bt) in present:
                if pairs and at.shape[1] % 2:
                    at = torch.nn.functional.pad(at, (0, 1))
                    bt = torch.nn.functional.pad(bt, (0, 0, 0, 1))
                parts.append((i, at, bt))
            if len(parts) == 1:  # one adapter: its own factors (float32), no copy
                at, bt = parts[0][1], parts[0][2]
            else:
                at = torch.cat([p[1] for p in parts], dim=1)
                bt = torch.cat([p[2] for p in parts])
            layout = tuple((i, a.shape[1]) for i, a, _ in parts)
            (fin, rank), fout = at.shape, bt.shape[1]
            blocks = -(-fout // KERNEL_BLOCK)
            padded = torch.nn.functional.pad(bt, (0, blocks * KERNEL_BLOCK - fout))
            live = padded.view(rank, blocks, KERNEL_BLOCK).ne(0).any(-1)
            if pairs:
                at = at.to(torch.bfloat16).view(fin // 2, 2, rank).transpose(1, 2)
                bt = bt.to(torch.bfloat16).view(rank // 2, 2, fout).transpose(1, 2)
                live = live.view(rank // 2, 2, blocks).any(1)
            stack = (at.contiguous(), bt.contiguous(), live.to(torch.uint8).contiguous(), layout)
        if len(self._kernel_stacks) >= MAX_STACKS:
            self._kernel_stacks.clear()
        self._kernel_stacks[(ids, pairs)] = stack
        return stack

    def prepare(self, ids: tuple[int, ...], dtype: torch.dtype) -> None:
        """Build the kernel's stack of the adapters `ids` (sorted) for steps in `dtype` now, not on
        the first step that uses them (for a rank-16 adapter of the default model ~37 ms at the
        first step of an A/B test)."""
        if self.kernel is None or dtype not in (torch.bfloat16, torch.float32):
            return
        in_features = next(iter(self.adapters.values()))[0].shape[0] if self.adapters else 0
        key = self._stack_key(ids, dtype, in_features)
        if key not in self._kernel_stacks:
            self._kernel_stack(*key)

    def _stack_key(self, ids: tuple[int, ...], dtype: torch.dtype, in_features: int) -> tuple:
        """(ids, whether the stack is in bfloat16 rank pairs): the kernel stacks' key."""
        return ids, dtype is torch.bfloat16 and self.pairs and in_features % 2 == 0

    def native_update(self, step: StepAdapters, dtype: torch.dtype, in_features: int):
        """The native update's (at, bt, ranges, live) for this step's rows (what `forward` passes
        the kernel, for a one-call decode layer: server/model/csrc/decode_layer.cpp); None when no
        adapter of the step touches this projection; False when the update cannot run natively
        (no kernel: CUDA, no compiler; a dtype it does not take)."""
        if self.kernel is None or dtype not in (torch.bfloat16, torch.float32):
            return False
        key = self._stack_key(step.ids, dtype, in_features)
        stack = self._kernel_stacks.get(key, _MISSING)
        if stack is _MISSING:
            stack = self._kernel_stack(*key)
        if stack is None:
            return None
        return stack[0], stack[1], step.ranges(stack[3]), stack[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (per decode step this runs 120 times: attribute look-ups kept few, measured)
        y = self._base_forward(x)
        step = current_adapter_rows()
        if step is None:
            return y
        dtype = x.dtype
        if x.shape[0] <= KERNEL_ROWS and y.dtype is dtype and x.dim() == 2:
            update = self.native_update(step, dtype, x.shape[1])
            if update is not False:
                if update is not None:
                    self.kernel(y, x if x.stride(-1) == 1 else x.contiguous(), *update)
                return y
        dtype = FACTOR_DTYPE if x.shape[0] < SMALL_ROWS else x.dtype
        if step.every_row:  # one adapter on every row: no mask, two matmuls
            factors = self._factors(step.every_row, dtype)
            if factors is not None:
                _add_update(y, x.to(dtype) @ factors[0], factors[1])
            return y
        key = (step.ids, dtype)
        stack = self._stacks[key] if key in self._stacks else self._stack(step.ids, dtype)
        if stack is not None:
            at, bt, columns, layout = stack
            xa = x.to(dtype) @ at
            xa.mul_(step.mask(layout, columns, dtype))
            _add_update(y, xa, bt)
        return y


def _add_update(y: torch.Tensor, xa: torch.Tensor, bt: torch.Tensor) -> None:
    """y += xa @ bt: fused when y is float32 too, else computed in float32 and added."""
    if y.dtype == bt.dtype:
        y.addmm_(xa, bt)
    else:
        y.add_(xa @ bt)


def supports(model: nn.Module) -> bool:
    """Whether this model can serve per-request adapters (eager steps only)."""
    return not getattr(model, "compiled", False)


def _block_modules(model: nn.Module):
    for i, layer in enumerate(model.layers):
        for fused in FUSED:
            owner_name, attr = fused.split(".")
            yield i, fused, getattr(layer, owner_name), attr


def native_kernel(device: torch.device | str = "cpu"):
    """The native LoRA update for a model on `device` (building prefloop's kernel library the
    first time on this machine), or None (CUDA; no compiler: the torch path, reason logged)."""
    if torch.device(device).type != "cpu":
        return None
    from prefloop.server.model.kernels import NativeAttentionUnavailable, load_decode_kernel
    try:
        load_decode_kernel()
    except NativeAttentionUnavailable as e:
        log.warning("native LoRA kernel not available (%s); adapters run in torch (slower)", e.reason)
        return None
    return torch.ops.prefloop_kernels.lora_add_.default


def enable(model: nn.Module, use_kernel: bool = True) -> None:
    """Wrap every block projection in a LoraLinear (once; idempotent); `use_kernel=False` keeps
    the torch path even on CPU (tests compare the two)."""
    if not supports(model):
        raise UnsupportedModel("per-request adapters need eager steps (serve without --compile)")
    kernel = native_kernel(model.embed_tokens.weight.device) if use_kernel else None
    for _, _, owner, attr in _block_modules(model):
        module = getattr(owner, attr)
        if not isinstance(module, LoraLinear):
            setattr(owner, attr, LoraLinear(module, kernel))


def fused_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """HF-named factors {"model.layers.3.self_attn.q_proj.weight": (A [r, in], B*scale [out, r])}
    -> {(layer, fused projection): (A, B)} in FACTOR_DTYPE on the model's device, fused like
    its weights."""
    cfg = model.config
    out_sizes = {"self_attn.q_proj": cfg.num_heads * cfg.head_dim,
                 "self_attn.k_proj": cfg.num_kv_heads * cfg.head_dim,
                 "self_attn.v_proj": cfg.num_kv_heads * cfg.head_dim,
                 "self_attn.o_proj": cfg.hidden_size,
                 "mlp.gate_proj": cfg.intermediate_size, "mlp.up_proj": cfg.intermediate_size,
                 "mlp.down_proj": cfg.hidden_size}
    dtype, device = FACTOR_DTYPE, model.embed_tokens.weight.device
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
            getattr(owner, attr).set_adapter(adapter_id, f)
            size += f[0].nbytes + f[1].nbytes
    prepare_stacks(model, adapter_id)
    model.adapter_generation = getattr(model, "adapter_generation", 0) + 1  # cached step arguments
    return size


def prepare_stacks(model: nn.Module, adapter_id: int) -> None:
    """Build the native kernel's stacks of `adapter_id` alone and beside each other adapter (an
    A/B test of two adapter versions), up to MAX_STACKS / 2 - 1 of them, so that the first steps
    that use them do not."""
    dtype = model.embed_tokens.weight.dtype
    for _, _, owner, attr in _block_modules(model):
        module = getattr(owner, attr)
        if not isinstance(module, LoraLinear) or adapter_id not in module.adapters:
            continue
        others = [i for i in module.adapters if i != adapter_id][: MAX_STACKS // 2 - 1]
        for ids in [(adapter_id,)] + [tuple(sorted((adapter_id, i))) for i in others]:
            module.prepare(ids, dtype)


def remove_adapter(model: nn.Module, adapter_id: int) -> None:
    for _, _, owner, attr in _block_modules(model):
        module = getattr(owner, attr)
        if isinstance(module, LoraLinear):
            module.set_adapter(adapter_id, None)
    model.adapter_generation = getattr(model, "adapter_generation", 0) + 1
