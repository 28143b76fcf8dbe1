"""Engine behaviour on a tiny random Llama: cache stability, batching invariance, preemption,
prefix caching, aborts, n candidates, seeds, stop tokens, chunked prefill and bad input."""
import pytest
import torch
from tiny_models import greedy, random_prompts, save_tiny
from transformers import AutoModelForCausalLM

from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.engine.scheduler import SchedulerConfig
from prefloop.server.errors import InvalidArgument, ResourceExhausted
from prefloop.server.model.loader import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "m", "llama", attention_bias=True)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


def make_engine(model, tokens=4096, block_size=4, **sched):
    return LLMEngine(model, KVCacheConfig(block_size=block_size, capacity_tokens=tokens),
                     SchedulerConfig(**sched) if sched else None)


def prompts(count):
    return random_prompts(count, seed=7)


def slots_of(seq, bs):
    return [seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_computed)]


def cached_kv(engine, seq):
    bs = engine.blocks.block_size
    idx = torch.tensor(slots_of(seq, bs))
    return [(k.view(-1, *k.shape[2:])[idx].clone(), v.view(-1, *v.shape[2:])[idx].clone())
            for k, v in engine.runner.kv_caches]


def test_cached_kv_bit_identical_after_more_steps_and_equal_to_recompute(tiny_model, tiny_dir):
    engine = make_engine(tiny_model)
    engine.add_request("a", list(range(5, 30)), greedy(30))
    seq = engine.requests["a"].seqs[0]
    for _ in range(4):
        engine.step()
    n_before = seq.num_computed
    before = cached_kv(engine, seq)
    for _ in range(12):
        engine.step()
    after = cached_kv(engine, seq)
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1[:n_before]) and torch.equal(v0, v1[:n_before])
    # cached K (rotated at write time) equals K from a full recompute by transformers
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.tensor([seq.token_ids[:seq.num_computed]])
    past = hf(ids, use_cache=True).past_key_values
    for layer, (k, v) in enumerate(after):
        ref_k = past.layers[layer].keys[0].transpose(0, 1)  # [seq, kvh, hd]
        ref_v = past.layers[layer].values[0].transpose(0, 1)
        assert torch.allclose(k, ref_k, atol=1e-5) and torch.allclose(v, ref_v, atol=1e-5)


def test_batching_invariance_with_and_without_preemption(tiny_model):
    ps = prompts(16)
    alone = [make_engine(tiny_model).generate({"x": (p, greedy(24))})["x"][0] for p in ps]
    batched_engine = make_engine(tiny_model)
    batched = batched_engine.generate({str(i): (p, greedy(24)) for i, p in enumerate(ps)})
    assert [batched[str(i)][0] for i in range(16)] == alone
    # a cache of 96 tokens cannot hold 16 sequences of up to 63 tokens: preemption must happen
    tiny_cache = make_engine(tiny_model, tokens=96, block_size=4)
    squeezed = tiny_cache.generate({str(i): (p, greedy(24)) for i, p in enumerate(ps)})
    assert tiny_cache.scheduler.num_preemptions > 0
    assert [squeezed[str(i)][0] for i in range(16)] == alone
    assert tiny_cache.blocks.num_free == tiny_cache.blocks.num_blocks


def test_prefix_caching_same_tokens_and_counts_hits(tiny_model):
    system = list(range(10, 42))  # a shared 32-token "system prompt"
    reqs = {f"r{i}": (system + [50 + i, 60 + i], greedy(8)) for i in range(4)}
    cold = make_engine(tiny_model, block_size=4)
    cold.blocks.enable_prefix_caching = False
    expected = cold.generate(reqs)
    warm = make_engine(tiny_model, block_size=4)
    first = warm.generate({"r0": reqs["r0"]})
    rest = warm.generate({k: v for k, v in reqs.items() if k != "r0"})
    assert {**first, **rest} == expected
    assert warm.stats().prefix_cache_hit_tokens >= 3 * 32  # each later request skipped the system prompt
    assert cold.stats().prefix_cache_hit_tokens == 0


