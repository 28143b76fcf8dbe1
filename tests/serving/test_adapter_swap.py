"""Adapter versions on the serving engine (server/serving/generator.py), against the oracle of
each version loaded alone (merged weights, an engine of its own):

An A/B candidate that is a LoRA adapter over the served version runs on the served engine
(`load_beside` -> AdapterGenerator): no second engine, its answers are those of the merged
version, the control's stay the control's, and closing it unloads the adapter.

A hot-swap to a version that is the serving engine's weights plus LoRA adapters loads nothing
(`Generator.swap` -> `_adapter_view`): new requests run on the same
engine with the chain's adapters as one per-request adapter and answer as the merged version on an
engine of its own; a request already running finishes on the version it started with; a rollback
to the engine's own weights is instant too; a full version still gets its own engine, and the old
engine stops only when no version on it is left. With `merge_adapters` (the server's default) a
swap to an adapter is served that way at once and then moves to the version's merged weights,
loaded in the background; a newer swap cancels a merge still loading."""
from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from adapter_helpers import publish_random_adapter

from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.model import adapters
from prefloop.server.model.loader import resolve_model_dir
from prefloop.server.registry import Registry
from prefloop.server.serving.build import build_generator
from prefloop.server.serving.generator import AdapterGenerator, Generator

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
QUESTIONS = ["Name a colour.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v0000 the default model; v0001 an adapter over it; v0002 an adapter over v0001; v0003 the
    merged weights of v0002 published as a full version."""
    root = tmp_path_factory.mktemp("adapter-swap")
    registry = Registry(root / "data")
    registry.ensure_base(resolve_model_dir(None))
    publish_random_adapter(registry, "v0000", seed=3, scale=0.2)
    publish_random_adapter(registry, "v0001", seed=4, scale=0.2)
    merged = adapters.write_merged(registry.version_dir("v0002"), root / "merged")
    with registry.stage() as stage:
        for p in merged.iterdir():
            shutil.copyfile(p, stage.path / p.name)
        stage.publish(kind="policy", method="dpo", parent="v0002")
    return registry


def _generator(registry, version):
    return build_generator(model=str(registry.version_dir(version)), model_version=version,
                           dtype="float32", kv_cache_tokens=2048)


async def _answers(generator, tag: str) -> list[str]:
    async def one(i, q):
        ids = generator.chat_ids([{"role": "user", "content": q}])
        return "".join([d.text_delta async for d in generator.stream(f"{tag}-{i}", ids, GREEDY)])
    return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(QUESTIONS))))


async def _alone(registry, version) -> list[str]:
    generator = _generator(registry, version)
    await generator.start()
    try:
        return await _answers(generator, f"alone-{version}")
    finally:
        await generator.close()


@pytest.fixture(scope="module")
def alone(registry) -> dict[str, list[str]]:
    """Each version's answers on an engine of its own (adapters merged at load)."""
    return {v: asyncio.run(_alone(registry, v)) for v in ("v0000", "v0001", "v0002")}


def test_an_adapter_candidate_shares_the_engine_and_answers_as_the_merged_version(registry, alone):
    async def run():
        control = _generator(registry, "v0000")
        await control.start()
        candidate = await control.load_beside(registry.version_dir("v0001"), "v0001")
        engine = control._current.engine
        both = await asyncio.gather(_answers(control, "c"), _answers(candidate, "a"))
        loaded = dict(engine.engine.adapters)
        await candidate.close()
        after = dict(engine.engine.adapters)
        await control.close()
        return candidate, both, loaded, after

    candidate, (control_answers, candidate_answers), loaded, after = asyncio.run(run())
    assert isinstance(candidate, AdapterGenerator) and not isinstance(candidate, Generator)
    assert candidate.info.model_version == "v0001"
    assert len(loaded) == 1 and 0 < next(iter(loaded.values())) < 20 * 2**20  # a few MB
    assert after == {}  # closed: unloaded
    assert candidate_answers == alone["v0001"] and control_answers == alone["v0000"]
    assert candidate_answers != control_answers  # the adapter changed something


def test_chain_factors_are_the_summed_deltas_of_the_adapters_after_the_engine_version(registry):
    v1, v2 = registry.version_dir("v0001"), registry.version_dir("v0002")
    over_root = adapters.chain_factors(v2, "v0000")
    summed = adapters.chain_deltas([v1, v2])
    assert set(over_root) == set(summed)
    for name, (a, b) in over_root.items():
        assert a.shape[0] == 8 and b.shape[1] == 8  # rank 4 + 4
        torch.testing.assert_close(b @ a, summed[name], rtol=1e-5, atol=1e-6)
    over_v1 = adapters.chain_factors(v2, "v0001")
    own = adapters.adapter_factors(v2)
    assert all(torch.equal(over_v1[n][0], own[n][0]) and torch.equal(over_v1[n][1], own[n][1])
               for n in own)
    assert adapters.chain_factors(v1, "v0001") == {}
    assert adapters.chain_factors(registry.version_dir("v0000"), "v0001") is None  # not its chain
    assert adapters.chain_factors(v2, "v0003") is None


def test_swaps_along_an_adapter_chain_keep_one_engine_and_answer_as_the_merged_versions(registry,
                                                                                         alone):
    async def run():
        generator = _generator(registry, "v0000")
        await generator.start()
        engine = generator._current.engine
        base = await _answers(generator, "base")
        # a long request running on v0000 while the swap happens
        long_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        ids = generator.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
        stream = generator.stream("running", ids, long_params)
        first = await anext(stream)
        seen = {}
        await generator.swap(registry.version_dir("v0001"), "v0001")
        seen["v0001"] = (generator._current.engine is engine, generator._current.adapter,
                         await _answers(generator, "v1"))
        rest = [d async for d in stream]
        running = (first.text_delta + "".join(d.text_delta for d in rest),
                   {first.model_version, *(d.model_version for d in rest)})
        await generator.swap(registry.version_dir("v0002"), "v0002")
        seen["v0002"] = (generator._current.engine is engine, generator._current.adapter,
                         await _answers(generator, "v2"))
        loaded_at_v2 = set(engine.engine.adapters)
        await generator.swap(registry.version_dir("v0000"), "v0000")
        seen["back"] = (generator._current.engine is engine, generator._current.adapter,
                        await _answers(generator, "back"))
        loaded_at_back = set(engine.engine.adapters)
        await generator.swap(registry.version_dir("v0003"), "v0003")
        full_engine = generator._current.engine
        full = await _answers(generator, "full")
        await asyncio.sleep(0)
        for thread in generator._retiring:
            await asyncio.to_thread(thread.join, 30)
        old_stopped = engine.stopping
        await generator.close()
        return base, seen, running, loaded_at_v2, loaded_at_back, full_engine is engine, full, \
            old_stopped

    base, seen, running, at_v2, at_back, full_shares, full, old_stopped = asyncio.run(run())
    assert base == alone["v0000"]
    merged_v1, merged_v2 = alone["v0001"], alone["v0002"]
    same, adapter_v1, answers_v1 = seen["v0001"]
    assert same and adapter_v1 > 0 and answers_v1 == merged_v1 and answers_v1 != base
    same, adapter_v2, answers_v2 = seen["v0002"]
    assert same and adapter_v2 > adapter_v1 and answers_v2 == merged_v2 and answers_v2 != answers_v1
    assert at_v2 == {adapter_v2}  # v0001's adapter left once nothing ran on it
    same, adapter_back, answers_back = seen["back"]
    assert same and adapter_back == 0 and answers_back == base and at_back == set()
    # the request that started on v0000 finished there, whole, under its own name
    assert running[1] == {"v0000"} and running[0].startswith(base[0])
    # a full version: its own engine, the same answers as the chain it was merged from; the old
    # engine stopped once no version on it was left
    assert not full_shares and full == merged_v2 and old_stopped


def _merging_generator(registry, version):
    return build_generator(model=str(registry.version_dir(version)), model_version=version,
                           dtype="float32", kv_cache_tokens=2048, merge_adapters=True)


def test_a_swap_to_an_adapter_is_instant_then_moves_to_its_merged_weights_in_the_background(
        registry, alone):
    async def run():
        generator = _merging_generator(registry, "v0000")
        await generator.start()
        engine = generator._current.engine
        await generator.swap(registry.version_dir("v0001"), "v0001")
        view = (generator._current.engine is engine, generator._current.adapter)
        merging = generator._merging
        # a request that starts on the view, before the merged weights are ready
        long_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        ids = generator.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
        stream = generator.stream("on-view", ids, long_params)
        first = await anext(stream)
        await merging
        merged = (generator._current.engine is engine, generator._current.adapter,
                  generator._current.weights_version, generator.info.model_version)
        answers = await _answers(generator, "merged")
        rest = [d async for d in stream]
        for thread in generator._retiring:
            await asyncio.to_thread(thread.join, 30)
        old_stopped = engine.stopping
        await generator.close()
        on_view = (first.text_delta + "".join(d.text_delta for d in rest),
                   {first.model_version, *(d.model_version for d in rest)})
        return view, merging, merged, answers, on_view, old_stopped

    view, merging, merged, answers, on_view, old_stopped = asyncio.run(run())
    assert view[0] and view[1] > 0  # served at once as an adapter on the same engine
    assert merging is not None and merging.done() and not merging.cancelled()
    # then on an engine of its own, holding the merged weights (no adapter)
    assert merged == (False, 0, "v0001", "v0001")
    assert answers == alone["v0001"]
    # the request that started on the view finished there, whole, as v0001; then the view's
    # engine stopped, nothing being left on it
    assert on_view[1] == {"v0001"} and on_view[0].startswith(alone["v0001"][0])
    assert old_stopped


def test_a_newer_swap_cancels_the_merge_of_the_version_it_replaces(registry, alone):
    async def run():
        generator = _merging_generator(registry, "v0000")
        await generator.start()
        engine = generator._current.engine
        await generator.swap(registry.version_dir("v0001"), "v0001")
        first_merge = generator._merging
        await generator.swap(registry.version_dir("v0002"), "v0002")  # before v0001's load ends
        second_merge = generator._merging
        await asyncio.gather(first_merge, return_exceptions=True)
        await second_merge
        state = (generator._current.engine is engine, generator._current.adapter,
                 generator.info.model_version)
        answers = await _answers(generator, "v2")
        rollback = await generator.swap(registry.version_dir("v0000"), "v0000")  # a full load
        back = (generator._current.adapter, generator._merging, await _answers(generator, "back"))
        await generator.close()
        return first_merge, second_merge, state, answers, rollback, back

    first_merge, second_merge, state, answers, rollback, back = asyncio.run(run())
    assert first_merge.cancelled() and second_merge is not first_merge
    assert state == (False, 0, "v0002") and answers == alone["v0002"]
    # back to v0000 from v0002's merged engine: its own weights again, nothing left to merge
    assert rollback.model_version == "v0000" and back[0] == 0 and back[1] is None
    assert back[2] == alone["v0000"]
