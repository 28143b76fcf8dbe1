"""oneDNN-prepacked weights for the native engine's linear layers on CPU (`--weight-layout`).

On CPU, `F.linear` hands oneDNN each weight in the plain [out, in] layout, and oneDNN copies it into
its blocked GEMM layout inside every call. For decode that copy is a large share of the step's
matmul time (measured in docs/performance.md, "Prepacked linear weights"). Here every linear
layer's weight is reordered once, at load (`torch.ops.mkldnn._reorder_linear_weight`), and
multiplied by `torch.ops.mkldnn._linear_pointwise`: the same oneDNN GEMM without the per-call copy.
bfloat16 results are bit-identical to `F.linear`. float32 ones are summed in another order: the
default model's logits stay close to a float64 forward, but not within the 1e-4 of transformers'
float32 forward that the parity tests hold the default to (the differences are in
docs/performance.md).

`--weight-layout` choices:
- `packed`: prepack every linear layer (attention, MLP, LM head; with `--quantize int8` the
  dequantized weight its large batches multiply by); refused where oneDNN cannot (CUDA, float16
  without AVX512-FP16, a torch build without oneDNN).
- `plain`: torch's `F.linear` on the weights as loaded.
- `auto` (default): `packed` for bfloat16 on CPU when oneDNN packs (same numbers, faster), else
  `plain`; float32 packs only when asked for (faster matmuls, but outside the parity margin above).

A packed weight is an opaque oneDNN tensor: the model keeps no plain copy (a tied LM head packs
its own copy of the embedding, which the embedding lookup keeps). Hot swaps load and pack a new
model, so nothing is ever repacked in place.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from prefloop.server.errors import InvalidArgument
from prefloop.server.model.options import LAYOUT_CHOICES

log = logging.getLogger(__name__)

# oneDNN picks its blocking for this many rows; measured on the default model (bf16 and fp32),
# 32 was as fast as a hint of 1 for one token and as 128 for 256-token prefill chunks.
PACK_HINT_ROWS = 32
_PROBE: dict[torch.dtype, str | None] = {}  # dtype -> why packing fails here (None: it works)


class WeightPackingUnavailable(InvalidArgument):
    """`--weight-layout packed` was asked for where oneDNN cannot pack the weights."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight in oneDNN's blocked layout (an opaque tensor for `packed_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_HINT_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ packed.T (+ bias) -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_unavailable(device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why weights of `dtype` on `device` cannot be prepacked here, or None when they can."""
    if torch.device(device).type != "cpu":
        return "oneDNN weight packing is a CPU path"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if dtype not in _PROBE:  # e.g. float16 needs AVX512-FP16 / AVX-NE-CONVERT
        try:
            w = torch.ones(8, 16, dtype=dtype)
            out = packed_linear(torch.ones(2, 16, dtype=dtype), pack_weight(w), None)
            _PROBE[dtype] = None if bool((out == 16).all()) else "a packed test product came out wrong"
        except RuntimeError as e:
            _PROBE[dtype] = f"oneDNN cannot pack {dtype} here: {str(e).strip()[:200]}"
    return _PROBE[dtype]


def resolve_weight_layout(choice: str, device: str | torch.device, dtype: torch.dtype) -> bool:
    """True when `--weight-layout choice` means prepacked weights for `dtype` on `device`."""
    if choice not in LAYOUT_CHOICES:
        raise InvalidArgument(f"--weight-layout must be one of {', '.join(LAYOUT_CHOICES)}, got {choice!r}")
    if choice == "plain" or (choice == "auto" and dtype != torch.bfloat16):
        return False
    reason = packing_unavailable(device, dtype)
    if choice == "packed" and reason:
        raise WeightPackingUnavailable(f"--weight-layout packed: {reason}; use --weight-layout plain "
                                       "(or auto)")
    if reason and torch.device(device).type == "cpu":
        log.warning("linear weights stay in the plain layout (%s): slower matmuls on CPU", reason)
    return reason is None


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight was prepacked by oneDNN (no plain copy kept)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a buffer, not a plain attribute: torch.compile then treats it as a graph input, so a
        # hot-swapped model of the same shapes reuses the compiled graphs
        self.register_buffer("packed", pack_weight(linear.weight), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _packed_linear_op(x, self.packed, self.bias)
        return packed_linear(x, self.packed, self.bias)


# Under torch.compile the oneDNN call is an opaque op: inductor cannot trace the opaque packed
# tensor itself (it fails on a module attribute of the mkldnn layout).
@torch.library.custom_op("prefloop::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return packed_linear(x, packed, bias)


@_packed_linear_op.register_fake
def _(x, packed, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def pack_model(model: nn.Module) -> nn.Module:
    """Prepack every linear layer of `model` in place (nn.Linear -> PackedLinear; a layer that
    offers `pack_dense()`, e.g. Int8Linear, packs its own large-batch weight); returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
            elif hasattr(child, "pack_dense"):
                child.pack_dense()
    return model