def test_abort_returns_every_block(tiny_model):
    engine = make_engine(tiny_model)
    total = engine.blocks.num_free
    engine.add_request("a", list(range(3, 50)), greedy(100))
    engine.add_request("b", list(range(3, 20)), SamplingParams(temperature=0.8, n=3, max_tokens=100))
    for _ in range(6):
        engine.step()
    assert engine.blocks.num_free < total
    engine.abort("a")
    engine.abort("b")
    assert engine.blocks.num_free == total and not engine.has_unfinished()
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_n_candidates_share_prompt_blocks_and_seed_is_reproducible(tiny_model):
    params = SamplingParams(temperature=1.0, n=4, seed=123, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 35))  # 32 tokens = 8 full blocks of 4
    engine = make_engine(tiny_model)
    engine.add_request("n", prompt, params)
    engine.step()  # the whole prompt in one chunk; candidates fork here
    seqs = engine.requests["n"].seqs
    assert len(seqs) == 4
    shared = set(seqs[0].block_table[:8])
    assert all(set(s.block_table[:8]) == shared for s in seqs)
    assert all(engine.blocks.ref_counts[b] == 4 for b in shared)
    while engine.has_unfinished():
        engine.step()
    alone = make_engine(tiny_model).generate({"n": (prompt, params)})["n"]
    busy = make_engine(tiny_model).generate({"n": (prompt, params),
                                             **{f"o{i}": (p, greedy(10)) for i, p in enumerate(prompts(6))}})["n"]
    assert alone == busy  # same seed, same request -> same tokens, alone or batched
    assert len({tuple(v) for v in alone.values()}) > 1  # candidates differ from each other
    other_seed = make_engine(tiny_model).generate(
        {"n": (prompt, SamplingParams(temperature=1.0, n=4, seed=124, max_tokens=12, ignore_eos=True))})["n"]
    assert other_seed != alone


