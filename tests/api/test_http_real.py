"""The HTTP API on a real `prefloop serve` (default model, registry with two versions, real
ports): greedy parity with gRPC through the official `openai` client, feedback through HTTP in the
Parquet log after a clean stop, and both APIs streaming under load through a hot-swap."""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pydantic
import pytest
from conftest import ADMIN_TOKEN, USER_TOKEN, start_server_process, wait_until
from registry_helpers import MAX_TOKENS, QUESTION, Streamers, two_version_registry

from prefloop.clients import Client
from prefloop.server.feedback.export import load_table

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http-real")
    registry, v1 = two_version_registry(tmp)
    port = free_port()
    server = start_server_process(tmp, "--http-port", str(port), "--max-n", "4",
                                  "--max-concurrent", "32", "--registry-poll", "0")
    assert f"HTTP on http://127.0.0.1:{port}" in server.ready_line
    yield server, f"http://127.0.0.1:{port}", registry, v1, tmp / "data"
    server.terminate()


def test_greedy_http_chat_equals_grpc_chat_and_its_stream(http_server):
    server, url, *_ = http_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=USER_TOKEN, max_retries=0)
    reply = client.chat.completions.create(model="v0000", messages=QUESTION, max_tokens=24,
                                           temperature=0)
    with Client(server.target, token=USER_TOKEN) as grpc_client:
        expected = grpc_client.chat(QUESTION, max_tokens=24, temperature=0).completions[0].text
    assert reply.choices[0].message.content == expected and expected
    stream = client.chat.completions.create(model="v0000", messages=QUESTION, max_tokens=24,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


class Answer(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    population_millions: float = pydantic.Field(ge=0, le=50)


def test_structured_outputs_through_the_openai_client_and_grpc(http_server):
    server, url, _, _, data_dir = http_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=USER_TOKEN, max_retries=0)
    ask = [{"role": "user", "content": "Name a big city and its population."}]
    parsed = client.chat.completions.parse(model="prefloop", messages=ask, max_tokens=96,
                                           temperature=0, response_format=Answer)
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Answer)
    stream = client.chat.completions.create(model="prefloop", messages=ask, max_tokens=160,
                                            temperature=0.7, seed=3, stream=True,
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream
                                         if c.choices)), dict)
    completion = client.completions.create(  # the SDK's completions take it as an extra field
        model="prefloop", prompt="A city as JSON:", max_tokens=96, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": {**Answer.model_json_schema(), "additionalProperties": False}}}})
    Answer.model_validate_json(completion.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys"):
        client.chat.completions.create(model="prefloop", messages=ask, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}})
    with Client(server.target, token=USER_TOKEN) as grpc_client:
        schema = {"type": "json_schema", "json_schema": {
            "schema": {**Answer.model_json_schema(), "additionalProperties": False}}}
        text = grpc_client.chat(ask, max_tokens=96, temperature=0,
                                response_format=schema).completions[0].text
        Answer.model_validate_json(text)
        with pytest.raises(Exception, match="INVALID_ARGUMENT.*json_object or json_schema"):
            grpc_client.chat(ask, response_format={"type": "yaml"})
    rid = parsed.choices[0].model_extra["response_id"]
    rows = {}
    assert wait_until(lambda: rows.update({g["response_id"]: g for g in load_table(
        data_dir, "generations").to_pylist()}) or rid in rows, timeout=20)
    assert rows[rid]["response_format"].startswith("json_schema:")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_calls_through_the_openai_client(http_server):
    server, url, _, _, data_dir = http_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=USER_TOKEN, max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="prefloop", messages=ask, tools=[WEATHER_TOOL],
                                           tool_choice=named, max_tokens=64, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    stream = client.chat.completions.create(model="prefloop", messages=ask, tools=[WEATHER_TOOL],
                                            tool_choice="required", max_tokens=64, temperature=0,
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments) == arguments  # greedy: the same call
    # the tool's answer goes back; the model answers in text (tool_choice none: no tools offered)
    follow = client.chat.completions.create(model="prefloop", max_tokens=24, temperature=0, messages=[
        *ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12 C and rain"}],
        tools=[WEATHER_TOOL], tool_choice="none")
    assert follow.choices[0].message.content and follow.choices[0].finish_reason in ("stop", "length")
    rid = reply.choices[0].model_extra["response_id"]
    rows = {}
    assert wait_until(lambda: rows.update({g["response_id"]: g for g in load_table(
        data_dir, "generations").to_pylist()}) or rid in rows, timeout=20)
    assert rows[rid]["response_format"] == "tools:get_weather:get_weather"
    assert "<tools>" in rows[rid]["messages"][0]["content"]  # the log keeps what the model saw


def test_langchain_structured_output_and_bound_tools(http_server):
    from langchain_openai import ChatOpenAI

    _, url, *_ = http_server
    llm = ChatOpenAI(base_url=url + "/v1", api_key=USER_TOKEN, model="prefloop", temperature=0,
                     max_tokens=96, max_retries=0)
    answer = llm.with_structured_output(Answer).invoke("Name a big city and its population.")
    assert isinstance(answer, Answer)

    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city; unit is celsius or fahrenheit."""
        return f"12 {unit} in {city}"
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Oslo?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}


class HttpStreamers(Streamers):
    """Streamers over the HTTP API (raw SSE through httpx): (model_version, text) per answer."""

    def __init__(self, url: str, n: int = 16):
        super().__init__(target="", n=n)
        self.url = url

    def _run(self) -> None:
        body = {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {USER_TOKEN}"}) as http:
            while not self.stop.is_set():
                try:
                    text, versions = [], set()
                    with http.stream("POST", self.url + "/v1/chat/completions", json=body) as res:
                        assert res.status_code == 200, res.read()
                        for line in res.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            versions.add(chunk["model_version"])
                            text.append(chunk["choices"][0]["delta"].get("content", ""))
                    assert len(versions) == 1, versions
                    self.results.append((versions.pop(), "".join(text)))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    self.failures.append(repr(exc))


def test_both_apis_stream_through_a_hot_swap_without_failures(http_server):
    server, url, registry, v1, _ = http_server
    with Streamers(server.target, 16) as grpc_load, HttpStreamers(url, 16) as http_load:
        assert wait_until(lambda: len(grpc_load.results) >= 16 and len(http_load.results) >= 16,
                          timeout=300)
        promoted = httpx.post(url + "/v1/admin/promote", json={"version": v1, "reason": "test"},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=300)
        assert promoted.json() == {"previous_version": "v0000", "current_version": v1}
        at_swap = len(grpc_load.results), len(http_load.results)
        assert wait_until(lambda: len(grpc_load.results) >= at_swap[0] + 16
                          and len(http_load.results) >= at_swap[1] + 16, timeout=300)
    assert grpc_load.failures == [] and http_load.failures == []
    for load in (grpc_load, http_load):
        versions = [v for v, _ in load.results]
        assert set(versions) == {"v0000", v1} and versions[-1] == v1
        by_version: dict[str, set] = {}
        for version, text in load.results:
            by_version.setdefault(version, set()).add(text)
        assert all(len(texts) == 1 for texts in by_version.values()), "greedy answers differ"
    metrics = httpx.get(url + "/metrics").text
    assert "prefloop_hot_swaps_total 1.0" in metrics
    assert 'prefloop_model_info{backend="native"' in metrics and f'version="{v1}"' in metrics


def test_http_feedback_is_in_the_parquet_log_after_a_clean_stop(http_server):
    server, url, _, _, data_dir = http_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=USER_TOKEN, max_retries=0)
    reply = client.chat.completions.create(model="prefloop", messages=QUESTION, max_tokens=8, n=2,
                                           user="alice")
    a, b = (c.model_extra["response_id"] for c in reply.choices)
    headers = {"Authorization": f"Bearer {USER_TOKEN}"}
    pref = httpx.post(url + "/v1/feedback/preference", headers=headers,
                      json={"chosen_response_id": a, "rejected_response_id": b,
                            "idempotency_key": "real-1"})
    assert pref.status_code == 200
    assert server.terminate() == 0
    feedback = load_table(data_dir, "feedback", include_wal=False).to_pylist()
    assert [(r["chosen_response_id"], r["rejected_response_id"]) for r in feedback] == [(a, b)]
    rows = {g["response_id"]: g for g in load_table(data_dir, "generations",
                                                    include_wal=False).to_pylist()}
    assert rows[a]["source"] == rows[b]["source"] == "http" and rows[a]["user_id"] == "alice"
