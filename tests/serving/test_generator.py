"""The asyncio Generator and `prefloop generate` on the default model: streaming, stop strings,
n candidates, aborts, and the CLI's JSON output."""
import asyncio
import json
import subprocess
import sys
import time

import pytest

from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument
from prefloop.server.serving.build import build_generator


pytestmark = pytest.mark.slow  # loads the default model


@pytest.fixture(scope="module")
def loaded_gen():
    g = build_generator(kv_cache_tokens=8192, dtype="float32")
    asyncio.run(g.start())
    yield g
    asyncio.run(g.close())


@pytest.fixture
def gen(loaded_gen):
    """The module's generator with no request running: an abort (a stop string, a cancelled
    stream) reaches the engine thread asynchronously, so each test starts from an idle engine
    whatever ran before it."""
    for _ in range(200):
        if loaded_gen.stats()["running"] == 0:
            break
        time.sleep(0.05)
    assert loaded_gen.stats()["running"] == 0, "the engine did not go idle"
    return loaded_gen


async def collect(gen, rid, ids, params):
    out = {}
    async for d in gen.stream(rid, ids, params):
        text, toks, reason = out.get(d.index, ("", [], None))
        out[d.index] = (text + d.text_delta, toks + d.token_ids, d.finish_reason)
    return out


def test_stream_matches_decode_and_stop_strings(gen):
    ids = gen.chat_ids([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    full = asyncio.run(collect(gen, "a", ids, SamplingParams(temperature=0, max_tokens=30,
                                                             ignore_eos=True)))[0]
    assert full[0] == gen.tokenizer.decode(full[1])
    assert full[2] == "length" and len(full[1]) == 30  # ended by max_tokens
    stop = full[0][len(full[0]) // 2:len(full[0]) // 2 + 2]
    cut = asyncio.run(collect(gen, "b", ids, SamplingParams(temperature=0, max_tokens=30, stop=(stop,),
                                                            ignore_eos=True)))[0]
    assert cut[2] == "stop" and cut[0] == full[0][:full[0].index(stop)]  # ended by the stop string
    assert len(cut[1]) < 30


def test_n_candidates_and_blocks_return(gen):
    ids = gen.prompt_ids("Write a word:")
    free = gen.stats()["free_blocks"]
    params = SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=8, ignore_eos=True)
    out = asyncio.run(collect(gen, "n", ids, params))
    assert sorted(out) == [0, 1, 2]
    assert all(v[2] == "length" and len(v[1]) == 8 for v in out.values())  # each ran to max_tokens
    again = asyncio.run(collect(gen, "n2", ids, params))
    assert again == out

    async def cancel_midway():
        agen = gen.stream("c", ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.05)
            s = gen.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == free:
                return s
        return gen.stats()
    s = asyncio.run(cancel_midway())
    assert s["running"] == 0 and s["free_blocks"] == free


def test_bad_input_then_keeps_serving(gen):
    with pytest.raises(InvalidArgument):
        gen.prompt_ids("")

    async def too_long():
        async for _ in gen.stream("t", [1] * 9000, SamplingParams(max_tokens=4)):
            pass
    with pytest.raises(InvalidArgument, match="context length"):
        asyncio.run(too_long())
    ok = asyncio.run(collect(gen, "ok", gen.prompt_ids("Hello"),
                             SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    assert ok[0][2] == "length" and len(ok[0][1]) == 3


def test_cli_generate_json_matches_engine(gen):
    res = subprocess.run([sys.executable, "-m", "prefloop.cli", "generate", "The capital of France is",
                          "--max-tokens", "12", "--json", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    ref = asyncio.run(collect(gen, "cli", gen.prompt_ids("The capital of France is"),
                              SamplingParams(temperature=0, max_tokens=12)))[0]
    assert data["text"] == ref[0] and data["token_ids"] == ref[1]
    assert data["prompt_tokens"] == 5 and data["completion_tokens"] == len(ref[1])
    bad = subprocess.run([sys.executable, "-m", "prefloop.cli", "generate", "x", "--top-p", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr
