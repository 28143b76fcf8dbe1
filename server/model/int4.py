"""Weight-only 4-bit quantization of the native engine's linear layers (`--quantize int4`).

Group-wise and asymmetric, as llama.cpp's Q4_1: every `group` (default 32) input channels of an
output row share a scale and a zero point, w ≈ (q - 8) * scale + zero with q in 0..15, where zero
= min + 8 * scale of the group. Small batches (one or a few decoding streams: memory-bound, the
weights dominate the bytes read) run on weights packed two per byte, a quarter of bf16's bytes:
prefloop's integer-dot kernel where it runs fast (bfloat16 layers on an AVX512-VNNI or AVX2 CPU; the
activations rounded to int8 in groups of 32, as llama.cpp does: server/model/quant_gemv.py), else
torch's CPU int4 kernel `aten._weight_int4pack_mm_for_cpu`; larger batches (compute-bound) multiply
by the dequantized weight, built once on first use, so both paths compute with the same
quantized weights. Embeddings and norms stay as they are.

The kernel takes groups of 32, 64, 128 or 256 and output sizes that are multiples of 16; a layer
that does not fit (a small test model's) is quantized to int8 instead (quantize.py), and which
layers did is logged. The LM head is int8 by default (`head="int8"`): per-row int8 keeps the
logits closer to full precision at a small cost in bytes (docs/performance.md measures both).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from prefloop.server.model.packed_linear import pack_weight, packed_linear
from prefloop.server.model.quant_gemv import max_rows_for, pack_int4, unpack_int4, use_native

log = logging.getLogger(__name__)

INT4_GROUP = 32  # input channels per scale and zero point
INT4_GROUPS = (32, 64, 128, 256)  # what the CPU kernel takes


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """Can the CPU int4 kernel run a layer of this shape with groups of `group`?"""
    return group in INT4_GROUPS and out_features % 16 == 0 and in_features % group == 0


def quantize_groups(weight: torch.Tensor, group: int = INT4_GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in] uint8 in 0..15, scales [out, in/group], zeros [out, in/group]) in float32,
    with weight ≈ (q - 8) * scale + zero per group."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"{in_f} input channels are not a whole number of groups of {group}")
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    zeros = lo + 8.0 * scales
    return q.reshape(out_f, in_f), scales, zeros


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight that (q, scales, zeros) stand for."""
    out_f, in_f = q.shape
    groups = scales.shape[1]
    w = (q.float().reshape(out_f, groups, in_f // groups) - 8.0) * scales[..., None] + zeros[..., None]
    return w.reshape(out_f, in_f)


class Int4Linear(nn.Module):
    """`kernel`: "auto" / "torch" / "native", which small-batch kernel (server/model/quant_gemv.py)."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP, max_rows: int | None = None,
                 kernel: str = "auto"):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if not int4_fits(out_f, in_f, group):
            raise ValueError(f"the int4 kernel cannot run a {out_f}x{in_f} layer in groups of {group}")
        dtype = linear.weight.dtype
        q, scales, zeros = quantize_groups(linear.weight, group)
        self.native = use_native(kernel, dtype, group)
        if self.native:  # [out/16, in/32, 320]: nibbles, scales and zeros per block of 16 outputs
            self.register_buffer("packed", pack_int4(q, scales.to(dtype), zeros.to(dtype)))
            self.scales_and_zeros = None
        else:
            self.register_buffer(
                "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # [in/group, out, 2]: the kernel's layout of (scale, zero)
            self.register_buffer(
                "scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype))
        self.dtype = dtype
        self.bias = linear.bias
        self.group = group
        self.max_rows = max_rows_for(self.native, max_rows)  # batches up to this take the int4 kernel
        self.out_features, self.in_features = out_f, in_f
        self._dense: torch.Tensor | None = None

    def weight_float(self) -> torch.Tensor:
        """The dequantized weight in float32 (the oracle of the tests, and of `dequantized`)."""
        if self.native:
            q, scales, zeros = unpack_int4(self.packed)
            return dequantize_groups(q, scales.float(), zeros.float())
        sz = self.scales_and_zeros.float().transpose(0, 1)  # [out, in/group, 2]
        q = _unpack(self.packed, self.out_features, self.in_features)
        return dequantize_groups(q, sz[..., 0], sz[..., 1])

    def dequantized(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.weight_float().to(self.dtype).contiguous()
        return self._dense

    def prepare_for_compile(self) -> None:
        self.dequantized()  # built now: a traced graph must not create module state

    def pack_dense(self) -> None:
        """Keep the large-batch weight prepacked by oneDNN (server/model/packed_linear.py)."""
        self._dense = pack_weight(self.dequantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            out = _int4_linear_op(x, self.packed, self.scales_and_zeros, self._dense, self.group,
                                  self.max_rows)
        else:
            out = _int4_linear(x, self.packed, self.scales_and_zeros, self.dequantized(), self.group,
                               self.max_rows)
        return out if self.bias is None else out + self.bias


def _unpack(packed: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """q [out, in] uint8 back from the kernel's packing, found by running the kernel on the
    identity: exact, and whatever the packed layout is."""
    eye = torch.eye(in_f, dtype=torch.float32)
    unit = torch.zeros(in_f // 32, out_f, 2)  # groups of 32 divide every layer that fits
    unit[..., 0] = 1.0  # scale 1, zero 0: the kernel returns q - 8
    cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, 32, unit)  # [in, out]
    return (cols.t() + 8.0).round().to(torch.uint8)


def _int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None,
                 dense: torch.Tensor, group: int, max_rows: int) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        if scales_and_zeros is None:  # the native layout (scales inside)
            return torch.ops.prefloop_kernels.int4_gemv(x, packed)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group,
                                                          scales_and_zeros)
    return packed_linear(x, dense, None) if dense.is_mkldnn else F.linear(x, dense)


# Under torch.compile one opaque op, as int8's (quantize.py).
@torch.library.custom_op("prefloop::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None,
                    dense: torch.Tensor, group: int, max_rows: int) -> torch.Tensor:
    return _int4_linear(x, packed, scales_and_zeros, dense, group, max_rows)


@_int4_linear_op.register_fake
def _(x, packed, scales_and_zeros, dense, group, max_rows):
    return x.new_empty(x.shape[0], dense.shape[0])
