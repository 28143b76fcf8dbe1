"""Engine drivers (server/engine/driver.py): the main-thread driver steps every attached engine on
the thread that calls `run_beside` while asyncio callers run on another; stopping, failures and
exceptions end requests with UNAVAILABLE instead of hanging them; `SignalRelay` hands the main
thread's signals to a loop on another thread."""
import asyncio
import os
import signal
import threading

import pytest
from tiny_models import random_prompts, save_tiny

from prefloop.server.api.signal_relay import SignalRelay
from prefloop.server.engine.async_engine import AsyncEngine
from prefloop.server.engine.driver import MainThreadDriver, ThreadDriver
from prefloop.server.engine.kv_cache import KVCacheConfig
from prefloop.server.engine.llm_engine import LLMEngine
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import Unavailable
from prefloop.server.model.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(save_tiny(tmp_path_factory.mktemp("tiny") / "m", "llama"))


def recorded_engine(model, step_threads: list) -> LLMEngine:
    """An engine that notes the thread of every step."""
    engine = LLMEngine(model, KVCacheConfig(block_size=4, capacity_tokens=512))
    real_step = engine.step

    def step():
        step_threads.append(threading.get_ident())
        return real_step()
    engine.step = step
    return engine


async def tokens(runner: AsyncEngine, rid: str, prompt: list[int], params=GREEDY) -> list[int]:
    out = []
    async for o in runner.generate(rid, prompt, params):
        out += o.new_token_ids
    return out


def test_main_thread_driver_steps_two_engines_on_the_calling_thread_with_the_same_tokens(tiny_model):
    prompts = random_prompts(4, seed=3)
    reference = ThreadDriver()
    ref_runner = AsyncEngine(LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=512)),
                             reference)
    ref_runner.start()
    try:
        expected = asyncio.run(_all(ref_runner, ref_runner, prompts))
    finally:
        ref_runner.stop()

    threads: list[int] = []
    driver = MainThreadDriver()
    a = AsyncEngine(recorded_engine(tiny_model, threads), driver)
    b = AsyncEngine(recorded_engine(tiny_model, threads), driver)  # e.g. an A/B test's candidate
    api_thread = {}

    def api():
        api_thread["id"] = threading.get_ident()
        a.start()
        b.start()
        assert a.healthy and b.healthy
        try:
            return asyncio.run(_all(a, b, prompts))
        finally:
            a.stop()
            b.stop()

    got = driver.run_beside(api)
    assert got == expected  # the same greedy tokens as an engine on its own thread
    assert threads and set(threads) == {threading.get_ident()}  # every step on this thread
    assert api_thread["id"] != threading.get_ident()
    assert not a.healthy and not b.healthy


async def _all(a: AsyncEngine, b: AsyncEngine, prompts) -> list[list[int]]:
    return await asyncio.gather(*(tokens(a if i % 2 else b, f"r{i}", p) for i, p in enumerate(prompts)))


def test_stopping_an_engine_mid_stream_fails_its_request_and_frees_its_blocks(tiny_model):
    driver = MainThreadDriver()
    runner = AsyncEngine(LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=512)), driver)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    def api():
        runner.start()

        async def go():
            stream = runner.generate("r", random_prompts(1, seed=1)[0], long)
            first = await stream.__anext__()
            assert first.new_token_ids
            await asyncio.to_thread(runner.stop)  # returns once the stepping thread let go
            with pytest.raises(Unavailable, match="engine stopped"):
                async for _ in stream:
                    pass
        asyncio.run(go())

    driver.run_beside(api)
    assert not runner.engine.requests
    assert runner.engine.blocks.num_free == runner.engine.blocks.num_blocks


def test_run_beside_reraises_and_fails_what_still_runs(tiny_model):
    driver = MainThreadDriver()
    runner = AsyncEngine(LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=512)), driver)
    runner.start()
    runner.engine.add_request("left", random_prompts(1, seed=2)[0],
                              SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))

    def api():
        raise ValueError("the servers failed")

    with pytest.raises(ValueError, match="the servers failed"):
        driver.run_beside(api)
    assert not runner.engine.requests and not runner.healthy


def test_a_failing_stepping_loop_asks_the_servers_to_stop(tiny_model):
    driver = MainThreadDriver()
    runner = AsyncEngine(LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=512)), driver)
    asked = threading.Event()

    def broken():
        raise RuntimeError("a bug outside the step")
    runner.run_once = broken

    def api():
        runner.start()
        assert asked.wait(10), "on_failure was not called"
        return "ended"

    assert driver.run_beside(api, on_failure=asked.set) == "ended"
    assert not runner.healthy


def test_signal_relay_hands_sigterm_to_a_loop_on_another_thread():
    got = []
    ready, done = threading.Event(), threading.Event()
    holder = {}

    def loop_thread():
        async def main():
            holder["loop"] = asyncio.get_running_loop()
            ready.set()
            await asyncio.to_thread(done.wait, 10)
        asyncio.run(main())

    before = signal.getsignal(signal.SIGTERM)
    relay = SignalRelay()
    assert signal.getsignal(signal.SIGTERM) != before  # installed
    t = threading.Thread(target=loop_thread)
    t.start()
    try:
        assert ready.wait(10)
        relay.connect(holder["loop"], lambda signum: (got.append((signum, threading.current_thread())),
                                                      done.set()))
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs on this (main) thread, then the loop's
        assert done.wait(10)
    finally:
        done.set()
        t.join()
        relay.restore()
    assert got and got[0][0] == signal.SIGTERM and got[0][1] is t
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_signal_relay_refuses_a_worker_thread():
    errors = []
    t = threading.Thread(target=lambda: _try(SignalRelay, errors))
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


def _try(fn, errors):
    try:
        fn()
    except RuntimeError as exc:
        errors.append(exc)


@pytest.mark.parametrize("driver", [ThreadDriver, MainThreadDriver])
def test_a_stopped_engine_frees_its_kv_cache_while_something_still_holds_it(tiny_model, driver):
    import weakref

    engine = LLMEngine(tiny_model, KVCacheConfig(block_size=4, capacity_tokens=512))
    runner = AsyncEngine(engine, driver())
    cache = weakref.ref(engine.runner.kv_caches[0][0])
    runner.start()
    if driver is ThreadDriver:
        assert asyncio.run(tokens(runner, "r", [1, 2, 3]))  # it served with that cache
    runner.stop()
    assert cache() is None  # freed although `engine` and `runner` are still referenced here
    assert engine.runner.kv_caches == [] and not runner.healthy


def test_a_steps_outputs_reach_the_event_loop_in_one_wake_up(tiny_model):
    """Four streams decoding together: each step's outputs are handed to the loop in one
    `call_soon_threadsafe` (a wake-up through its self-pipe, a syscall), not one per stream, and
    every stream still gets all its tokens."""
    steps: list[int] = []
    runner = AsyncEngine(recorded_engine(tiny_model, steps), ThreadDriver())
    runner.start()
    prompts = random_prompts(4, seed=5)

    async def go():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            calls.append(callback)
            return real(callback, *args, **kwargs)
        loop.call_soon_threadsafe = counting
        got = await asyncio.gather(*(tokens(runner, f"r{i}", p) for i, p in enumerate(prompts)))
        return got, len(calls)

    try:
        got, wake_ups = asyncio.run(go())
    finally:
        runner.stop()
    assert [len(t) for t in got] == [GREEDY.max_tokens] * 4
    assert 0 < wake_ups <= len(steps) < 4 * GREEDY.max_tokens  # one per step, not one per output
