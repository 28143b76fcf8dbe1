"""`--quantize int8`: the rounding bound, both matmul paths against a dequantized-weight matmul,
and the whole engine against transformers run on the same dequantized weights (the oracle)."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_parity import hf_greedy_with_logits, run_with_logits
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.model.loader import load_model
from prefloop.server.model.quantize import Int8Linear, quantize_model, quantize_rows


def test_rows_round_to_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (w - q.float() * scales[:, None]).abs()
    assert torch.all(err <= scales[:, None] / 2 + 1e-7)
    assert torch.allclose(scales, w.abs().amax(dim=1) / 127)


@pytest.mark.parametrize("rows", [1, 3, 9])  # int8 kernel for small batches, dense path above
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_both_paths_equal_a_dequantized_matmul(rows, dtype, tol):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=True).to(dtype)
    layer = Int8Linear(linear, max_rows=4)
    x = torch.randn(rows, 64, dtype=dtype)
    ref = F.linear(x.float(), layer.qweight.float() * layer.scales.float()[:, None], linear.bias.float())
    assert (layer(x).float() - ref).abs().max().item() < tol


def test_quantize_model_replaces_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(8, 4)))
    quantize_model(model, "int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_model(model, "int2")


def dequantized_copy(model_dir, out_dir, tied: bool):
    """The checkpoint with every linear weight replaced by its int8 round trip (what the
    quantized engine computes with) — transformers runs it as the oracle."""
    tensors = load_file(model_dir / "model.safetensors")
    for name, t in list(tensors.items()):
        if t.dim() == 2 and "embed_tokens" not in name:
            q, s = quantize_rows(t)
            tensors[name] = (q.float() * s[:, None]).to(t.dtype)
    if tied:  # our engine quantizes the tied LM head; transformers must see the same head
        q, s = quantize_rows(tensors["model.embed_tokens.weight"])
        tensors["lm_head.weight"] = (q.float() * s[:, None]).contiguous()
    out_dir.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (out_dir / f.name).write_bytes(f.read_bytes())
    if tied:
        import json
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["tie_word_embeddings"] = False
        (out_dir / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.mark.parametrize("overrides", [{"attention_bias": True}, {"tie_word_embeddings": True}])
def test_engine_matches_transformers_on_the_dequantized_weights(tmp_path, overrides):
    model_dir = save_tiny(tmp_path / "tiny", **overrides)
    oracle_dir = dequantized_copy(model_dir, tmp_path / "oracle", overrides.get("tie_word_embeddings", False))
    hf = AutoModelForCausalLM.from_pretrained(oracle_dir, dtype=torch.float32).eval()
    engine = LLMEngine(load_model(model_dir, quantize="int8"),
                       KVCacheConfig(block_size=4, capacity_tokens=1024))
    plain = LLMEngine(load_model(model_dir), KVCacheConfig(block_size=4, capacity_tokens=1024))
    differs = False
    for ids in ([1, 5, 9, 33, 7], list(range(3, 40))):
        ours, our_logits = run_with_logits(engine, ids, 12)  # decode: the int8 kernel
        ref, ref_logits = hf_greedy_with_logits(hf, ids, 12)
        assert ours == ref
        assert (our_logits - ref_logits).abs().max().item() < 1e-4
        _, plain_logits = run_with_logits(plain, ids, 12)
        differs |= (plain_logits - our_logits).abs().max().item() > 1e-4
    assert differs, "quantization must change the model (else this test checks nothing)"


def test_quantize_flag_reaches_the_generator_and_is_refused_where_unsupported():
    import argparse

    from prefloop.cli.model_args import add_model_arguments, generator_kwargs
    from prefloop.server.errors import InvalidArgument
    from prefloop.server.serving.build import build_generator
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert generator_kwargs(p.parse_args(["--quantize", "int8"]))["quantize"] == "int8"
    assert generator_kwargs(p.parse_args(["--quantize", "int4"]))["quantize"] == "int4"
    assert generator_kwargs(p.parse_args([]))["quantize"] == "none"
    with pytest.raises(InvalidArgument, match="native-engine option"):
        build_generator(backend="vllm", quantize="int8")
    with pytest.raises(InvalidArgument, match="quantize must be one of"):
        build_generator(quantize="int2")
    assert generator_kwargs(p.parse_args([]))["quant_kernel"] == "auto"
    assert generator_kwargs(p.parse_args(["--quant-kernel", "torch"]))["quant_kernel"] == "torch"
    with pytest.raises(InvalidArgument, match="quant kernel must be one of"):
        build_generator(quantize="int4", quant_kernel="fast")
    with pytest.raises(InvalidArgument, match="--quant-kernel native: .*bfloat16"):  # before loading
        build_generator(quantize="int4", quant_kernel="native", dtype="float32")


@pytest.mark.slow
def test_default_model_serves_int8_close_to_full_precision():
    import asyncio

    from prefloop.server.engine.sampling_params import SamplingParams
    from prefloop.server.serving.build import build_generator

    async def answer(quantize: str) -> tuple[str, str]:
        gen = build_generator(kv_cache_tokens=1024, quantize=quantize, dtype="float32")
        await gen.start()
        try:
            ids = gen.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
            text = [d.text_delta async for d in
                    gen.stream("q", ids, SamplingParams(temperature=0, max_tokens=8))]
            return gen.info.dtype, "".join(text)
        finally:
            await gen.close()

    (dtype, int8_text), (_, full_text) = asyncio.run(answer("int8")), asyncio.run(answer("none"))
    assert dtype == "float32+int8"
    assert "Paris" in int8_text and "Paris" in full_text


def test_quantize_auto_picks_int4_only_where_the_integer_dot_kernels_run(monkeypatch):
    import argparse

    from prefloop.cli.model_args import add_model_arguments, generator_kwargs
    from prefloop.server.serving import build
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert generator_kwargs(p.parse_args(["--quantize", "auto"]))["quantize"] == "auto"
    monkeypatch.setattr(build, "native_available", lambda: True)
    assert build.auto_quantize("native", "cpu", "bfloat16", "auto") == "int4"
    assert build.auto_quantize("native", "cpu", "bfloat16", "native") == "int4"
    assert build.auto_quantize("native", "cpu", "float32", "auto") == "none"  # torch's kernels only
    assert build.auto_quantize("native", "cpu", "bfloat16", "torch") == "none"
    assert build.auto_quantize("vllm", "cuda", "bfloat16", "auto") == "none"
    monkeypatch.setattr(build, "native_available", lambda: False)  # e.g. no AVX2, no compiler
    assert build.auto_quantize("native", "cpu", "bfloat16", "auto") == "none"
