"""`--compile`: the model step through torch.compile keeps transformers' tokens and logits (fp32,
1e-4), keeps a request's output independent of its batch, compiles only while the engine starts
(never on a request), works with `--quantize int8`, and is refused clearly where it cannot run.
On a tiny Llama (GQA, biases); the same parity on the default model ran here until 2026-12-04 and
left the suite for its 72 s of inductor compile (the default model compiled is run, for speed, by
`benchmarks/engine_throughput.py --compile`)."""
import threading

import pytest
import torch
from test_parity import check_parity
from tiny_models import greedy, random_prompts, save_tiny
from torch._dynamo.utils import counters

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import SchedulerConfig
from prefloop.server.errors import InvalidArgument
from prefloop.server.model.loader import load_model
from prefloop.server.serving.build import build_generator


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # GQA, untied embeddings, q/k/v/o bias
    return save_tiny(tmp_path_factory.mktemp("tiny") / "m", "llama", attention_bias=True)


def prompts(count):
    return random_prompts(count, seed=11)


def engine_for(model, tokens=4096, **sched):
    return LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=tokens),
                     SchedulerConfig(**sched) if sched else None)


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_step_matches_transformers(tiny_dir):
    check_parity(tiny_dir, [[1, 5, 9, 33, 7], list(range(3, 40)), [1] + [17] * 9], max_tokens=16,
                 compile=True)


def test_compiles_at_start_only_and_batching_invariant(tiny_dir):
    eager = load_model(tiny_dir)
    compiled = load_model(tiny_dir, compile=True)
    torch._dynamo.reset()  # forget graphs compiled by other tests: this engine's start must compile
    before = graphs_compiled()
    engine = engine_for(compiled)  # warm-up compiles here
    assert graphs_compiled() > before
    after_start = graphs_compiled()
    ps = prompts(12)
    reference = [engine_for(eager).generate({"x": (p, greedy(20))})["x"][0] for p in ps]
    alone = [engine.generate({"x": (p, greedy(20))})["x"][0] for p in ps[:3]]
    batched = engine.generate({str(i): (p, greedy(20)) for i, p in enumerate(ps)})
    # small chunked-prefill budget + tiny cache: partial chunks, mixed steps and preemption
    squeezed_engine = engine_for(compiled, tokens=96, max_num_batched_tokens=24)
    squeezed = squeezed_engine.generate({str(i): (p, greedy(20)) for i, p in enumerate(ps)})
    n2 = engine.generate({"n": (ps[0], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=8))})
    assert squeezed_engine.scheduler.num_preemptions > 0
    assert alone == reference[:3]
    assert [batched[str(i)][0] for i in range(12)] == reference
    assert [squeezed[str(i)][0] for i in range(12)] == reference
    assert len(n2["n"]) == 2
    assert graphs_compiled() == after_start, "a request triggered compilation"


@pytest.mark.parametrize("compile", [False, True])
def test_two_engines_stepping_on_two_threads(tiny_dir, compile):
    """During a hot swap the old and the new version's engines step at once on their own threads;
    each layer must read its own engine's caches and metadata (step_context is thread-local)."""
    ps = prompts(8)
    reference = engine_for(load_model(tiny_dir)).generate({str(i): (p, greedy(24)) for i, p in enumerate(ps)})
    engines = [engine_for(load_model(tiny_dir, compile=compile)) for _ in range(2)]
    results = [None, None]

    def run(k):
        results[k] = engines[k].generate({str(i): (p, greedy(24)) for i, p in enumerate(ps)})

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [reference, reference]


@pytest.mark.parametrize("dtype,quantize", [("float32", "int8"), ("bfloat16", "int4")])
def test_compiled_quantized_equals_eager_quantized(tiny_dir, dtype, quantize):
    """float32: torch's int8 kernel; bfloat16: the native integer-dot kernels where the CPU has
    AVX512-VNNI (server/model/quant_gemv.py), one opaque op inside the compiled graph."""
    eager = engine_for(load_model(tiny_dir, dtype=dtype, quantize=quantize))
    compiled = engine_for(load_model(tiny_dir, dtype=dtype, quantize=quantize, compile=True))
    ps = prompts(6)
    for engine_out in (compiled.generate({str(i): (p, greedy(16)) for i, p in enumerate(ps)}),
                       {"0": compiled.generate({"0": (ps[0], greedy(16))})["0"]}):
        expected = eager.generate({k: (ps[int(k)], greedy(16)) for k in engine_out})
        assert engine_out == expected


def test_compile_refused_with_vllm_and_without_a_compiler(monkeypatch):
    with pytest.raises(InvalidArgument, match="native-engine option"):
        build_generator(backend="vllm", compile=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(InvalidArgument, match="C\\+\\+ compiler"):
        build_generator(compile=True)