def test_greedy_frequency_and_presence_penalties_match_a_reference_loop_on_transformers(
        tiny_model, tiny_dir):
    """Oracle: transformers' logits of the whole sequence, the completion's token counts
    subtracted by hand (frequency per occurrence, presence once; the prompt's tokens do not
    count), argmax. The penalties are large enough to change the answer."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    prompt = prompts(1)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                            frequency_penalty=0.2, presence_penalty=0.1)
    ours = make_engine(tiny_model).generate({"a": (prompt, params)})["a"][0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ids[len(prompt):] or [0]),
                                    minlength=logits.shape[0]).float()
            if len(ids) == len(prompt):
                counts.zero_()
            ids.append(int(torch.argmax(logits - 0.2 * counts - 0.1 * (counts > 0).float())))
    assert ours == ids[len(prompt):]
    assert ours != make_engine(tiny_model).generate({"a": (prompt, greedy(16))})["a"][0]


def test_stop_token_ids_and_max_tokens(tiny_model):
    engine = make_engine(tiny_model)
    free_run = engine.generate({"a": ([5, 6, 7], greedy(20))})["a"][0]
    stop_tok = free_run[5]
    first = free_run.index(stop_tok)
    engine.add_request("b", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop_tok,)))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == free_run[:first + 1]
    assert outs[-1].finish_reason == "stop"
    assert len(free_run) == 20


def test_chunked_prefill_does_not_stall_decodes(tiny_model):
    engine = make_engine(tiny_model, max_num_batched_tokens=16)
    engine.add_request("short", [5, 6, 7], greedy(40))
    engine.step()
    engine.add_request("long", list(range(3, 200)), greedy(4))
    produced = 0
    for _ in range(6):  # the long prompt needs 13 chunks; the short stream keeps decoding meanwhile
        produced += sum(len(o.new_token_ids) for o in engine.step() if o.request_id == "short")
    assert produced == 6
    long_seq = engine.requests["long"].seqs[0]
    assert 0 < long_seq.num_computed < 197


@pytest.mark.parametrize("ids,params,err", [
    ([], greedy(4), InvalidArgument),
    (list(range(3, 250)) * 3, greedy(4), InvalidArgument),  # 741 tokens > context 512
    ([5, 6], SamplingParams(temperature=0, max_tokens=600), InvalidArgument),
    ([5, 999], greedy(4), InvalidArgument),  # token id outside the vocabulary
])
def test_bad_requests_rejected_and_engine_keeps_serving(tiny_model, ids, params, err):
    engine = make_engine(tiny_model)
    engine.add_request("ok", [5, 6, 7], greedy(5))
    with pytest.raises(err):
        engine.add_request("bad", ids, params)
    produced = []
    while engine.has_unfinished():
        produced += [t for o in engine.step() for t in o.new_token_ids if o.request_id == "ok"]
    assert len(produced) == 5  # the good request was served in full
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_request_larger_than_cache_is_resource_exhausted(tiny_model):
    with pytest.raises(ResourceExhausted, match="KV cache"):
        make_engine(tiny_model, tokens=32).add_request("x", list(range(3, 30)), greedy(40))


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=-0.1), dict(n=0), dict(top_k=-1),
                                    dict(repetition_penalty=0.0), dict(stop=("",)),
                                    dict(frequency_penalty=2.5), dict(presence_penalty=-2.01)])
def test_sampling_params_validation(kwargs):
    with pytest.raises(InvalidArgument):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty",
                                  "frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_sampling_values_are_refused(name, value):
    with pytest.raises(InvalidArgument, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value})


def test_stop_strings_are_bounded_in_count_and_length():
    SamplingParams(stop=tuple(f"s{i}" for i in range(16)))  # the limits themselves are fine
    SamplingParams(stop=("x" * 256,))
    with pytest.raises(InvalidArgument, match="at most 16 stop strings.*got 10000"):
        SamplingParams(stop=tuple(f"s{i}" for i in range(10_000)))
    with pytest.raises(InvalidArgument, match="at most 256 characters.*257"):
        SamplingParams(stop=("ok", "x" * 257))


def test_kv_bytes_per_token_is_exact(tiny_model):
    cfg = tiny_model.config
    assert cfg.kv_bytes_per_token(4) == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    engine = make_engine(tiny_model, tokens=64)
    total = sum(t.numel() * t.element_size() for kv in engine.runner.kv_caches for t in kv)
    assert total == cfg.kv_bytes_per_token(4) * engine.blocks.num_blocks * engine.blocks.block_size
    assert engine.stats().kv_bytes_per_token == cfg.kv_bytes_per_token(4)


@pytest.mark.parametrize("overflow", ["error", "truncate"])
def test_prompt_is_checked_once_per_request_through_the_async_engine(tiny_model, monkeypatch, overflow):
    import asyncio

    from prefloop.server.engine import context
    from prefloop.server.engine.async_engine import AsyncEngine

    calls = []
    real = context.admission_drop
    monkeypatch.setattr(context, "admission_drop", lambda *a: calls.append(a) or real(*a))
    engine = LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=256),
                       max_model_len=32, context=context.ContextConfig(overflow))
    runner = AsyncEngine(engine)
    runner.start()

    async def run(prompt):
        return [o async for o in runner.generate("r", prompt, SamplingParams(temperature=0, max_tokens=4))]
    try:
        outs = asyncio.run(run(list(range(1, 11))))
        assert outs[-1].finish_reason == "length" and len(calls) == 1
        if overflow == "truncate":  # the one check's answer reaches the sequence: 40 -> 28 tokens
            calls.clear()
            assert [o.finish_reason for o in asyncio.run(run(list(range(1, 41))))][-1] == "length"
            assert len(calls) == 1 and engine.num_truncated_prompts == 1
    finally:
        runner.stop()
