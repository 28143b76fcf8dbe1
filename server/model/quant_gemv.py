"""The integer-dot kernels for quantized decode (server/model/csrc/quant_gemv.cpp): whether to use
them, and the weight layouts they read.

`Int4Linear` and `Int8Linear` multiply small batches (decode steps of a few streams) either with
torch's weight-only kernels, which widen every weight to float, or with prefloop's own kernels,
which quantize the activations to int8 in groups of 32 (as llama.cpp does for its Q4_1 and Q8_0
dot products) and add 64 byte products per AVX512-VNNI instruction (32 per two AVX2 ones).
`kernel`:
- "auto" (default): the native kernels when the kernel library was built with AVX512-VNNI or AVX2
  and the layer's scales are bfloat16 (the layout stores them so; a float32 model keeps torch's
  kernels, whose exact-activation path the float32 parity tests rely on), else torch's;
- "torch": always torch's (the benchmarks' comparison, `quant_quality.py`'s `+torch-kernel`);
- "native": the native kernels, an error where they cannot run fast.
Larger batches use the dequantized weight either way. The layouts are documented in the C++ file;
`pack_*` / `unpack_*` here are exact inverses (tested), and `quantize_activations` is what the
kernels multiply by, the tests' oracle.
"""
from __future__ import annotations

import functools

import torch

KERNELS = ("auto", "torch", "native")
GROUP = 32  # inputs per group: of the activations' int8 scale, and of an int4 weight's scale
# batches up to this many rows take the native kernels (torch's: 4); measured per layer shape on
# the default model (docs/performance.md): at 8 rows they still beat the dequantized bf16 matmul,
# at 12-16 they are even with it except on the LM head
NATIVE_MAX_ROWS = 8
TORCH_MAX_ROWS = 4


def max_rows_for(native: bool, max_rows: int | None) -> int:
    """The largest batch a layer sends to its small-batch kernel (`max_rows` if given)."""
    if max_rows is not None:
        return max_rows
    return NATIVE_MAX_ROWS if native else TORCH_MAX_ROWS


FAST_ISAS = ("avx512-vnni", "avx2")  # what the kernels were built for where they beat torch's


@functools.cache
def kernel_isa() -> str | None:
    """What the kernel library's quantized matmuls were built for here: "avx512-vnni", "avx2",
    "portable" (plain loops: correct, slow), or None when the library cannot be built."""
    from prefloop.server.model.kernels import NativeAttentionUnavailable, load_decode_kernel
    try:
        load_decode_kernel()
    except NativeAttentionUnavailable:
        return None
    return str(torch.ops.prefloop_kernels.quant_gemv_isa())


def native_available() -> bool:
    """Do the native kernels run fast here (built with AVX512-VNNI or AVX2)?"""
    return kernel_isa() in FAST_ISAS


def use_native(kernel: str, dtype: torch.dtype, group: int = GROUP) -> bool:
    """Does a layer of weights in `dtype` (int4: in groups of `group`) take the native kernels?"""
    if kernel not in KERNELS:
        raise ValueError(f"quantized kernel must be one of {KERNELS}, got {kernel!r}")
    fits = dtype == torch.bfloat16 and group == GROUP
    if kernel == "torch":
        return False
    if kernel == "native":
        if not fits:
            raise ValueError("the native quantized kernels take bfloat16 layers (int4 in groups of "
                             f"{GROUP}); got {dtype}, groups of {group}")
        if not native_available():
            raise ValueError("the native quantized kernels need a CPU with AVX512-VNNI or AVX2 and "
                             "the kernel library (a C++ compiler); use kernel 'torch' or 'auto'")
        return True
    return fits and native_available()


def _blocks(out_f: int, in_f: int) -> tuple[int, int]:
    if out_f % 16 or in_f % GROUP:
        raise ValueError(f"a {out_f}x{in_f} layer does not fit the native layout (outputs a "
                         f"multiple of 16, inputs of {GROUP})")
    return out_f // 16, in_f // GROUP


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q [out, in] uint8 in 0..15, scales / zeros [out, in/32] bfloat16 -> uint8 [out/16, in/32, 320]."""
    out_f, in_f = q.shape
    nb, groups = _blocks(out_f, in_f)
    q6 = q.reshape(nb, 16, groups, 4, 2, 4).to(torch.uint8)  # block, lane, group, vector, half, byte
    nibbles = (q6[:, :, :, :, 0] | (q6[:, :, :, :, 1] << 4))  # [nb, 16, groups, 4, 4]
    nibbles = nibbles.permute(0, 2, 3, 1, 4).reshape(nb, groups, 256)

    def per_lane(t: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [nb, groups, 32] bytes
        t = t.to(torch.bfloat16).reshape(nb, 16, groups).permute(0, 2, 1).contiguous()
        return t.view(torch.uint8).reshape(nb, groups, 32)

    return torch.cat([nibbles, per_lane(scales), per_lane(zeros)], dim=-1).contiguous()


def unpack_int4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack_int4`: (q [out, in] uint8, scales, zeros [out, in/32] bfloat16)."""
    nb, groups, _ = packed.shape
    nibbles = packed[..., :256].reshape(nb, groups, 4, 16, 4).permute(0, 3, 1, 2, 4)  # nb, lane, g, v, b
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=4)  # [nb, 16, groups, 4, 2, 4]
    q = q.reshape(nb * 16, groups * GROUP)

    def from_lanes(b: torch.Tensor) -> torch.Tensor:
        return b.contiguous().view(torch.bfloat16).reshape(nb, groups, 16).permute(0, 2, 1).reshape(nb * 16, groups)

    return q, from_lanes(packed[..., 256:288]), from_lanes(packed[..., 288:320])


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] int8 -> uint8 [out/16, in/32, 512] holding q + 128."""
    out_f, in_f = q.shape
    nb, groups = _blocks(out_f, in_f)
    u = (q.to(torch.int16) + 128).to(torch.uint8).reshape(nb, 16, groups, 8, 4)
    return u.permute(0, 2, 3, 1, 4).reshape(nb, groups, 512).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int8`: q [out, in] int8."""
    nb, groups, _ = packed.shape
    u = packed.reshape(nb, groups, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(nb * 16, groups * GROUP)
    return (u.to(torch.int16) - 128).to(torch.int8)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply by: each row of x rounded to int8 in groups of 32 (scale absmax /
    127, ties to even), as float32."""
    g = x.float().reshape(*x.shape[:-1], -1, GROUP)
    d = g.abs().amax(dim=-1, keepdim=True) / 127.0
    a = torch.where(d > 0, torch.round(g / torch.where(d > 0, d, 1.0)), 0.0).clamp(-127, 127)
    return (a * d).reshape(x.shape)
