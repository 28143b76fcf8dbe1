"""The integer-dot int4 / int8 kernels (server/model/csrc/quant_gemv.cpp, server/model/quant_gemv.py):
the layouts round-trip exactly, the kernels equal a float matmul of the int8-rounded activations
by the dequantized weight (their exact oracle) on odd shapes, group edges, rows past the 4 that
share a pass and in both activation dtypes, and the layers pick them only where they run fast."""
import pytest
import torch
import torch.nn.functional as F

from prefloop.server.model import quant_gemv as qg
from prefloop.server.model.int4 import Int4Linear, dequantize_groups, quantize_groups
from prefloop.server.model.kernels import NativeAttentionUnavailable, load_decode_kernel
from prefloop.server.model.quantize import Int8Linear, quantize_rows


@pytest.fixture(scope="module")
def kernels():
    try:
        load_decode_kernel()
    except NativeAttentionUnavailable as e:
        pytest.skip(f"kernel library not available here: {e.reason}")
    return torch.ops.prefloop_kernels


def int4_weights(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f)
    w[3 % out_f, 40 % in_f] = 30.0  # one group with a wide range next to narrow ones
    q, s, z = quantize_groups(w, 32)
    return q, s.to(torch.bfloat16), z.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (960, 576), (64, 1536)])
def test_layouts_round_trip_exactly(shape):
    q, s, z = int4_weights(*shape)
    q2, s2, z2 = qg.unpack_int4(qg.pack_int4(q, s, z))
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    q8, _ = quantize_rows(torch.randn(*shape))
    assert torch.equal(qg.unpack_int8(qg.pack_int8(q8)), q8)
    with pytest.raises(ValueError, match="does not fit"):
        qg.pack_int8(torch.zeros(40, 64, dtype=torch.int8))


def test_activations_round_within_half_a_step_of_their_group():
    torch.manual_seed(1)
    x = torch.randn(3, 96)
    x[1, 70] = 100.0  # an outlier widens its own group's step only
    x[2, :32] = 0.0  # an all-zero group stays zero
    xq = qg.quantize_activations(x)
    step = x.reshape(3, 3, 32).abs().amax(-1) / 127
    assert torch.all((x - xq).abs().reshape(3, 3, 32) <= step[..., None] / 2 + 1e-6)
    assert step[1, 2] > 20 * step[1, 1] and torch.equal(xq[2, :32], torch.zeros(32))
    assert not torch.equal(xq, x)  # it does round


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (960, 576), (3072, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # 4 rows share a pass over the weights; 9 = 4 + 4 + 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_a_float_matmul_of_the_rounded_activations(kernels, shape, rows, dtype):
    out_f, in_f = shape
    q, s, z = int4_weights(out_f, in_f, seed=rows)
    x = torch.randn(rows, in_f).to(dtype)
    xq = qg.quantize_activations(x)
    w4 = dequantize_groups(q, s.float(), z.float())
    y4 = kernels.int4_gemv(x, qg.pack_int4(q, s, z))
    q8, s8 = quantize_rows(torch.randn(out_f, in_f))
    y8 = kernels.int8_gemv(x, qg.pack_int8(q8), s8)
    for y, ref in ((y4, xq @ w4.t()), (y8, xq @ (q8.float() * s8[:, None]).t())):
        assert y.dtype == dtype and y.shape == (rows, out_f)
        # float32: summation order only; bfloat16: the output's rounding (8 bits)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item() + 1e-5
    # and the rounding of the activations is all that separates them from exact x
    exact = x.float() @ w4.t()
    assert 0 < (y4.float() - exact).abs().max().item() < 0.02 * exact.abs().max().item()


def test_kernels_reject_what_they_cannot_read(kernels):
    q, s, z = int4_weights(16, 64)
    packed = qg.pack_int4(q, s, z)
    with pytest.raises(RuntimeError, match="inputs"):
        kernels.int4_gemv(torch.randn(1, 96), packed)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.int4_gemv(torch.randn(1, 64).half(), packed)
    with pytest.raises(RuntimeError, match="scales"):
        kernels.int8_gemv(torch.randn(1, 64), qg.pack_int8(torch.zeros(16, 64, dtype=torch.int8)),
                          torch.ones(8))


def test_layers_take_the_native_kernels_only_for_bfloat16_where_they_run_fast():
    lin = torch.nn.Linear(64, 32)
    assert not Int4Linear(lin).native and not Int8Linear(lin).native  # float32: torch's kernels
    assert not Int4Linear(lin.to(torch.bfloat16), kernel="torch").native
    with pytest.raises(ValueError, match="must be one of"):
        Int8Linear(lin, kernel="fast")
    with pytest.raises(ValueError, match="bfloat16"):
        Int4Linear(torch.nn.Linear(64, 32), kernel="native")
    bf16 = torch.nn.Linear(64, 32).to(torch.bfloat16)
    assert Int4Linear(bf16).native == Int8Linear(bf16).native == qg.native_available()


@pytest.mark.skipif(not qg.native_available(), reason="needs the kernels built with AVX512-VNNI or AVX2")
@pytest.mark.parametrize("rows", [1, 4, 9])  # the kernel up to 4 rows, the dequantized weight above
def test_native_layers_compute_with_the_same_weights_as_torchs(rows):
    torch.manual_seed(2)
    lin = torch.nn.Linear(96, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    for native, plain in ((Int4Linear(lin, kernel="native"), Int4Linear(lin, kernel="torch")),
                          (Int8Linear(lin, kernel="native"), Int8Linear(lin, kernel="torch"))):
        assert native.native and not plain.native
        assert torch.equal(native.dequantized(), plain.dequantized())  # the same quantized weights
        w = native.dequantized().float()
        xin = qg.quantize_activations(x) if rows <= 4 else x.float()
        ref = F.linear(xin, w, lin.bias.float())
        assert (native(x).float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()


@pytest.mark.parametrize("march,isa", [("haswell", "avx2"), ("x86-64", "portable")])
def test_the_avx2_and_portable_builds_pass_the_same_checks(kernels, march, isa):
    """The kernel library built for an older CPU level (PREFLOOP_KERNEL_MARCH, its own cached build)
    runs this file's oracle checks in a fresh process: the AVX2 path (vpmaddubsw) and the plain
    loops are tested on whatever CPU runs the suite."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, PREFLOOP_KERNEL_MARCH=march)
    probe = subprocess.run([sys.executable, "-c", "from prefloop.server.model import quant_gemv as q; "
                            "print(q.kernel_isa())"], env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.strip().splitlines()[-1] == isa, probe.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "kernels_equal or reject or same_weights"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    assert int(re.search(r"(\d+) passed", run.stdout).group(1)) >= 41  # 40 oracle cases + rejects
    # the layers take the native kernels on AVX2 (their test runs), not on plain loops (skipped)
    assert ("skipped" in run.stdout) == (isa == "portable"), run.stdout[-1000:]
