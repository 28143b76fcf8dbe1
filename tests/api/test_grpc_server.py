"""End-to-end gRPC tests: a real `prefloop serve` with the default model on a loopback port.

One server per session (`real_server` in conftest.py, with user/admin tokens); the SIGTERM test
starts its own. max_tokens stays small: every token is a real decode step on the CPU.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prefloop.clients import AsyncClient, Client
from prefloop.clients import errors as cerr

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTION = "What is the capital of France? Answer in one sentence."
LONG = "Write a long, detailed story about a dragon who learns to bake bread."


@pytest.fixture
def user(real_server):
    with Client(real_server.target, token=USER_TOKEN, timeout=120) as client:
        yield client


@pytest.fixture
def admin(real_server):
    with Client(real_server.target, token=ADMIN_TOKEN, timeout=120) as client:
        yield client


def idle_stats(admin: Client, timeout: float = 60.0):
    """Engine stats once nothing runs or waits (earlier tests' aborts may still be landing)."""
    assert wait_until(lambda: (lambda s: s.running == 0 and s.waiting == 0
                               and s.active_requests == 0)(admin.engine_stats()), timeout)
    return admin.engine_stats()


def test_model_info(user):
    info = user.model_info()
    assert info.architecture == "LlamaForCausalLM" and info.backend == "native"
    assert info.context_length > 1000 and info.dtype == "float32" and info.model_version


def test_chat_matches_generate_command(user, admin):
    idle_stats(admin)
    max_tokens = 24
    out = subprocess.run(
        [sys.executable, "-m", "prefloop.cli", "generate", "--chat", "--json", "--dtype", "float32",
         "--temperature", "0", "--max-tokens", str(max_tokens), QUESTION],
        capture_output=True, text=True, timeout=240, check=True)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    messages = [{"role": "user", "content": QUESTION}]
    unary = user.chat(messages, max_tokens=max_tokens, temperature=0)
    chunks = list(user.chat_stream(messages, max_tokens=max_tokens, temperature=0))
    streamed = "".join(c.text_delta for c in chunks)
    assert "Paris" in expected["text"]
    assert unary.text == expected["text"]
    assert streamed == expected["text"]
    assert unary.prompt_tokens == expected["prompt_tokens"]
    assert unary.completions[0].completion_tokens == expected["completion_tokens"]
    assert unary.finish_reason == expected["finish_reason"] == chunks[-1].finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert unary.response_id != chunks[0].response_id


def test_generate_raw_prompt_stream_and_unary_agree(user):
    prompt = "The three primary colors are"
    unary = user.generate(prompt, max_tokens=12, temperature=0)
    streamed = "".join(c.text_delta for c in user.generate_stream(prompt, max_tokens=12,
                                                                 temperature=0))
    assert unary.text == streamed and unary.text.strip()
    assert unary.completions[0].completion_tokens <= 12


def test_first_chunk_arrives_before_the_last_token(user):
    start = time.perf_counter()
    arrivals = [time.perf_counter() - start
                for _ in user.chat_stream([{"role": "user", "content": LONG}], max_tokens=24,
                                          temperature=0)]
    assert len(arrivals) >= 10
    assert arrivals[0] < 0.5 * arrivals[-1]  # streamed as decoded, not buffered


def test_16_concurrent_streams(real_server, admin):
    idle_stats(admin)
    topics = ["France", "Japan", "Italy", "Egypt"]
    results: dict[int, list] = {}
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Client(real_server.target, token=USER_TOKEN, timeout=240) as client:
                messages = [{"role": "user",
                             "content": f"What is the capital of {topics[i % 4]}?"}]
                results[i] = list(client.chat_stream(messages, max_tokens=16, temperature=0))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not failures and len(results) == 16
    response_ids, request_ids = set(), set()
    for i, chunks in results.items():
        assert {c.index for c in chunks} == {0}
        assert len({c.response_id for c in chunks}) == 1
        assert [c.finish_reason is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
        counts = [c.completion_tokens for c in chunks]
        assert counts == sorted(counts) and 0 < counts[-1] <= 16
        response_ids.add(chunks[0].response_id)
        request_ids.add(chunks[0].request_id)
    assert len(response_ids) == 16 and len(request_ids) == 16
    assert all(re.fullmatch(r"resp-[0-9a-f]{32}", r) for r in response_ids)
    for i in (0, 4, 8, 12):  # each stream carries its own answer, not a neighbour's
        assert "Paris" in "".join(c.text_delta for c in results[i])
    for i in (1, 5, 9, 13):
        assert "Tokyo" in "".join(c.text_delta for c in results[i])
    idle_stats(admin)


def test_n_completions_have_distinct_ids(user):
    reply = user.chat([{"role": "user", "content": "Name a fruit."}], max_tokens=8,
                      temperature=1.0, seed=3, n=3)
    assert [c.index for c in reply.completions] == [0, 1, 2]
    assert len({c.response_id for c in reply.completions}) == 3
    assert all(c.finish_reason in ("stop", "length") for c in reply.completions)


def test_cancel_mid_stream_frees_blocks(user, admin):
    before = idle_stats(admin)
    stream = user.chat_stream([{"role": "user", "content": LONG}], max_tokens=400)
    for _ in range(3):
        next(stream)
    busy = admin.engine_stats()
    assert busy.running == 1 and busy.free_blocks < before.free_blocks
    stream.close()  # cancels the call
    after = idle_stats(admin, timeout=30)
    assert after.free_blocks == before.free_blocks


def test_deadline_aborts_and_frees_blocks(user, admin):
    before = idle_stats(admin)
    with pytest.raises(cerr.DeadlineExceeded):
        user.chat([{"role": "user", "content": LONG}], max_tokens=400, timeout=1.5)
    after = idle_stats(admin, timeout=30)
    assert after.free_blocks == before.free_blocks


@pytest.mark.parametrize("call, error", [
    (lambda c: c.generate("", max_tokens=8), cerr.InvalidArgument),
    (lambda c: c.generate("hello " * 2000, max_tokens=8), cerr.InvalidArgument),  # > 1024 tokens
    (lambda c: c.generate("hi", max_tokens=0), cerr.InvalidArgument),
    (lambda c: c.generate("hi", max_tokens=-1), cerr.InvalidArgument),
    (lambda c: c.generate("hi", max_tokens=8, top_p=0.0), cerr.InvalidArgument),
    (lambda c: c.generate("hi", max_tokens=8, top_p=1.01), cerr.InvalidArgument),
    (lambda c: c.generate("hi", max_tokens=8, temperature=-1.0), cerr.InvalidArgument),
    (lambda c: c.generate("hi", max_tokens=8, n=5), cerr.InvalidArgument),  # server max_n 4
    (lambda c: c.generate("hi", max_tokens=100_000), cerr.InvalidArgument),
    (lambda c: c.generate("x" * 70_000, max_tokens=8), cerr.ResourceExhausted),  # > 64 KiB
    (lambda c: c.chat([{"role": "robot", "content": "hi"}], max_tokens=8), cerr.InvalidArgument),
    (lambda c: c.chat([], max_tokens=8), cerr.InvalidArgument),
    (lambda c: list(c.chat_stream([{"role": "robot", "content": "hi"}], max_tokens=8)),
     cerr.InvalidArgument),
    (lambda c: list(c.generate_stream("", max_tokens=8)), cerr.InvalidArgument),
])
def test_bad_inputs_get_their_status_and_server_keeps_serving(user, call, error):
    with pytest.raises(error) as info:
        call(user)
    assert len(info.value.details) > 10
    assert user.generate("Hello", max_tokens=2, temperature=0).completions[0].completion_tokens


def test_auth(real_server):
    with Client(real_server.target, timeout=30) as anonymous:
        with pytest.raises(cerr.Unauthenticated):
            anonymous.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    with Client(real_server.target, token="wrong-token", timeout=30) as wrong:
        with pytest.raises(cerr.Unauthenticated):
            list(wrong.generate_stream("hi", max_tokens=2))
        with pytest.raises(cerr.Unauthenticated):
            wrong.model_info()
    with Client(real_server.target, token=USER_TOKEN, timeout=30) as user:
        with pytest.raises(cerr.PermissionDenied):
            user.engine_stats()
    with Client(real_server.target, token=ADMIN_TOKEN, timeout=30) as admin:
        assert admin.engine_stats().total_blocks > 0
        assert admin.generate("Hi", max_tokens=2).completions


def test_health_and_reflection(real_server):
    with grpc.insecure_channel(real_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "prefloop.v1.Generation", "prefloop.v1.Models"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"prefloop.v1.Generation", "prefloop.v1.Models",
                "grpc.health.v1.Health"} <= services
        proto = db.FindFileContainingSymbol("prefloop.v1.Generation")
        assert proto.package == "prefloop.v1"
        assert {m.name for m in proto.service[0].method} == {
            "Generate", "GenerateStream", "Chat", "ChatStream"}


def test_access_log_has_one_line_per_request_and_no_tokens(real_server, user):
    with Client(real_server.target, token="wrong-" + USER_TOKEN, timeout=30) as wrong:
        with pytest.raises(cerr.Unauthenticated):
            wrong.generate("Hello there", max_tokens=3)
    reply = user.generate("Hello there", max_tokens=3, temperature=0)
    assert wait_until(lambda: reply.request_id in real_server.log_text(), timeout=10)
    text = real_server.log_text()
    lines = [json.loads(line.split("prefloop.server.access: ", 1)[1])
             for line in text.splitlines() if "prefloop.server.access: " in line]
    mine = [line for line in lines if line.get("request_id") == reply.request_id]
    assert len(mine) == 1
    assert mine[0]["method"] == "Generate" and mine[0]["status"] == "OK"
    assert mine[0]["prompt_tokens"] == reply.prompt_tokens and mine[0]["latency_ms"] > 0
    assert mine[0]["completion_tokens"] == reply.completions[0].completion_tokens
    assert any(line["status"] == "UNAUTHENTICATED" and line["method"].endswith("/Generate")
               for line in lines)
    assert USER_TOKEN not in text and ADMIN_TOKEN not in text


def test_async_client_concurrent(real_server):
    import asyncio

    async def scenario():
        async with AsyncClient(real_server.target, token=USER_TOKEN, timeout=120) as client:
            replies = await asyncio.gather(*(
                client.generate(f"Count from {i} to {i + 5}:", max_tokens=8, temperature=0)
                for i in range(4)))
            chunks = [c async for c in client.chat_stream(
                [{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0)]
            return replies, chunks

    replies, chunks = asyncio.run(scenario())
    assert len({r.response_id for r in replies}) == 4
    assert chunks[-1].finish_reason in ("stop", "length")


def test_sigterm_lets_streams_finish_then_exits_0(tmp_path):
    srv = start_server_process(tmp_path, "--grace", "120", auth=False)
    try:
        results: dict[int, list] = {}
        errors: list[BaseException] = []
        first_chunk = threading.Barrier(4)

        def worker(i: int) -> None:
            try:
                with Client(srv.target, timeout=240) as client:
                    chunks = []
                    for chunk in client.chat_stream([{"role": "user", "content": LONG}],
                                                    max_tokens=24, temperature=0):
                        chunks.append(chunk)
                        if len(chunks) == 1:
                            first_chunk.wait(60)
                    results[i] = chunks
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        first_chunk.wait(120)  # all three streams are mid-flight
        srv.proc.send_signal(__import__("signal").SIGTERM)
        time.sleep(0.3)
        with Client(srv.target, timeout=10) as late:
            with pytest.raises(cerr.Unavailable):
                late.generate("too late", max_tokens=2)
        for t in threads:
            t.join(240)
        assert not errors, errors
        assert len(results) == 3
        for chunks in results.values():
            assert chunks[-1].finish_reason in ("stop", "length")
            assert chunks[-1].completion_tokens == 24 or chunks[-1].finish_reason == "stop"
        assert srv.proc.wait(60) == 0
        assert "SIGTERM received" in srv.log_text()  # relayed from the engines' (main) thread
        assert "the native engines step on the main thread" in srv.log_text()
    finally:
        srv.terminate()
