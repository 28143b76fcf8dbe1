"""gRPC layer tests on an in-process server with a fake generator (fast, no model).

They cover what does not need real weights: proto <-> domain conversion, status mapping, limits,
admission, auth roles, cancellation and deadlines reaching the engine, the recorder hook,
graceful shutdown, health, TLS, and the async client.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading

import grpc
import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, FakeGenerator, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefloop.clients import AsyncClient, Client
from prefloop.clients import errors as cerr
from prefloop.server import errors
from prefloop.server.api.auth import AuthConfig, Role, bearer_token, required_role
from prefloop.server.api.limits import Limits
from prefloop.server.api.status_mapping import STATUS_OF, status_of

pytestmark = pytest.mark.timeout(60)

RESPONSE_ID = re.compile(r"^resp-[0-9a-f]{32}$")
REQUEST_ID = re.compile(r"^req-[0-9a-f]{32}$")
USER = [{"role": "user", "content": "hello"}]


def test_unary_generate_and_chat(fake_server):
    with Client(fake_server.target) as client:
        result = client.generate("abc", max_tokens=3, temperature=0)
        chat = client.chat(USER, max_tokens=2, session_id="s1", user_id="u1")
    assert result.text == " w1 w2 w3"
    assert result.finish_reason == "length"
    assert result.prompt_tokens == 3
    assert result.model_version == "fake-v0"
    assert RESPONSE_ID.match(result.response_id) and REQUEST_ID.match(result.request_id)
    assert chat.text == " w1 w2" and chat.completions[0].completion_tokens == 2
    rows = fake_server.recorder.rows
    assert [r["response_id"] for r in rows] == [result.response_id, chat.response_id]
    assert rows[0]["prompt"] == "abc" and rows[0]["messages"] is None
    assert rows[1]["prompt"] is None and rows[1]["messages"] == USER
    assert rows[1]["session_id"] == "s1" and rows[1]["user_id"] == "u1"
    assert rows[0]["sampling"]["temperature"] == 0.0 and rows[0]["sampling"]["max_tokens"] == 3
    assert rows[0]["completion"] == " w1 w2 w3" and rows[0]["completion_tokens"] == 3
    assert rows[0]["created_at"].tzinfo is not None and rows[0]["ttft_ms"] <= rows[0]["latency_ms"]


def test_model_info_reports_the_servers_sampling_defaults(fake_server_factory):
    from prefloop.server.api.completions import SamplingDefaults

    srv = fake_server_factory(defaults=SamplingDefaults(temperature=0.5, top_p=0.8, top_k=7,
                                                        repetition_penalty=1.15))
    with Client(srv.target) as client:
        info = client.model_info()
    assert info.sampling_defaults == {"temperature": 0.5, "top_p": 0.8, "top_k": 7,
                                      "repetition_penalty": 1.15}
    assert info.sampling_defaults == srv.server.runner.defaults.as_dict()  # GET /v1/models' too

    async def of_async():
        async with AsyncClient(srv.target) as client:
            return await client.model_info()
    assert asyncio.run(of_async()).sampling_defaults == info.sampling_defaults
    with Client(fake_server_factory().target) as client:  # no flags: the fallbacks
        assert client.model_info().sampling_defaults == SamplingDefaults().as_dict()


def test_stream_n2_interleaves_with_distinct_ids(fake_server):
    with Client(fake_server.target) as client:
        chunks = list(client.generate_stream("abc", max_tokens=4, n=2))
    by_index = {i: [c for c in chunks if c.index == i] for i in (0, 1)}
    for index, own in by_index.items():
        assert "".join(c.text_delta for c in own) == " w1 w2 w3 w4"
        assert len({c.response_id for c in own}) == 1
        assert [c.finish_reason for c in own] == [None, None, None, "length"]
        assert own[-1].completion_tokens == 4
    assert by_index[0][0].response_id != by_index[1][0].response_id
    assert len({c.request_id for c in chunks}) == 1


def test_unset_repetition_penalty_gets_the_servers_default_and_a_set_one_is_kept(
        fake_server_factory):
    from prefloop.server.api.completions import SamplingDefaults

    srv = fake_server_factory(defaults=SamplingDefaults(repetition_penalty=1.15))
    with Client(srv.target) as client:
        client.generate("x", max_tokens=2)
        client.generate("x", max_tokens=2, repetition_penalty=1.0)
    used = [r["sampling"]["repetition_penalty"] for r in srv.recorder.rows]
    assert used == [1.15, 1.0]


def test_frequency_and_presence_penalties_travel_over_grpc_and_unset_is_off(fake_server_factory):
    srv = fake_server_factory()
    with Client(srv.target) as client:
        client.generate("x", max_tokens=2, frequency_penalty=0.5, presence_penalty=-1.0)
        client.chat([{"role": "user", "content": "x"}], max_tokens=2)
        with pytest.raises(cerr.InvalidArgument, match="presence_penalty must be in"):
            client.generate("x", max_tokens=2, presence_penalty=2.5)
    used = [(r["sampling"]["frequency_penalty"], r["sampling"]["presence_penalty"])
            for r in srv.recorder.rows]
    assert used == [(0.5, -1.0), (0.0, 0.0)]


def test_unset_max_tokens_uses_server_default(fake_server_factory):
    srv = fake_server_factory(limits=Limits(default_max_tokens=5))
    with Client(srv.target) as client:
        assert client.generate("x").completions[0].completion_tokens == 5


@pytest.mark.parametrize("kwargs, code", [
    (dict(prompt=""), cerr.InvalidArgument),
    (dict(max_tokens=0), cerr.InvalidArgument),
    (dict(max_tokens=-3), cerr.InvalidArgument),
    (dict(top_p=0.0), cerr.InvalidArgument),
    (dict(top_p=1.5), cerr.InvalidArgument),
    (dict(temperature=-0.5), cerr.InvalidArgument),
    (dict(n=9), cerr.InvalidArgument),
    (dict(n=0), cerr.InvalidArgument),
    (dict(top_k=-1), cerr.InvalidArgument),
    (dict(max_tokens=5000), cerr.InvalidArgument),
    (dict(prompt="x" * 300), cerr.InvalidArgument),  # over max_prompt_tokens (200)
    (dict(prompt="x" * 190, max_tokens=100), cerr.InvalidArgument),  # the engine: > context
    (dict(prompt="x" * 100, max_tokens=200), cerr.InvalidArgument),  # prompt + max > context
    (dict(stop=[""]), cerr.InvalidArgument),
    (dict(prompt="x" * 70_000), cerr.ResourceExhausted),  # over max_message_bytes
])
def test_bad_generate_inputs(fake_server_factory, kwargs, code):
    srv = fake_server_factory(limits=Limits(max_message_bytes=65536, max_n=8,
                                            max_prompt_tokens=200))
    prompt = kwargs.pop("prompt", "abc")
    with Client(srv.target) as client:
        with pytest.raises(code) as info:
            client.generate(prompt, **kwargs)
        assert info.value.details  # a message the user can act on
        assert client.generate("still serving", max_tokens=1).text == " w1"


def test_limit_messages_name_the_limit(fake_server_factory):
    srv = fake_server_factory(limits=Limits(max_n=2, max_max_tokens=16, default_max_tokens=8,
                                            max_prompt_tokens=10))
    with Client(srv.target) as client:
        with pytest.raises(cerr.InvalidArgument, match="max_prompt_tokens=10"):
            client.generate("x" * 11)
        with pytest.raises(cerr.InvalidArgument, match="max_n=2"):
            client.generate("a", n=3)
        with pytest.raises(cerr.InvalidArgument, match="max_max_tokens=16"):
            client.generate("a", max_tokens=17)


@pytest.mark.parametrize("messages", [
    [], [{"role": "wizard", "content": "hi"}], [{"role": "", "content": "hi"}]])
def test_bad_chat_messages(fake_server, messages):
    with Client(fake_server.target) as client:
        with pytest.raises(cerr.InvalidArgument):
            client.chat(messages, max_tokens=2)
        with pytest.raises(cerr.InvalidArgument):
            list(client.chat_stream(messages, max_tokens=2))
        assert client.chat(USER, max_tokens=1).text == " w1"


def test_unexpected_error_fails_one_request_as_internal(fake_server):
    with Client(fake_server.target) as client:
        with pytest.raises(cerr.InternalError, match=r"req-[0-9a-f]{32}") as info:
            client.generate("BOOM", max_tokens=2)
        assert "fake engine bug" not in info.value.details  # internals stay in the server log
        with pytest.raises(cerr.InternalError):
            list(client.generate_stream("BOOM", max_tokens=2))
        assert client.generate("fine", max_tokens=2).text == " w1 w2"


def test_cancel_mid_stream_aborts_in_engine(fake_server):
    gen: FakeGenerator = fake_server.generator
    gen.step_s = 0.02
    with Client(fake_server.target) as client:
        stream = client.generate_stream("abc", max_tokens=200)
        first = next(stream)
        assert gen.running
        stream.close()  # the client stops reading: the call is cancelled
        assert wait_until(lambda: not gen.running, timeout=10)
        assert first.request_id in gen.aborted
        stats = client.engine_stats()
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks
    assert stats.active_requests == 0 and stats.extra["steps"] == 7
    assert wait_until(lambda: any(r["finish_reason"] == "abort"
                                  for r in fake_server.recorder.rows), timeout=5)


def test_deadline_aborts_in_engine(fake_server):
    gen: FakeGenerator = fake_server.generator
    gen.step_s = 0.02
    with Client(fake_server.target) as client:
        with pytest.raises(cerr.DeadlineExceeded):
            client.generate("abc", max_tokens=200, timeout=0.3)
        with pytest.raises(cerr.DeadlineExceeded):
            list(client.generate_stream("abc", max_tokens=200, timeout=0.3))
    assert wait_until(lambda: not gen.running, timeout=10)
    assert len(gen.aborted) == 2


def test_queue_full_is_resource_exhausted(fake_server_factory):
    gen = FakeGenerator(step_s=0.02)
    srv = fake_server_factory(gen, limits=Limits(max_concurrent=1, max_queued=1))
    with Client(srv.target) as client:
        running = client.generate_stream("a", max_tokens=100)
        next(running)
        results = []
        queued = threading.Thread(
            target=lambda: results.append(client.generate("b", max_tokens=2).text))
        queued.start()
        assert wait_until(lambda: client.engine_stats().queued_requests == 1, timeout=10)
        with pytest.raises(cerr.ResourceExhausted, match="max queued 1"):
            client.generate("c", max_tokens=2)
        running.close()
        queued.join(10)
    assert results == [" w1 w2"]


def test_auth_roles(fake_server_factory):
    srv = fake_server_factory(auth=AuthConfig(user_tokens=(USER_TOKEN,),
                                              admin_tokens=(ADMIN_TOKEN,)))
    with Client(srv.target) as anonymous:
        with pytest.raises(cerr.Unauthenticated, match="missing bearer token"):
            anonymous.generate("a", max_tokens=1)
        with pytest.raises(cerr.Unauthenticated):
            list(anonymous.generate_stream("a", max_tokens=1))
        with pytest.raises(cerr.Unauthenticated):
            anonymous.model_info()
    with Client(srv.target, token="not-a-token") as wrong:
        with pytest.raises(cerr.Unauthenticated, match="invalid bearer token"):
            wrong.chat(USER, max_tokens=1)
    with Client(srv.target, token=USER_TOKEN) as user:
        assert user.generate("a", max_tokens=1).text == " w1"
        assert user.model_info().model_version == "fake-v0"
        with pytest.raises(cerr.PermissionDenied, match="admin"):
            user.engine_stats()
    with Client(srv.target, token=ADMIN_TOKEN) as admin:
        assert admin.engine_stats().total_blocks == 64
        assert admin.chat(USER, max_tokens=1).text == " w1"
    with grpc.insecure_channel(srv.target) as channel:  # health needs no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_helpers(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("# comment\nuser u1\nadmin a1  # trailing comment\n\n")
    config = AuthConfig.load(path, environ={"PREFLOOP_USER_TOKENS": "u2, u3",
                                            "PREFLOOP_ADMIN_TOKENS": ""})
    assert config.role_of("u1") == Role.USER and config.role_of("u3") == Role.USER
    assert config.role_of("a1") == Role.ADMIN and config.role_of("nope") is None
    assert "u1" not in repr(config) and "a1" not in repr(config)
    assert not AuthConfig.load(None, environ={}).enabled
    path.write_text("root s3cret\n")
    with pytest.raises(ValueError) as info:
        AuthConfig.load(path, environ={})
    assert "s3cret" not in str(info.value)
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert required_role("/prefloop.v1.Generation/Chat") == Role.USER
    assert required_role("/prefloop.v1.Feedback/Submit") == Role.USER
    assert required_role("/prefloop.v1.Models/GetModelInfo") == Role.USER
    assert required_role("/prefloop.v1.Models/Promote") == Role.ADMIN
    assert required_role("/grpc.health.v1.Health/Check") is None


def test_status_mapping_covers_every_typed_error():
    for cls in [errors.PrefloopError, *errors.PrefloopError.__subclasses__(),
                errors.UnsupportedModel]:
        assert cls.code in STATUS_OF
        assert status_of(cls("x")).name == cls.code
    assert status_of(KeyError("x")) is grpc.StatusCode.INTERNAL


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(max_concurrent=0)
    with pytest.raises(ValueError):
        Limits(default_max_tokens=100, max_max_tokens=10)
    limits = Limits(default_max_tokens=100)
    assert limits.check_request(prompt_tokens=50, max_tokens=None, n=None,
                                context_length=120) == 70
    # no room left: the engine's context-overflow mode decides (error, truncate or shift)
    assert limits.check_request(prompt_tokens=130, max_tokens=None, n=None,
                                context_length=120) == 100
    assert limits.check_request(prompt_tokens=100, max_tokens=50, n=1, context_length=120) == 50


def test_graceful_shutdown_lets_streams_finish(fake_server):
    gen: FakeGenerator = fake_server.generator
    gen.step_s = 0.02
    texts = []
    with Client(fake_server.target) as client, grpc.insecure_channel(fake_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stream = client.generate_stream("a", max_tokens=40)
        texts.append(next(stream).text_delta)
        stopping = asyncio.run_coroutine_threadsafe(fake_server.server.shutdown(grace=20),
                                                    fake_server.loop)
        assert wait_until(lambda: not fake_server.server.runner.accepting, timeout=5)
        texts.extend(c.text_delta for c in stream)  # the in-flight stream runs to its end
        stopping.result(20)
        with pytest.raises(cerr.Unavailable):
            client.generate("late", max_tokens=1, timeout=5)
    assert "".join(texts) == "".join(f" w{i}" for i in range(1, 41))


def test_health_not_serving_after_shutdown_starts(fake_server):
    gen: FakeGenerator = fake_server.generator
    gen.step_s = 0.05
    with Client(fake_server.target) as client, grpc.insecure_channel(fake_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="prefloop.v1.Generation"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = client.generate_stream("a", max_tokens=20)
        next(stream)
        stopping = asyncio.run_coroutine_threadsafe(fake_server.server.shutdown(grace=10),
                                                    fake_server.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        list(stream)
        stopping.result(20)


def test_async_client(fake_server):
    async def scenario():
        async with AsyncClient(fake_server.target) as client:
            info = await client.model_info()
            unary = await client.chat(USER, max_tokens=2)
            chunks = [c async for c in client.generate_stream("abc", max_tokens=3)]
            results = await asyncio.gather(*(client.generate(f"p{i}", max_tokens=2)
                                             for i in range(8)))
            with pytest.raises(cerr.InvalidArgument):
                await client.generate("", max_tokens=2)
            return info, unary, chunks, results

    info, unary, chunks, results = asyncio.run(scenario())
    assert info.backend == "fake" and info.context_length == 256
    assert unary.text == " w1 w2"
    assert "".join(c.text_delta for c in chunks) == " w1 w2 w3"
    assert len({r.response_id for r in results}) == 8


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_tls(fake_server_factory, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = fake_server_factory(tls_cert=str(cert), tls_key=str(key))
    port = srv.target.rsplit(":", 1)[1]
    with Client(f"localhost:{port}", root_certificates=cert, timeout=10) as client:
        assert client.generate("a", max_tokens=2).text == " w1 w2"
    with Client(f"localhost:{port}", timeout=3) as plaintext:
        with pytest.raises(cerr.Unavailable):
            plaintext.generate("a", max_tokens=1)


def test_health_follows_the_engine(fake_server):
    """An engine that can no longer serve (vLLM's worker died, the engine thread crashed) turns
    health NOT_SERVING for every service; it turns back when the engine recovers."""
    def status(channel, service=""):
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service)).status

    with grpc.insecure_channel(fake_server.target) as channel:
        assert status(channel) == health_pb2.HealthCheckResponse.SERVING
        fake_server.generator.healthy = False
        assert wait_until(lambda: status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        assert status(channel, "prefloop.v1.Generation") == health_pb2.HealthCheckResponse.NOT_SERVING
        fake_server.generator.healthy = True
        assert wait_until(lambda: status(channel) == health_pb2.HealthCheckResponse.SERVING, 5)
