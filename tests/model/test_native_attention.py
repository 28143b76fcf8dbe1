"""The native paged decode-attention kernel (server/model/csrc/paged_decode.cpp) and `--attention`.

The oracle is attention computed directly in float64 over each sequence's context gathered by
hand from its block table; blocks a sequence does not own (and block-table padding) are filled with
NaN, so a kernel that reads past a sequence's context cannot pass.
"""
import logging

import pytest
import torch

import prefloop.server.model.kernels as native_attention
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.attention import AttentionMetadata, paged_attention
from prefloop.server.model.kernels import (
    NativeAttentionUnavailable,
    load_decode_kernel,
    resolve_decode_kernel,
)
from prefloop.server.serving.build import build_generator


def reference(q, k_cache, v_cache, tables, ctx_lens, scale, dtype=torch.float64):
    """Attention of each sequence's one query over its context, straight from the definition,
    computed in `dtype` (float64: the oracle; float32: what torch itself gets in float32)."""
    n_kv, block = k_cache.shape[2], k_cache.shape[1]
    group = q.shape[1] // n_kv
    out = torch.empty(q.shape, dtype=dtype)
    for b, ctx in enumerate(ctx_lens.tolist()):
        slots = [tables[b, p // block].item() * block + p % block for p in range(ctx)]
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].to(dtype)  # [ctx, kvh, hd]
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].to(dtype)
        for h in range(q.shape[1]):
            scores = (k[:, h // group] @ q[b, h].to(dtype)) * scale  # [ctx]
            out[b, h] = torch.softmax(scores, 0) @ v[:, h // group]
    return out


def paged_case(num_seqs, n_heads, n_kv, head_dim, block, max_ctx, dtype, seed=0):
    """Random caches where each sequence owns scattered blocks; everything else is NaN."""
    g = torch.Generator().manual_seed(seed)
    ctx_lens = torch.randint(1, max_ctx + 1, (num_seqs,), generator=g)
    ctx_lens[0] = max_ctx
    need = [-(-int(c) // block) for c in ctx_lens]
    width = max(need) + 1  # one padding column at least
    num_blocks = sum(need) + 3
    owned = torch.randperm(num_blocks, generator=g)[:sum(need)].tolist()
    k_cache = torch.full((num_blocks, block, n_kv, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = torch.zeros(num_seqs, width, dtype=torch.long)
    nan_block = next(i for i in range(num_blocks) if i not in owned)
    for b, n in enumerate(need):
        ids, owned = owned[:n], owned[n:]
        tables[b, :n] = torch.tensor(ids)
        tables[b, n:] = nan_block  # padding: never to be read
        for i in ids:
            k_cache[i] = torch.randn(block, n_kv, head_dim, generator=g).to(dtype)
            v_cache[i] = torch.randn(block, n_kv, head_dim, generator=g).to(dtype)
        last_fill = int(ctx_lens[b]) - (n - 1) * block  # slots after the context in the last block
        k_cache[ids[-1], last_fill:] = float("nan")
        v_cache[ids[-1], last_fill:] = float("nan")
    q = torch.randn(num_seqs, n_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, ctx_lens


@pytest.fixture(scope="module")
def kernel():
    return load_decode_kernel()  # CI has g++ and ninja: a failure to build is a failure here


@pytest.mark.parametrize("n_heads,n_kv,head_dim,block", [
    (9, 3, 64, 16),  # SmolLM2-135M: vector path, GQA group of 3
    (32, 8, 128, 16),  # Llama-3-8B-like: vector path, head_dim 128, group 4
    (8, 1, 128, 32),  # multi-query, group 8 (the vector path's largest)
    (8, 2, 64, 48),  # block of 48: two full 16-token score chunks and a third, partial one
    (9, 3, 64, 64),  # the vector path's largest block
    (4, 4, 64, 4),  # plain multi-head, small blocks
    (18, 2, 64, 16),  # group 9: portable path
    (4, 2, 16, 4),  # head_dim 16 (the tiny test models): portable path
    (6, 3, 80, 8),  # head_dim 80: portable path
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64_reference(kernel, n_heads, n_kv, head_dim, block, dtype):
    q, k_cache, v_cache, tables, ctx_lens = paged_case(7, n_heads, n_kv, head_dim, block, 70, dtype)
    scale = head_dim ** -0.5
    out = kernel(q, k_cache, v_cache, tables, ctx_lens, scale)
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding (8 bits)
    assert (out.double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("head_dim", [64, 16])  # vector and portable paths
def test_peaked_scores_match_float64_reference(kernel, head_dim):
    """Queries 30x larger: scores spread over hundreds, so most exp() arguments fall below -87
    (the vector exp's clamp) and the running max changes between blocks."""
    q, k_cache, v_cache, tables, ctx_lens = paged_case(6, 8, 2, head_dim, 16, 90, torch.float32, seed=4)
    q = q * 30
    scale = head_dim ** -0.5
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, scale)
    # Scores in the hundreds carry float32 rounding of ~1e-5 into every weight. The kernel's online
    # softmax rescales its running sums once per block (up to 6 here), so it may be off by a few
    # times what torch's own float32 attention is off by (a wrong clamp or max would be off by 0.1+).
    torch_f32 = (reference(q, k_cache, v_cache, tables, ctx_lens, scale, torch.float32).double()
                 - ref).abs().max().item()
    err = (kernel(q, k_cache, v_cache, tables, ctx_lens, scale).double() - ref).abs().max().item()
    assert err < max(1e-5, 8 * torch_f32), (err, torch_f32)


def test_kernel_equals_sdpa_path_inside_paged_attention(kernel):
    """The same AttentionMetadata through both decode paths of `paged_attention`."""
    q, k_cache, v_cache, tables, ctx_lens = paged_case(5, 9, 3, 64, 16, 50, torch.float32, seed=3)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # SDPA multiplies masked rows by 0
    width = tables.shape[1]
    mask = (torch.arange(width * 16)[None] < ctx_lens[:, None])[:, None, None, :]

    def meta(decode_kernel, decode_mask):
        return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decode=5,
                                 decode_block_tables=tables, decode_ctx_lens=ctx_lens,
                                 decode_mask=decode_mask, prefills=[], decode_kernel=decode_kernel)

    native = paged_attention(q, k_cache, v_cache, meta(kernel, None), 0.125)
    sdpa = paged_attention(q, k_cache, v_cache, meta(None, mask), 0.125)
    assert (native - sdpa).abs().max().item() < 1e-5


def test_kernel_rejects_bad_inputs_with_clear_errors(kernel):
    q, k_cache, v_cache, tables, ctx_lens = paged_case(2, 9, 3, 64, 16, 20, torch.float32)
    with pytest.raises(RuntimeError, match="outside the block table"):
        kernel(q, k_cache, v_cache, tables, ctx_lens * 100, 0.125)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(q.bfloat16(), k_cache, v_cache, tables, ctx_lens, 0.125)
    with pytest.raises(RuntimeError, match="mismatch"):
        kernel(q[:, :8], k_cache, v_cache, tables, ctx_lens, 0.125)  # 8 heads over 3 KV heads
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        kernel(q.half(), k_cache.half(), v_cache.half(), tables, ctx_lens, 0.125)


def test_resolve_choices(kernel):
    assert resolve_decode_kernel("sdpa", "cpu") is None
    assert resolve_decode_kernel("native", "cpu") is kernel
    assert resolve_decode_kernel("auto", "cpu") is kernel
    assert resolve_decode_kernel("auto", "cuda") is None  # a CPU kernel: CUDA keeps SDPA
    with pytest.raises(InvalidArgument, match="CPU kernel"):
        resolve_decode_kernel("native", "cuda")
    with pytest.raises(InvalidArgument, match="auto, native, sdpa"):
        resolve_decode_kernel("flash", "cpu")
    assert resolve_decode_kernel("auto", "cpu", torch.float16) is None  # the kernel's dtypes only
    with pytest.raises(InvalidArgument, match="float32 and bfloat16"):
        resolve_decode_kernel("native", "cpu", torch.float16)


def test_without_a_compiler_auto_falls_back_and_native_refuses(monkeypatch, caplog):
    monkeypatch.setattr(native_attention, "_loaded", None)
    monkeypatch.setattr(native_attention, "_failure", None)
    monkeypatch.setattr(native_attention, "has_cxx_compiler", lambda: False)
    with caplog.at_level(logging.WARNING, logger="prefloop.server.model.kernels"):
        assert resolve_decode_kernel("auto", "cpu") is None
    assert "no C++ compiler" in caplog.text and "SDPA" in caplog.text
    with pytest.raises(NativeAttentionUnavailable, match="no C.. compiler.*--attention sdpa"):
        resolve_decode_kernel("native", "cpu")


def test_vllm_backend_refuses_the_flag():
    with pytest.raises(InvalidArgument, match="--attention is a native-engine option"):
        build_generator(backend="vllm", attention="native")


def test_build_is_keyed_by_torch_version_and_install_path(tmp_path, monkeypatch):
    """Two virtualenvs (same torch version, other install paths) get two builds, each kept in
    prefloop's cache; the same venv gets the same name every time."""
    name = native_attention.build_name
    venv_a = name("2.13.0+cpu", "/venvs/a/lib/python3.11/site-packages/torch")
    assert venv_a == name("2.13.0+cpu", "/venvs/a/lib/python3.11/site-packages/torch")
    assert venv_a != name("2.13.0+cpu", "/venvs/b/lib/python3.11/site-packages/torch")
    assert venv_a != name("2.14.0+cpu", "/venvs/a/lib/python3.11/site-packages/torch")
    assert name() == name(torch.__version__, None)  # the default: this process's torch
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path))
    assert native_attention.build_dir() == tmp_path / "kernels" / name()


def test_a_build_left_by_a_killed_builder_is_finished_not_waited_on(kernel, tmp_path):
    """A builder SIGKILLed mid-build leaves torch's `lock` file and no linked library; the next
    start used to wait on that file forever. Here the built folder is copied without its library
    and with the dead builder's `lock` (exactly what the kill leaves: the advisory lock died with
    its holder), and a fresh process must load the kernel within the timeout, having removed the
    stale file and linked the library."""
    import os
    import shutil
    import subprocess
    import sys

    name = native_attention.build_name()
    built = native_attention.build_dir(name)
    left = tmp_path / "kernels" / name
    shutil.copytree(built, left, ignore=shutil.ignore_patterns("*.so", "lock", ".build.flock"))
    (left / native_attention.TORCH_BATON).touch()
    env = dict(os.environ, PREFLOOP_CACHE_DIR=str(tmp_path))
    code = ("from prefloop.server.model.kernels import load_decode_kernel; "
            "print('loaded', load_decode_kernel())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout and "did not finish" in done.stderr
    assert not (left / native_attention.TORCH_BATON).exists()
    assert (left / f"{name}.so").exists()
