"""The eager fused ops of server/model/csrc/fused_ops.cpp (norm, residual + norm, RoPE, SiLU x up).

Oracles: the same math in float64 from the definitions (float32 within 1e-5 relative), torch's own
bfloat16 ops (bfloat16 within two bf16 steps), and transformers' float32 forward for a whole model
whose layers run on the fused ops (tokens equal, logits within 1e-4).
"""
import pytest
import torch
from test_parity import check_parity
from tiny_models import random_prompts, save_tiny

from prefloop.server.model.kernels import load_decode_kernel
from prefloop.server.model.loader import load_model


@pytest.fixture(scope="module")
def ops():
    load_decode_kernel()  # the fused ops are built into the same library
    return torch.ops.prefloop_kernels


def rms_norm64(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def rope64(x, cos, sin):
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def silu_mul64(gu):
    g, u = gu.double().chunk(2, -1)
    return g * torch.sigmoid(g) * u


def close(out, ref, dtype):
    """float32: 1e-5 of the reference's scale; bfloat16: two bf16 steps of it."""
    tol = (1e-5 if dtype == torch.float32 else 2 * 2 ** -8) * ref.abs().max().item()
    return (out.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (33, 100)])  # 100: a partial 16-lane tail
def test_norms_match_the_definition(ops, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, hidden + 8, generator=g).to(dtype) * 30  # large values, like Llama's residual
    x = wide[:, :hidden]  # a row stride that is not the width
    w = torch.rand(hidden, generator=g).to(dtype) + 0.5
    assert close(ops.rms_norm(x, w, 1e-5), rms_norm64(x, w, 1e-5), dtype)
    h = x.clone()
    delta = torch.randn(rows, hidden, generator=g).to(dtype)
    out = ops.add_rms_norm_(h, delta, w, 1e-5)
    assert torch.equal(h, x + delta)  # the residual, rounded like torch's add
    assert close(out, rms_norm64(h, w, 1e-5), dtype)
    assert torch.equal(x, wide[:, :hidden])  # only h was written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 16, 80])
def test_rope_rotates_a_strided_view_in_place(ops, dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    n, heads, kv = 5, 6, 2
    qkv = torch.randn(n, (heads + 2 * kv) * head_dim, generator=g).to(dtype)
    qk = qkv[:, :(heads + kv) * head_dim].view(n, heads + kv, head_dim)  # as in Attention.forward
    angles = torch.rand(n, head_dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    before, v_before = rope64(qk, cos, sin), qkv[:, (heads + kv) * head_dim:].clone()
    ops.rope_(qk, cos, sin)
    assert close(qk, before, dtype)
    assert torch.equal(qkv[:, (heads + kv) * head_dim:], v_before)  # V untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 1536), (9, 40)])
def test_silu_mul_matches_the_definition(ops, dtype, rows, inter):
    g = torch.Generator().manual_seed(inter)
    gu = (torch.randn(rows, 2 * inter, generator=g) * 8).to(dtype)  # exp far into both tails
    out = ops.silu_mul(gu)
    assert out.shape == (rows, inter) and close(out, silu_mul64(gu), dtype)


def test_bad_inputs_are_refused_with_clear_errors(ops):
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="delta must match"):
        ops.add_rms_norm_(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope_(torch.ones(2, 3, 8), torch.ones(2, 6), torch.ones(2, 6))
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.silu_mul(torch.ones(8, 4).t())


def fused(model):
    model.fused_ops = True  # float32 normally keeps torch's ops; forced here to test the wiring
    return model


def test_a_model_on_the_fused_ops_matches_transformers(tmp_path, ops, monkeypatch):
    """Every fused op in place of torch's, float32, a GQA model with biases: transformers' tokens
    and logits within 1e-4 (a wrong weight, eps or rotation would not pass)."""
    import prefloop.server.model.loader as model_loader
    model_dir = save_tiny(tmp_path / "m", attention_bias=True)
    real_load = model_loader.load_model
    monkeypatch.setattr("test_parity.load_model", lambda *a, **kw: fused(real_load(*a, **kw)))
    check_parity(model_dir, [[1, 5, 9, 33, 7], list(range(3, 40))], max_tokens=12)


def prefill_logits(model, ids):
    """Teacher-forced logits [len(ids), vocab] of one sequence, from one prefill step."""
    from prefloop.server.engine.model_runner import ModelRunner
    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.engine.scheduler import ScheduledSeq
    from prefloop.server.engine.sequence import Sequence
    blocks = -(-len(ids) // 4)
    runner = ModelRunner(model, blocks, 4)
    seq = Sequence(0, "x", 0, list(ids), len(ids), SamplingParams(max_tokens=1), 0)
    seq.block_table, seq.num_computed = list(range(blocks)), 0
    tokens, positions, meta, _, _ = runner.build([ScheduledSeq(seq, len(ids))])
    return model(tokens, positions, runner.kv_caches, meta, torch.arange(len(ids))).float()


def test_bfloat16_defaults_to_the_fused_ops_and_stays_close_to_float32(tmp_path, ops):
    model_dir = save_tiny(tmp_path / "m", attention_bias=True)
    reference = load_model(model_dir)
    on = load_model(model_dir, dtype="bfloat16")
    off = load_model(model_dir, dtype="bfloat16")
    off.fused_ops = False
    assert on.fused_ops and not reference.fused_ops
    assert not load_model(model_dir, dtype="bfloat16", attention="sdpa").fused_ops
    err_on = err_off = 0.0  # mean |logit error| against float32 (the max is the LM head's own rounding)
    for ids in random_prompts(4, seed=9):
        ref = prefill_logits(reference, ids)
        on_logits, off_logits = prefill_logits(on, ids), prefill_logits(off, ids)
        assert not torch.equal(on_logits, off_logits)  # the fused ops did run
        err_on += (on_logits - ref).abs().mean().item()
        err_off += (off_logits - ref).abs().mean().item()
    assert err_on < 1.5 * err_off  # one rounding per fused op: no worse than torch's bf16 ops
