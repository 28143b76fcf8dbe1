"""`--weight-layout`: oneDNN-prepacked linear weights (server/model/packed_linear.py).

Oracles: torch's `F.linear` on the same weights (bfloat16 must be bit-identical), a float64 matmul
(float32 must be as close as `F.linear` is, within a small factor), the unpacked engine (bfloat16:
the same logits bit for bit) and a float64 transformers forward (float32 packed engine).
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from test_parity import PROMPTS, run_with_logits
from tiny_models import greedy, random_prompts, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

import prefloop.server.model.packed_linear as packed_linear
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.loader import load_model, resolve_model_dir
from prefloop.server.model.packed_linear import (
    PackedLinear,
    WeightPackingUnavailable,
    pack_model,
    packing_unavailable,
    resolve_weight_layout,
)
from prefloop.server.model.quantize import Int8Linear
from prefloop.server.serving.build import build_generator

# oneDNN packs bfloat16 only on CPUs with AVX-NE-CONVERT or AVX-512 (BW, VL, DQ); elsewhere `auto`
# keeps the plain layout (test_resolve_choices checks that) and these tests have nothing to run.
BF16_UNPACKABLE = packing_unavailable("cpu", torch.bfloat16)
needs_bf16_packing = pytest.mark.skipif(BF16_UNPACKABLE is not None,
                                        reason=str(BF16_UNPACKABLE))


@needs_bf16_packing
@pytest.mark.parametrize("rows", [1, 5, 32, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_is_bit_identical_to_f_linear(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(576, 960, bias=bias).to(torch.bfloat16)
    layer = PackedLinear(linear)
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
    x3 = torch.randn(2, rows, 576, dtype=torch.bfloat16)  # leading dims pass through
    assert torch.equal(layer(x3), F.linear(x3, linear.weight, linear.bias))


@pytest.mark.parametrize("rows", [1, 32])
def test_float32_is_as_close_to_float64_as_f_linear(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1536, 576)
    x = torch.randn(rows, 1536)
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    plain_err = (F.linear(x, linear.weight, linear.bias).double() - exact).abs().max().item()
    packed_err = (PackedLinear(linear)(x).double() - exact).abs().max().item()
    assert packed_err < 4 * plain_err + 1e-6


def test_pack_model_replaces_every_linear_and_keeps_the_tied_embedding(tmp_path):
    model = load_model(save_tiny(tmp_path / "m", tie_word_embeddings=True), weight_layout="packed")
    assert model.packed_weights
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * 2 + 1  # 4 per layer + head
    assert model.embed_tokens.weight.layout == torch.strided  # the lookup keeps its plain table
    plain = load_model(tmp_path / "m", weight_layout="plain")
    assert not plain.packed_weights and isinstance(plain.lm_head, torch.nn.Linear)
    assert torch.equal(model.embed_tokens.weight, plain.embed_tokens.weight)


@needs_bf16_packing
def test_int8_large_batches_use_a_packed_dequantized_weight():
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    layer = Int8Linear(linear, max_rows=4)
    x = torch.randn(9, 64, dtype=torch.bfloat16)  # above max_rows: the dense path
    before = layer(x)
    pack_model(torch.nn.Sequential(layer))
    assert layer._dense.is_mkldnn
    assert torch.equal(layer(x), before)
    small = torch.randn(2, 64, dtype=torch.bfloat16)  # the int8 kernel path is untouched
    assert torch.equal(layer(small), Int8Linear(linear, max_rows=4)(small))


def engine(model_dir, **kw):
    return LLMEngine(load_model(model_dir, **kw), KVCacheConfig(block_size=4, capacity_tokens=4096))


def packed_layers(model) -> int:
    """Linear layers running on a packed weight (else a packed-vs-plain comparison checks nothing)."""
    return sum(isinstance(m, PackedLinear) or (isinstance(m, Int8Linear) and m._dense is not None and m._dense.is_mkldnn)
               for m in model.modules())


@needs_bf16_packing
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_bfloat16_engine_gives_the_plain_engines_logits_bit_for_bit(tmp_path, quantize):
    model_dir = save_tiny(tmp_path / "m", attention_bias=True)
    packed = engine(model_dir, dtype="bfloat16", weight_layout="packed", quantize=quantize)
    plain = engine(model_dir, dtype="bfloat16", weight_layout="plain", quantize=quantize)
    assert packed_layers(packed.model) == 9 and packed_layers(plain.model) == 0
    for ids in random_prompts(3, seed=5):
        ours, our_logits = run_with_logits(packed, ids, 12)
        ref, ref_logits = run_with_logits(plain, ids, 12)
        assert ours == ref
        assert torch.equal(our_logits, ref_logits)
    batch = {str(i): (p, greedy(10)) for i, p in enumerate(random_prompts(10, seed=6))}
    assert packed.generate(batch) == plain.generate(batch)  # batched steps: many rows at once


def float64_reference(model_dir, prompt_ids, tokens):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    seq = torch.tensor([prompt_ids + tokens[:-1]])
    with torch.no_grad():
        return hf(seq).logits[0, len(prompt_ids) - 1:].float()


@pytest.mark.slow
def test_default_model_float32_packed_stays_within_1e4_of_float64():
    """float32 packed weights sum in oneDNN's order: same greedy tokens as the plain engine, logits
    within 2e-4 of a float64 forward (the plain engine and transformers' float32 are ≈ 5-7e-5)."""
    model_dir = resolve_model_dir(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    packed = engine(model_dir, weight_layout="packed")
    plain = engine(model_dir, weight_layout="plain")
    assert packed_layers(packed.model) == 30 * 4 + 1
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ours, our_logits = run_with_logits(packed, ids, 8)
        assert ours == run_with_logits(plain, ids, 8)[0]
        assert (our_logits - float64_reference(model_dir, ids, ours)).abs().max().item() < 2e-4


@needs_bf16_packing
@pytest.mark.slow
def test_default_model_bfloat16_packed_equals_plain():
    model_dir = resolve_model_dir(None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    packed = LLMEngine(load_model(model_dir, dtype="bfloat16"))  # auto: packed for bfloat16
    plain = LLMEngine(load_model(model_dir, dtype="bfloat16", weight_layout="plain"))
    assert packed.model.packed_weights and packed_layers(packed.model) == 30 * 4 + 1
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    a, b = (e.generate({str(i): (p, greedy(16)) for i, p in enumerate(ids)}) for e in (packed, plain))
    assert a == b


def test_resolve_choices(monkeypatch, caplog):
    assert resolve_weight_layout("auto", "cpu", torch.bfloat16) is (BF16_UNPACKABLE is None)
    assert resolve_weight_layout("auto", "cpu", torch.float32) is False  # parity with transformers
    assert resolve_weight_layout("packed", "cpu", torch.float32) is True
    assert resolve_weight_layout("plain", "cpu", torch.bfloat16) is False
    assert resolve_weight_layout("auto", "cuda", torch.bfloat16) is False
    with pytest.raises(WeightPackingUnavailable, match="CPU path"):
        resolve_weight_layout("packed", "cuda", torch.bfloat16)
    with pytest.raises(InvalidArgument, match="must be one of auto, packed, plain"):
        resolve_weight_layout("blocked", "cpu", torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(WeightPackingUnavailable, match="no oneDNN"):
        resolve_weight_layout("packed", "cpu", torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        assert resolve_weight_layout("auto", "cpu", torch.bfloat16) is False
    assert "plain layout" in caplog.text


def test_a_dtype_onednn_cannot_pack_is_refused_or_falls_back(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: this dtype needs avx512_fp16")
    monkeypatch.setattr(packed_linear, "_PROBE", {})
    monkeypatch.setattr(packed_linear, "pack_weight", refuse)
    with pytest.raises(WeightPackingUnavailable, match="avx512_fp16"):
        resolve_weight_layout("packed", "cpu", torch.bfloat16)
    assert resolve_weight_layout("auto", "cpu", torch.bfloat16) is False


def test_flag_reaches_the_generator_and_vllm_refuses_it():
    import argparse

    from prefloop.cli.model_args import add_model_arguments, generator_kwargs
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert generator_kwargs(p.parse_args([]))["weight_layout"] == "auto"
    assert generator_kwargs(p.parse_args(["--weight-layout", "plain"]))["weight_layout"] == "plain"
    with pytest.raises(InvalidArgument, match="native-engine option"):
        build_generator(backend="vllm", weight_layout="packed")
    with pytest.raises(InvalidArgument, match="must be one of"):
        build_generator(weight_layout="blocked")  # refused before any model is loaded


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4),
                                       pytest.param("bfloat16", 5e-2, marks=needs_bf16_packing)])
def test_compiled_packed_engine_matches_eager_packed(tmp_path, dtype, tol):
    """Under --compile each packed layer is the opaque op prefloop::packed_linear."""
    model_dir = save_tiny(tmp_path / "m", attention_bias=True)
    eager = engine(model_dir, dtype=dtype, weight_layout="packed")
    compiled = engine(model_dir, dtype=dtype, weight_layout="packed", compile=True)
    assert packed_layers(compiled.model) == 9
    for ids in random_prompts(2, seed=7):
        ours, our_logits = run_with_logits(compiled, ids, 8)
        ref, ref_logits = run_with_logits(eager, ids, 8)
        assert ours == ref
        assert (our_logits - ref_logits).abs().max().item() < tol


@needs_bf16_packing
@pytest.mark.slow
def test_a_hot_swapped_version_is_packed_too():
    """The generator's loader carries --weight-layout: the swapped-in bf16 version is packed and
    answers like a plain engine on the same weights."""
    import asyncio

    model_dir = resolve_model_dir(None)

    async def scenario():
        gen = build_generator(dtype="bfloat16", kv_cache_tokens=1024)
        await gen.start()
        try:
            await gen.swap(model_dir, "v1")
            ids = gen.chat_ids([{"role": "user", "content": "Name a river."}])
            tokens = [t for d in [d async for d in gen.stream("q", ids, greedy(12))] for t in d.token_ids]
            return gen, ids, tokens
        finally:
            await gen.close()

    gen, ids, tokens = asyncio.run(scenario())
    assert gen.info.model_version == "v1" and packed_layers(gen._current.engine.engine.model) == 121
    plain = LLMEngine(load_model(model_dir, dtype="bfloat16", weight_layout="plain"))
    assert tokens == plain.generate({"q": (ids, greedy(12))})["q"][0]
