"""The HTTP API against a real in-process server (fake engine, real feedback store, real uvicorn on
a loopback port): the official `openai` client, raw SSE framing and disconnects with httpx,
feedback routes, auth, limits, /health and /metrics parsed with prometheus_client's parser."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, FakeGenerator, wait_until
from prometheus_client.parser import text_string_to_metric_families

from prefloop.server.api.auth import AuthConfig
from prefloop.server.api.completions import SamplingDefaults
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig
from prefloop.server.api.limits import Limits
from prefloop.server.feedback.export import load_table
from prefloop.server.feedback.store import FeedbackStore, StoreConfig
from prefloop.server.jobs import record_job
from prefloop.server.registry import Registry
from prefloop.server.serving.hot_swap import ModelSwitcher

MESSAGES = [{"role": "user", "content": "Say something."}]


class HttpFixture:
    def __init__(self, tmp_path, registry: Registry | None = None, **config):
        self.generator = FakeGenerator(step_s=0.002)
        switcher = None if registry is None else ModelSwitcher(self.generator, registry,
                                                               poll_interval_s=0)
        self.store = FeedbackStore(StoreConfig(data_dir=tmp_path / "data"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path / "data",
                           auth=AuthConfig(user_tokens=(USER_TOKEN,), admin_tokens=(ADMIN_TOKEN,)),
                           defaults=SamplingDefaults(temperature=0.3, top_p=0.9), **config)

        async def build():
            server = PrefloopServer(self.generator, cfg, recorder=self.store,
                                    feedback_store=self.store, switcher=switcher)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(build(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{self.server.http_port}"
        self.data_dir = tmp_path / "data"

    def client(self, token: str = USER_TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=token, max_retries=0, timeout=30)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.shutdown(0), self.loop).result(30)
        self.store.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def http(tmp_path):
    fixture = HttpFixture(tmp_path, limits=Limits(max_message_bytes=20_000, max_n=4))
    yield fixture
    fixture.stop()


def auth_headers(token: str = USER_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body; asserts the framing (data lines, blank-line separated)."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE event {block!r}"
        events.append(block[len("data: "):])
    return events


# ---- the openai SDK -----------------------------------------------------------------------------

def test_chat_completion_carries_ids_version_and_usage(http):
    reply = http.client().chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=5)
    choice = reply.choices[0]
    assert choice.message.content == " w1 w2 w3 w4 w5"
    assert choice.finish_reason == "length"
    assert reply.id.startswith("req-")
    extra = reply.model_extra
    assert extra["model_version"] == "fake-v0"
    assert choice.model_extra["response_id"].startswith("resp-")
    assert choice.model_extra["model_version"] == "fake-v0"
    assert (reply.usage.completion_tokens, reply.usage.total_tokens) == (
        5, reply.usage.prompt_tokens + 5)
    assert reply.usage.prompt_tokens == len("<user>Say something.")


def test_streamed_deltas_concatenate_to_the_unary_text(http):
    client = http.client()
    whole = client.chat.completions.create(model="fake-v0", messages=MESSAGES, max_tokens=7)
    chunks = list(client.chat.completions.create(model="fake-v0", messages=MESSAGES, max_tokens=7,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    ids = {c.choices[0].model_extra["response_id"] for c in chunks if c.choices}
    assert len(ids) == 1 and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_gives_two_choices_with_distinct_response_ids(http):
    reply = http.client().chat.completions.create(model="prefloop", messages=MESSAGES,
                                                  max_tokens=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    ids = {c.model_extra["response_id"] for c in reply.choices}
    assert len(ids) == 2


def test_completions_route_and_models_route(http):
    client = http.client()
    reply = client.completions.create(model="prefloop", prompt="Once", max_tokens=2)
    assert reply.choices[0].text == " w1 w2" and reply.model_extra["model_version"] == "fake-v0"
    models = client.models.list()
    served = [m for m in models.data if m.model_extra["serving"]]
    assert [m.id for m in served] == ["fake-v0"]
    assert served[0].model_extra["sampling_defaults"] == {"temperature": 0.3, "top_p": 0.9, "top_k": 0,
                                                          "repetition_penalty": 1.0}


def test_unknown_field_is_refused_by_name_and_harmless_ones_pass(http):
    client = http.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2,
                                       extra_body={"guided_json": {"type": "object"}})
    assert "guided_json" in err.value.message and err.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2,
                                       logprobs=True)
    assert "logprobs" in err.value.message
    ok = client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2,
                                        logprobs=False, store=False)
    assert ok.choices[0].message.content == " w1 w2"


def test_frequency_and_presence_penalties_reach_the_engine_and_the_log_and_are_range_checked(http):
    client = http.client()
    client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2,
                                   frequency_penalty=0.5, presence_penalty=-0.25)
    client.completions.create(model="prefloop", prompt="x", max_tokens=2, presence_penalty=1.5)
    client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2)
    used = [(p.frequency_penalty, p.presence_penalty) for p in http.generator.params]
    assert used == [(0.5, -0.25), (0.0, 1.5), (0.0, 0.0)]  # unset: off, as in OpenAI's API
    for bad in ({"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"presence_penalty": "x"}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2,
                                           extra_body=bad)
        assert next(iter(bad)) in err.value.message and err.value.status_code == 400
    assert len(http.generator.params) == 3  # refused before the engine
    http.stop()  # flushes the log
    from prefloop.server.feedback import schema as logschema
    from prefloop.server.feedback.export import load_table
    rows = load_table(http.data_dir, logschema.GENERATIONS).to_pylist()
    logged = sorted((r["sampling"]["frequency_penalty"], r["sampling"]["presence_penalty"])
                    for r in rows)
    assert logged == sorted(used)


def test_bad_values_raise_bad_request_with_openai_error_body(http):
    client = http.client()
    for kwargs, word in (({"temperature": 3}, "temperature"), ({"n": 9}, "max_n"),
                         ({"max_tokens": 0}, "max_tokens"), ({"messages": []}, "messages")):
        args = {"model": "prefloop", "messages": MESSAGES, "max_tokens": 2, **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**args)
        assert word in err.value.message
        assert err.value.body["type"] == "invalid_request_error"
    raw = httpx.post(http.url + "/v1/chat/completions", headers=auth_headers(),
                     content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}')
    assert raw.status_code == 400 and "finite" in raw.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="v9999", messages=MESSAGES, max_tokens=2)
    assert "not being served" in err.value.message


def test_wrong_token_and_user_token_on_admin_routes(http):
    with pytest.raises(openai.AuthenticationError):
        http.client("not-a-token").chat.completions.create(model="prefloop", messages=MESSAGES)
    assert httpx.get(http.url + "/v1/models").status_code == 401
    denied = httpx.get(http.url + "/v1/admin/versions", headers=auth_headers(USER_TOKEN))
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert httpx.get(http.url + "/v1/whoami", headers=auth_headers(ADMIN_TOKEN)).json() == {
        "role": "admin", "auth": True}
    assert httpx.get(http.url + "/health").status_code == 200  # open


def test_whoami_without_a_token_is_not_an_error(http):
    # the page asks before it has a token: a 401 there would log a console error on every load
    reply = httpx.get(http.url + "/v1/whoami")
    assert reply.status_code == 200 and reply.json() == {"role": "none", "auth": True}
    assert httpx.get(http.url + "/v1/whoami", headers=auth_headers("not-a-token")).status_code == 401
    assert httpx.get(http.url + "/v1/whoami", headers=auth_headers(USER_TOKEN)).json() == {
        "role": "user", "auth": True}


def test_body_over_the_limit_is_413_before_parsing(http):
    big = b'{"messages": [' + b" " * 30_000 + b"]}"
    res = httpx.post(http.url + "/v1/chat/completions", headers=auth_headers(), content=big)
    assert res.status_code == 413 and "max-message-bytes" in res.json()["error"]["message"]

    def chunked():
        for _ in range(30):
            yield b" " * 1000
    res = httpx.post(http.url + "/v1/chat/completions", headers=auth_headers(), content=chunked())
    assert res.status_code == 413


# ---- SSE framing and disconnects ----------------------------------------------------------------

def test_sse_framing_usage_chunk_and_done(http):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    res = httpx.post(http.url + "/v1/chat/completions", headers=auth_headers(), json=body)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    events = sse_events(res.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    per_choice: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        per_choice[choice["index"]] = per_choice.get(choice["index"], "") + choice["delta"].get("content", "")
        assert choice["response_id"].startswith("resp-") and c["model_version"] == "fake-v0"
    assert per_choice == {0: " w1 w2 w3", 1: " w1 w2 w3"}


def test_client_disconnect_aborts_the_request_in_the_engine(http):
    http.generator.step_s = 0.05
    body = {"messages": MESSAGES, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", http.url + "/v1/chat/completions", headers=auth_headers(),
                           json=body) as res:
            lines = res.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first[len("data: "):])["id"]
            assert http.generator.running == {request_id}
    assert wait_until(lambda: not http.generator.running, timeout=10), "the request kept running"
    assert request_id in http.generator.aborted


def test_unary_client_disconnect_aborts_too(http):
    http.generator.step_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(http.url + "/v1/chat/completions", headers=auth_headers(), timeout=0.5,
                   json={"messages": MESSAGES, "max_tokens": 200})
    assert wait_until(lambda: len(http.generator.aborted) == 1, timeout=10)
    assert wait_until(lambda: not http.generator.running, timeout=10)


# ---- feedback -------------------------------------------------------------------------------------

def test_vote_flood_gets_429_per_voter_and_health_reports_the_log(http):
    from prefloop.server.feedback.vote_rate import VoteRateLimiter
    http.store.vote_rate = VoteRateLimiter(per_minute=2)  # `serve --votes-per-minute 2`
    reply = http.client().chat.completions.create(model="prefloop", messages=MESSAGES,
                                                  max_tokens=3)
    rid = reply.choices[0].model_extra["response_id"]

    def vote(**extra):
        return httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
                          json={"response_id": rid, "score": 1, **extra})

    assert [vote(user_id="flood").status_code for _ in range(2)] == [200, 200]
    refused = vote(user_id="flood")
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert "too many votes" in message and "user flood" in message and USER_TOKEN not in message
    assert vote(user_id="someone-else").status_code == 200
    health = httpx.get(http.url + "/health").json()
    assert health["feedback"]["status"] == "ok" and health["feedback"]["free_bytes"] > 0
    http.stop()
    assert len(load_table(http.data_dir, "feedback")) == 3  # the refused vote is not logged


def test_feedback_routes_are_durable_and_idempotent(http):
    reply = http.client().chat.completions.create(model="prefloop", messages=MESSAGES,
                                                  max_tokens=3, n=2)
    a, b = (c.model_extra["response_id"] for c in reply.choices)
    pref = {"chosen_response_id": b, "rejected_response_id": a, "idempotency_key": "k-1",
            "user_id": "u1"}
    first = httpx.post(http.url + "/v1/feedback/preference", headers=auth_headers(), json=pref)
    again = httpx.post(http.url + "/v1/feedback/preference", headers=auth_headers(), json=pref)
    assert first.status_code == 200 and first.json()["duplicate"] is False
    assert again.json() == {"feedback_id": first.json()["feedback_id"], "duplicate": True}
    rating = httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
                        json={"response_id": a, "score": 1, "scale": "thumbs"})
    assert rating.status_code == 200
    missing = httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
                         json={"response_id": "resp-nope", "score": 1})
    assert missing.status_code == 404 and "resp-nope" in missing.json()["error"]["message"]
    bad = httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
                     json={"response_id": a, "score": 7, "scale": "thumbs"})
    assert bad.status_code == 400
    extra = httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
                       json={"response_id": a, "score": 1, "stars": 5})
    assert extra.status_code == 400 and "stars" in extra.json()["error"]["message"]
    http.stop()
    feedback = load_table(http.data_dir, "feedback").to_pylist()
    assert sorted(r["kind"] for r in feedback) == ["preference", "rating"]
    (p,) = [r for r in feedback if r["kind"] == "preference"]
    assert (p["chosen_response_id"], p["rejected_response_id"], p["user_id"]) == (b, a, "u1")
    generations = load_table(http.data_dir, "generations").to_pylist()
    assert {g["response_id"] for g in generations} == {a, b}
    assert {g["source"] for g in generations} == {"http"}
    assert generations[0]["sampling"]["temperature"] == 0.3  # the server default, logged


# ---- health and metrics --------------------------------------------------------------------------

def metric_values(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_counters_move_by_the_expected_amounts(http):
    route = (("api", "http"), ("route", "POST /v1/chat/completions"), ("status", "200"))
    before = metric_values(http.url)
    client = http.client()
    for _ in range(2):
        client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=4)
    reply = client.chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=3)
    httpx.post(http.url + "/v1/feedback/rating", headers=auth_headers(),
               json={"response_id": reply.choices[0].model_extra["response_id"], "score": -1})
    after = metric_values(http.url)

    def delta(name, labels=()):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("prefloop_requests_total", route) == 3
    assert delta("prefloop_completion_tokens_total", [("api", "http")]) == 11
    assert delta("prefloop_feedback_acks_total",
                 [("api", "http"), ("kind", "rating"), ("duplicate", "false")]) == 1
    assert delta("prefloop_time_to_first_token_seconds_count", [("api", "http")]) == 3
    assert after[("prefloop_model_info", (("backend", "fake"), ("dtype", "float32"),
                                          ("version", "fake-v0")))] == 1
    assert ("prefloop_kv_cache_usage_ratio", ()) in after


def test_health_turns_503_while_draining(http):
    assert httpx.get(http.url + "/health").json()["status"] == "ok"
    http.server.http_state["draining"] = True
    assert httpx.get(http.url + "/health").status_code == 503


def test_the_page_has_an_icon_so_no_load_logs_a_404(http):
    page = httpx.get(http.url + "/")
    assert page.status_code == 200
    assert '<link rel="icon" href="/static/icon.svg"' in page.text
    for path in ("/static/icon.svg", "/favicon.ico"):
        icon = httpx.get(http.url + path)
        assert icon.status_code == 200, path
        assert icon.headers["content-type"].startswith("image/svg+xml"), path
        assert icon.text.lstrip().startswith("<svg") and "</svg>" in icon.text, path


def test_admin_jobs_returns_one_merged_record_per_job(tmp_path):
    registry = Registry(tmp_path / "data")
    record_job(registry, {"job_id": "job-a", "status": "running", "pid": 999999999,
                          "command": "dpo", "method": "dpo", "base": "v0000",
                          "started_at": "2025-01-01T00:00:00Z"})
    record_job(registry, {"job_id": "job-a", "status": "rejected", "reason": "gate failed",
                          "finished_at": "2025-01-01T00:05:00Z",
                          "gate": {"passed": False, "reasons": ["accuracy 0.50 vs 0.55"]},
                          "data": {"rows": {"train": 40, "heldout": 10}}})
    record_job(registry, {"job_id": "job-b", "status": "running", "pid": 999999999,
                          "command": "run", "method": "dpo", "started_at": "2025-01-02T00:00:00Z"})
    fixture = HttpFixture(tmp_path, registry=registry)
    try:
        url = fixture.url + "/v1/admin/jobs"
        assert httpx.get(url, headers=auth_headers(USER_TOKEN)).status_code == 403
        reply = httpx.get(url, headers=auth_headers(ADMIN_TOKEN))
        assert reply.status_code == 200
        jobs = reply.json()["jobs"]
        assert [(j["job_id"], j["status"]) for j in jobs] == [("job-a", "rejected"),
                                                            ("job-b", "crashed")]
        a, b = jobs
        assert (a["command"], a["base"], a["started_at"], a["finished_at"]) == (
            "dpo", "v0000", "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z")
        assert a["gate"]["passed"] is False and a["data"]["rows"] == {"train": 40, "heldout": 10}
        assert b["finished_at"] is None and b["command"] == "run"
        assert a["summary"]["heldout_rows"] is None and b["summary"]["kl_per_token"] is None
    finally:
        fixture.stop()


def test_a_taken_http_port_fails_at_start_before_serving(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=port)
    server = PrefloopServer(FakeGenerator(), cfg)
    try:
        with pytest.raises(OSError):
            asyncio.run(server.start())
        assert server._server is None and server.http is None  # gRPC never started either
    finally:
        taken.close()


def test_grpc_and_http_share_the_generation_log_and_metrics(http):
    from prefloop.clients import Client
    with Client(f"127.0.0.1:{http.server.port}", token=USER_TOKEN) as grpc_client:
        grpc_client.chat(MESSAGES, max_tokens=2)
    http.client().chat.completions.create(model="prefloop", messages=MESSAGES, max_tokens=2)
    time.sleep(0.1)
    values = metric_values(http.url)
    assert values[("prefloop_completion_tokens_total", (("api", "grpc"),))] == 2
    assert values[("prefloop_completion_tokens_total", (("api", "http"),))] == 2
    http.stop()
    sources = sorted(g["source"] for g in load_table(http.data_dir, "generations").to_pylist())
    assert sources == ["grpc", "http"]
