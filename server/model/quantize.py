"""Weight-only int8 quantization of the native engine's linear layers (`--quantize int8`), and
`quantize_model`, which applies it or int4 (int4.py) to a model.

Each output row of a weight gets one scale (symmetric, absmax / 127). Small batches (decode of a
few streams: memory-bound, the weights dominate the bytes read) read half the bytes of bf16:
prefloop's integer-dot kernel where it runs fast (bfloat16 layers on an AVX512-VNNI or AVX2 CPU; the
activations rounded to int8 in groups of 32, as llama.cpp's Q8_0 dot products do:
server/model/quant_gemv.py), else torch's int8-weight kernel `aten._weight_int8pack_mm` (activations
in the model dtype); larger batches (compute-bound) multiply by the dequantized weight, built once on first use (or
at load, prepacked by oneDNN, with `--weight-layout` auto/packed), so both paths compute with the
same quantized weights. Embeddings and norms stay unquantized;
the LM head is quantized even when tied (the embedding keeps its own full-precision copy).

What it changes, measured in docs/performance.md: one-stream decode speed, and the outputs (it is
another model: greedy text can differ from the unquantized one).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from prefloop.server.model.int4 import INT4_GROUP, Int4Linear, int4_fits
from prefloop.server.model.packed_linear import pack_weight, packed_linear
from prefloop.server.model.quant_gemv import max_rows_for, pack_int8, unpack_int8, use_native

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
HEAD_MODES = ("int8", "int4")  # int4 mode: what the LM head gets


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: (q [out, in] int8, scales [out] float32), w ≈ q * scales."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear(nn.Module):
    """`kernel`: "auto" / "torch" / "native", which small-batch kernel (server/model/quant_gemv.py)."""

    def __init__(self, linear: nn.Linear, max_rows: int | None = None, kernel: str = "auto"):
        super().__init__()
        dtype = linear.weight.dtype
        q, scales = quantize_rows(linear.weight)
        out_f, in_f = q.shape
        self.native = use_native(kernel, dtype) and out_f % 16 == 0 and in_f % 32 == 0
        if self.native:  # [out/16, in/32, 512] (q + 128 per block of 16 outputs); scales as float32
            self.register_buffer("packed", pack_int8(q))
            self.register_buffer("native_scales", scales.to(dtype).float())
        else:
            self.register_buffer("_qweight", q)  # [out, in] int8
        self.register_buffer("scales", scales.to(dtype))  # [out]
        self.bias = linear.bias
        self.max_rows = max_rows_for(self.native, max_rows)  # batches up to this take the int8 kernel
        self.in_features = in_f
        self._dense: torch.Tensor | None = None  # q * scales in the model dtype, for large batches

    @property
    def qweight(self) -> torch.Tensor:
        """[out, in] int8 (unpacked from the native layout when that is what is kept)."""
        return unpack_int8(self.packed) if self.native else self._qweight

    def dequantized(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = (self.qweight.to(self.scales.dtype) * self.scales[:, None]).contiguous()
        return self._dense

    def prepare_for_compile(self) -> None:
        self.dequantized()  # built now: a traced graph must not create module state

    def pack_dense(self) -> None:
        """Keep the large-batch weight prepacked by oneDNN (server/model/packed_linear.py)."""
        self._dense = pack_weight(self.dequantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small, scales = (self.packed, self.native_scales) if self.native else (self._qweight, self.scales)
        if torch.compiler.is_compiling():  # one opaque op: no shape branch, no decomposed int8 mm
            out = _int8_linear_op(x, small, scales, self._dense, self.max_rows)
        else:
            out = _int8_linear(x, small, scales, self.dequantized(), self.max_rows)
        return out if self.bias is None else out + self.bias


def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor,
                 max_rows: int) -> torch.Tensor:
    """`qweight`: int8 [out, in] for torch's kernel, or the native layout (3-D) with float32 scales."""
    if x.shape[0] <= max_rows:
        if qweight.dim() == 3:
            return torch.ops.prefloop_kernels.int8_gemv(x, qweight, scales)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), qweight, scales)
    return packed_linear(x, dense, None) if dense.is_mkldnn else F.linear(x, dense)


# Under torch.compile (`--compile`) the layer is this custom op: inductor would otherwise decompose
# the int8 kernel into "dequantize the whole weight, then mm" on every step, and specialize the
# graph on the row-count branch.
@torch.library.custom_op("prefloop::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dense: torch.Tensor,
                    max_rows: int) -> torch.Tensor:
    return _int8_linear(x, qweight, scales, dense, max_rows)


@_int8_linear_op.register_fake
def _(x, qweight, scales, dense, max_rows):
    return x.new_empty(x.shape[0], scales.shape[0])


def quantize_model(model: nn.Module, mode: str, max_rows: int | None = None, *,
                   group: int = INT4_GROUP, head: str = "int8", kernel: str = "auto") -> nn.Module:
    """Replace every nn.Linear of `model` (attention, MLP, LM head) in place; returns the model.
    int4: layers the int4 kernel cannot run, and the LM head unless `head` is "int4", get int8.
    `kernel`: the small-batch kernels (server/model/quant_gemv.py)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
    if head not in HEAD_MODES:
        raise ValueError(f"the int4 mode's LM head must be one of {HEAD_MODES}, got {head!r}")
    if mode == "none":
        return model
    as_int8 = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            out_f, in_f = child.weight.shape
            if mode == "int4" and (name != "lm_head" or head == "int4") \
                    and int4_fits(out_f, in_f, group):
                setattr(parent, name, Int4Linear(child, group, max_rows, kernel=kernel))
                continue
            if mode == "int4" and name != "lm_head":
                as_int8.append(f"{name} {out_f}x{in_f}")
            setattr(parent, name, Int8Linear(child, max_rows, kernel=kernel))
    if as_int8:
        log.info("--quantize int4: %d layer(s) the int4 kernel cannot run (output sizes a "
                 "multiple of 16, inputs of whole groups of %d) are int8: %s", len(as_int8), group,
                 ", ".join(sorted(set(as_int8))))
    return model
