"""A decode layer in one native call (server/model/csrc/decode_layer.cpp, LlamaModel's decode-only
steps on the native quantized kernels or oneDNN-packed bfloat16): the same ops in the same order as
the Python layer, so the same logits bit for bit, batched or alone; and steps it cannot run (a
prefill, adapter rows, a layer it has no call for) take the Python layer."""
import pytest
import torch
from test_parity import run_with_logits
from tiny_models import save_tiny

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.model import quant_gemv
from prefloop.server.model.loader import load_model
from prefloop.server.model.packed_linear import packing_unavailable

pytestmark = pytest.mark.skipif(not quant_gemv.native_available(),
                                reason="needs prefloop's quantized kernels (AVX512-VNNI or AVX2)")
PROMPTS = [[1, 5, 9, 33, 7], list(range(3, 40)), [8, 3, 3, 1, 12, 40]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("decode_layer") / "tiny")


def engine_for(model_dir, quantize, one_call: bool):
    model = load_model(model_dir, dtype="bfloat16", quantize=quantize)
    if not one_call:
        model._decode_layer_args = []  # as if a layer could not take it: every step in Python
    return LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=1024))


@pytest.mark.parametrize("quantize", ["int4", "int8", "none"])  # none: oneDNN-packed bfloat16
def test_one_call_layers_give_the_python_layers_logits_bit_for_bit(tiny_dir, quantize):
    if quantize == "none" and packing_unavailable("cpu", torch.bfloat16):
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    fast, slow = engine_for(tiny_dir, quantize, True), engine_for(tiny_dir, quantize, False)
    for ids in PROMPTS:
        ours, our_logits = run_with_logits(fast, ids, 12)
        ref, ref_logits = run_with_logits(slow, ids, 12)
        assert ours == ref and torch.equal(our_logits, ref_logits)
    assert fast.model._decode_layer_args and not slow.model._decode_layer_args  # both paths ran
    # several sequences decoding together (rows up to the kernels' limit, then beyond it)
    for n in (3, 12):
        batch = {str(i): (PROMPTS[i % 3] + [i], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
                 for i in range(n)}
        assert fast.generate(batch) == slow.generate(batch)


def test_steps_it_cannot_run_take_the_python_layers(tiny_dir, monkeypatch):
    from prefloop.server.model import llama
    engine = engine_for(tiny_dir, "int4", True)
    calls = []
    real = llama.LlamaModel.decode_layer_args
    monkeypatch.setattr(llama.LlamaModel, "decode_layer_args",
                        lambda self, n, dtype: calls.append(real(self, n, dtype) is not None)
                        or real(self, n, dtype))
    engine.generate({"a": (PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))})
    assert calls[0] is False and all(calls[1:])  # the prefill in Python, the decode steps in one call
    assert llama._layer_args(engine.model.layers[0]) is not None
    plain = load_model(tiny_dir, dtype="bfloat16", weight_layout="plain")  # F.linear weights
    assert llama._layer_args(plain.layers[0]) is None
    torch_kernels = load_model(tiny_dir, dtype="bfloat16", quantize="int4", quant_kernel="torch")
    assert llama._layer_args(torch_kernels.layers[0]) is None
    biased = load_model(save_tiny(tiny_dir.parent / "biased", attention_bias=True), dtype="bfloat16",
                        quantize="int4")
    assert llama._layer_args(biased.layers[0]) is None  # q/k/v biases: not in the one call


@pytest.mark.parametrize("quantize", ["int4", "none"])
def test_rows_on_adapters_get_the_same_updates_in_one_call(tmp_path, quantize, monkeypatch):
    """A batch mixing two adapter versions and the plain weights: the one-call layers add each
    row's LoRA update with the same native kernel call LoraLinear makes, so every sequence decodes
    the Python layers' tokens."""
    from adapter_helpers import publish_random_adapter

    from prefloop.server.model import adapters, llama, lora
    from prefloop.server.registry import Registry
    if quantize == "none" and packing_unavailable("cpu", torch.bfloat16):
        pytest.skip("oneDNN cannot pack bfloat16 weights on this CPU")
    registry = Registry(tmp_path / "data")
    registry.ensure_base(save_tiny(tmp_path / "tiny"))
    versions = [publish_random_adapter(registry, "v0000", seed=s)[0] for s in (1, 2)]
    real, one_call_steps = llama._lora_args, []
    monkeypatch.setattr(llama, "_lora_args", lambda *a: one_call_steps.append(1) or real(*a))
    results = []
    for one_call in (True, False):
        engine = engine_for(registry.version_dir("v0000"), quantize, one_call)
        lora.enable(engine.model)
        ids = [engine.add_adapter(adapters.adapter_factors(registry.version_dir(v))) for v in versions]
        for i, prompt in enumerate(PROMPTS[:2]):  # 6 rows: within the int4 kernels' 8
            for adapter in (0, *ids):
                engine.add_request(f"{i}-{adapter}", prompt,
                                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), adapter=adapter)
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                done.setdefault(out.request_id, []).extend(out.new_token_ids)
        results.append(done)
    assert one_call_steps  # the adapter rows went through the one-call layers
    assert results[0] == results[1]
    assert len({tuple(v) for k, v in results[0].items() if k.startswith("0-")}) == 3  # adapters matter


def test_decode_steps_reuse_their_lora_arguments_until_the_adapters_change(tmp_path, monkeypatch):
    """The one-call layers' LoRA arguments (120 Python calls a step on the default model) are
    built once for a layout of rows on adapters and reused while it holds; adding an adapter makes
    them anew."""
    from adapter_helpers import publish_random_adapter

    from prefloop.server.model import adapters, llama
    from prefloop.server.registry import Registry
    registry = Registry(tmp_path / "data")
    registry.ensure_base(save_tiny(tmp_path / "tiny"))
    versions = [publish_random_adapter(registry, "v0000", seed=s)[0] for s in (1, 2)]
    engine = engine_for(registry.version_dir("v0000"), "int4", True)
    first = engine.add_adapter(adapters.adapter_factors(registry.version_dir(versions[0])))
    real, built = llama._lora_args, []
    monkeypatch.setattr(llama, "_lora_args", lambda *a: built.append(1) or real(*a))
    layers = len(engine.model.layers)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def decode(request_id: str) -> list[int]:
        engine.add_request(request_id, PROMPTS[0], params, adapter=first)
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        return tokens

    tokens = decode("a")
    assert len(built) == layers  # five decode steps, one build
    generation = engine.model.adapter_generation
    engine.add_adapter(adapters.adapter_factors(registry.version_dir(versions[1])))
    assert engine.model.adapter_generation > generation
    built.clear()
    assert decode("b") == tokens  # the same adapter: the same answer
    assert len(built) == layers  # built anew once after the change
