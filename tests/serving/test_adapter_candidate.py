"""An A/B candidate that is a LoRA adapter over the served version runs on the served engine
(server/serving/generator.py `load_beside` -> AdapterGenerator): no second engine, its answers
are those of the merged version on an engine of its own, the control's stay the control's, and
closing it unloads the adapter."""
from __future__ import annotations

import asyncio

import pytest
from adapter_helpers import publish_random_adapter

from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.model.loader import resolve_model_dir
from prefloop.server.registry import Registry
from prefloop.server.serving.build import build_generator
from prefloop.server.serving.generator import AdapterGenerator, Generator

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
QUESTIONS = ["Name a colour.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("adapter-ab") / "data")
    registry.ensure_base(resolve_model_dir(None))
    publish_random_adapter(registry, "v0000", seed=3, scale=0.2)
    return registry


async def _answers(generator, tag: str) -> list[str]:
    async def one(i, q):
        ids = generator.chat_ids([{"role": "user", "content": q}])
        return "".join([d.text_delta async for d in generator.stream(f"{tag}-{i}", ids, GREEDY)])
    return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(QUESTIONS))))


def test_an_adapter_candidate_shares_the_engine_and_answers_as_the_merged_version(registry):
    async def run():
        control = build_generator(model=str(registry.version_dir("v0000")),
                                  model_version="v0000", dtype="float32", kv_cache_tokens=2048)
        await control.start()
        candidate = await control.load_beside(registry.version_dir("v0001"), "v0001")
        engine = control._current.engine
        both = await asyncio.gather(_answers(control, "c"), _answers(candidate, "a"))
        loaded = dict(engine.engine.adapters)
        await candidate.close()
        after = dict(engine.engine.adapters)
        await control.close()
        alone = build_generator(model=str(registry.version_dir("v0001")), model_version="v0001",
                                dtype="float32", kv_cache_tokens=2048)
        await alone.start()
        merged = await _answers(alone, "m")
        fresh = build_generator(model=str(registry.version_dir("v0000")), model_version="v0000",
                                dtype="float32", kv_cache_tokens=2048)
        await fresh.start()
        base = await _answers(fresh, "b")
        await alone.close()
        await fresh.close()
        return candidate, both, loaded, after, merged, base

    candidate, (control_answers, candidate_answers), loaded, after, merged, base = asyncio.run(run())
    assert isinstance(candidate, AdapterGenerator) and not isinstance(candidate, Generator)
    assert candidate.info.model_version == "v0001"
    assert len(loaded) == 1 and 0 < next(iter(loaded.values())) < 20 * 2**20  # a few MB
    assert after == {}  # closed: unloaded
    assert candidate_answers == merged and control_answers == base
    assert candidate_answers != control_answers  # the adapter changed something
