"""Giving an unloaded version's memory back (server/serving/memory.py): freed heap pages that
glibc keeps are returned by `release_freed_memory`."""
import os
import subprocess
import sys

import pytest

from prefloop.server.serving import memory

CHILD = """
from prefloop.server.serving.memory import release_freed_memory, rss_bytes
blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 128 MB in blocks under the mmap threshold
top = bytearray(64 * 1024)  # allocated after them: the heap cannot shrink from its top
del blocks
freed = rss_bytes()
given = release_freed_memory("test blocks")
print(freed, given, rss_bytes())
"""


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="no malloc_trim in this C library")
def test_release_gives_freed_heap_pages_back_that_free_alone_kept():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    freed, given, after = map(int, out.stdout.split())
    assert freed > 120 * 2**20  # freeing 128 MB of blocks left them resident
    assert given > 100 * 2**20 and after < freed - 100 * 2**20


def test_rss_is_measured_here():
    assert memory.rss_bytes() > 10 * 2**20


def test_release_waits_until_the_object_is_gone():
    class Weights:
        pass

    released = []
    obj = Weights()
    original = memory.release_freed_memory
    memory.release_freed_memory = released.append
    try:
        thread = memory.release_when_collected(obj, "v0001")
        thread.join(0.3)
        assert thread.is_alive() and released == []  # still held: nothing released yet
        del obj
        thread.join(5)
        assert not thread.is_alive() and released == ["v0001"]
    finally:
        memory.release_freed_memory = original


def test_a_retired_version_frees_its_weights_and_kv_cache_while_still_referenced():
    """Hot-swap and the end of an A/B test: the retired engine's tensors go at once, even while
    something (here the test) still holds its Backend, engine and model."""
    import asyncio
    import weakref

    from prefloop.server.model.loader import resolve_model_dir
    from prefloop.server.serving.build import build_generator

    model_dir = resolve_model_dir(None)  # the default model (a tiny one has no tokenizer)

    async def swap_and_close():
        generator = build_generator(model=str(model_dir), kv_cache_tokens=256,
                                    model_version="v0000")
        await generator.start()
        old = generator._current
        llm = old.engine.engine
        weight = weakref.ref(next(llm.model.parameters()))
        cache = weakref.ref(llm.runner.kv_caches[0][0])
        await generator.swap(model_dir, "v0001")
        new = generator._current
        await generator.close()  # joins the retire thread
        return old, new, weight, cache

    old, new, weight, cache = asyncio.run(swap_and_close())
    assert old.owns_weights and weight() is None and cache() is None
    assert list(old.engine.engine.model.parameters()) == []
    assert list(new.engine.engine.model.parameters()) == []  # closed: freed as well


def test_the_arena_cap_is_set_unless_the_environment_sets_one():
    code = ("from prefloop.server.serving.memory import limit_malloc_arenas; "
            "print(limit_malloc_arenas())")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=env)
    assert capped.stdout.strip() == ("True" if memory._MALLOC_TRIM is not None else "False")
    env["MALLOC_ARENA_MAX"] = "4"
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env)
    assert kept.stdout.strip() == "False"  # the operator's choice stands


_SHAPES_CODE = """
import ctypes, os, sys
import torch
from prefloop.server.serving import memory
if sys.argv[1] == "cap":
    print(memory.limit_shape_caches(), flush=True)
w = torch.randn(1536, 576).bfloat16()
before = memory.rss_bytes()
for rows in range(1, 401):  # 400 row counts: 400 matmul shapes, as prefill chunks give
    torch.nn.functional.linear(torch.randn(rows, 576).bfloat16(), w)
ctypes.CDLL("libc.so.6").malloc_trim(0)
print((memory.rss_bytes() - before) / 2**20)
"""


@pytest.mark.skipif(memory._MALLOC_TRIM is None, reason="needs glibc")
def test_capped_shape_caches_keep_far_less_after_many_matmul_shapes():
    """400 distinct bf16 matmul shapes: with torch's default caches (1024 entries each) the
    process keeps far more than under the server's cap (64), measured in two fresh processes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}

    def grown(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _SHAPES_CODE, mode], capture_output=True,
                             text=True, check=True, env=env).stdout.split("\n")
        return out[0], float(out[-2])

    _, default = grown("default")
    said, capped = grown("cap")
    assert "'LRU_CACHE_CAPACITY': '64'" in said and "'ONEDNN_PRIMITIVE_CACHE_CAPACITY': '64'" in said
    assert default > 40 and capped < default / 2, (default, capped)


def test_the_shape_cache_cap_leaves_an_operators_setting_alone(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert memory.limit_shape_caches(32) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32"}
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"
