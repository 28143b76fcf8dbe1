"""One table of hostile inputs, sent to both APIs of one in-process server (fake generator, a real
feedback log): every malformed, oversized or out-of-range field gRPC refuses is refused over HTTP
too, with the matching status (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429;
a body over --max-message-bytes is RESOURCE_EXHAUSTED on gRPC and 413 on HTTP, before it is
read) and OpenAI's error body with a message that names the problem. Requests go out raw (protos
through the stubs, JSON through httpx) so no client-side check hides a server gap. After the
table, both APIs still serve and the log holds only the two valid votes."""
from __future__ import annotations

import asyncio
import json
import threading

import grpc
import httpx
import pytest
from conftest import FakeGenerator

from prefloop.proto.prefloop.v1 import feedback_pb2, feedback_pb2_grpc, generation_pb2, generation_pb2_grpc
from prefloop.server.api.feedback import feedback_extension
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig
from prefloop.server.api.limits import Limits
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table

HTTP_OF = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429}
LIMITS = Limits(max_message_bytes=65536, max_n=4, max_prompt_tokens=200, max_max_tokens=64,
                default_max_tokens=16)
HI = [{"role": "user", "content": "hi"}]
SCHEMA_NOT_OBJECT = {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}

# (case, kind, fields, expected gRPC status, words the message must contain)
# kind "chat": fields are the sampling fields of /v1/chat/completions (and SamplingParams);
# "messages": the conversation itself; "rating" / "preference": the feedback fields.
CASES = [
    ("no messages", "messages", [], "INVALID_ARGUMENT", "messages"),
    ("unknown role", "messages", [{"role": "wizard", "content": "hi"}], "INVALID_ARGUMENT",
     "wizard"),
    ("empty role", "messages", [{"role": "", "content": "hi"}], "INVALID_ARGUMENT", "role"),
    ("max_tokens 0", "chat", {"max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens negative", "chat", {"max_tokens": -3}, "INVALID_ARGUMENT", "max_tokens"),
    ("max_tokens over the limit", "chat", {"max_tokens": 65}, "INVALID_ARGUMENT",
     "max_max_tokens=64"),
    ("top_p 0", "chat", {"top_p": 0.0}, "INVALID_ARGUMENT", "top_p"),
    ("top_p over 1", "chat", {"top_p": 1.5}, "INVALID_ARGUMENT", "top_p"),
    ("negative temperature", "chat", {"temperature": -0.5}, "INVALID_ARGUMENT", "temperature"),
    ("n 0", "chat", {"n": 0}, "INVALID_ARGUMENT", "n"),
    ("n over the limit", "chat", {"n": 5}, "INVALID_ARGUMENT", "max_n=4"),
    ("negative top_k", "chat", {"top_k": -1}, "INVALID_ARGUMENT", "top_k"),
    ("empty stop string", "chat", {"stop": [""]}, "INVALID_ARGUMENT", "stop"),
    ("prompt over max_prompt_tokens", "messages", [{"role": "user", "content": "x" * 300}],
     "INVALID_ARGUMENT", "max_prompt_tokens=200"),
    ("unknown response_format type", "chat", {"response_format": {"type": "yaml"}},
     "INVALID_ARGUMENT", "yaml"),
    ("schema that is not an object", "chat", {"response_format": SCHEMA_NOT_OBJECT},
     "INVALID_ARGUMENT", "schema"),
    ("thumbs score 7", "rating", {"score": 7, "scale": "thumbs"}, "INVALID_ARGUMENT", "thumbs"),
    ("stars score 0", "rating", {"score": 0, "scale": "stars"}, "INVALID_ARGUMENT", "star"),
    ("rating of an unknown response", "rating", {"response_id": "resp-nope", "score": 1},
     "NOT_FOUND", "resp-nope"),
    ("comment over the limit", "rating", {"score": 1, "comment": "c" * 5000},
     "INVALID_ARGUMENT", "max_comment_chars"),
    ("user id over the limit", "rating", {"score": 1, "user_id": "u" * 300}, "INVALID_ARGUMENT",
     "max_id_chars"),
    ("identical texts", "preference", {"prompt_messages": HI, "chosen_text": "a",
                                       "rejected_text": "a"}, "INVALID_ARGUMENT", "identical"),
    ("preference without a prompt", "preference", {"chosen_text": "a", "rejected_text": "b"},
     "INVALID_ARGUMENT", "prompt_messages"),
    ("preference of unknown responses", "preference",
     {"chosen_response_id": "resp-x", "rejected_response_id": "resp-y"}, "NOT_FOUND", "resp-x"),
]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(grpc channel, http client, response id, data dir) of one server with both APIs."""
    tmp = tmp_path_factory.mktemp("hostile")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    store, registration = feedback_extension(tmp / "data")
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, data_dir=tmp / "data",
                       limits=LIMITS)

    async def build():
        server = PrefloopServer(FakeGenerator(step_s=0.001), cfg, recorder=store,
                                feedback_store=store, services=[registration])
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    http = httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30)
    reply = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
    yield channel, http, reply.json()["choices"][0]["response_id"], tmp / "data"
    http.close()
    channel.close()
    asyncio.run_coroutine_threadsafe(server.shutdown(0), loop).result(30)  # closes the store
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def grpc_call(channel, kind: str, fields, response_id: str) -> tuple[str, str]:
    """(status name, details) of the raw RPC for a case."""
    try:
        if kind in ("chat", "messages"):
            messages = fields if kind == "messages" else HI
            sampling = {} if kind == "messages" else dict(fields)
            fmt = sampling.pop("response_format", None)
            params = generation_pb2.SamplingParams(**sampling)
            if fmt is not None:
                schema = fmt.get("json_schema", {})
                params.response_format.CopyFrom(generation_pb2.ResponseFormat(
                    type=fmt["type"], json_schema=json.dumps(schema.get("schema"))
                    if schema else "", name=schema.get("name", "")))
            generation_pb2_grpc.GenerationStub(channel).Chat(generation_pb2.ChatRequest(
                messages=[generation_pb2.ChatMessage(**m) for m in messages], sampling=params),
                timeout=30)
        elif kind == "rating":
            scale = {"thumbs": feedback_pb2.RATING_SCALE_THUMBS,
                     "stars": feedback_pb2.RATING_SCALE_STARS}.get(fields.get("scale"), 0)
            feedback_pb2_grpc.FeedbackStub(channel).SubmitRating(feedback_pb2.SubmitRatingRequest(
                **{"response_id": response_id, **{k: v for k, v in fields.items()
                                                   if k != "scale"}}, scale=scale), timeout=30)
        else:
            body = dict(fields)
            messages = body.pop("prompt_messages", [])
            feedback_pb2_grpc.FeedbackStub(channel).SubmitPreference(
                feedback_pb2.SubmitPreferenceRequest(
                    prompt_messages=[generation_pb2.ChatMessage(**m) for m in messages], **body),
                timeout=30)
    except grpc.RpcError as err:
        return err.code().name, err.details()
    return "OK", ""


def http_call(http, kind: str, fields, response_id: str) -> httpx.Response:
    if kind == "messages":
        return http.post("/v1/chat/completions", json={"messages": fields, "max_tokens": 2})
    if kind == "chat":
        return http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **fields})
    if kind == "rating":
        return http.post("/v1/feedback/rating", json={"response_id": response_id, **fields})
    return http.post("/v1/feedback/preference", json=fields)


@pytest.mark.parametrize("case, kind, fields, status, words", CASES, ids=[c[0] for c in CASES])
def test_both_apis_refuse_the_same_way(both, case, kind, fields, status, words):
    channel, http, response_id, _ = both
    code, details = grpc_call(channel, kind, fields, response_id)
    assert code == status, (case, details)
    assert words.lower() in details.lower(), details
    answer = http_call(http, kind, fields, response_id)
    assert answer.status_code == HTTP_OF[status], answer.text
    error = answer.json()["error"]
    assert words.lower() in error["message"].lower() and error["type"], error


def test_oversized_bodies_and_malformed_json(both):
    channel, http, response_id, _ = both
    big = [{"role": "user", "content": "x" * 70_000}]
    assert grpc_call(channel, "messages", big, response_id)[0] == "RESOURCE_EXHAUSTED"
    answer = http.post("/v1/chat/completions", json={"messages": big})
    assert answer.status_code == 413 and "65536" in answer.json()["error"]["message"]
    for path in ("/v1/chat/completions", "/v1/feedback/rating", "/v1/feedback/preference"):
        bad = http.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["message"], (path, bad.text)
    wrong_type = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": "many"})
    assert wrong_type.status_code == 400 and "max_tokens" in wrong_type.json()["error"]["message"]
    unknown = http.post("/v1/feedback/rating", json={"response_id": response_id, "score": 1,
                                                     "stars": 5})
    assert unknown.status_code == 400 and "stars" in unknown.json()["error"]["message"]


def test_after_the_table_both_apis_serve_and_the_log_holds_only_valid_votes(both):
    channel, http, response_id, data = both
    reply = generation_pb2_grpc.GenerationStub(channel).Chat(generation_pb2.ChatRequest(
        messages=[generation_pb2.ChatMessage(role="user", content="still there?")]), timeout=30)
    assert reply.completions[0].response_id
    assert http.post("/v1/feedback/rating", json={"response_id": response_id,
                                                  "score": 1}).status_code == 200
    assert grpc_call(channel, "rating", {"score": -1}, response_id) == ("OK", "")
    assert http.get("/health").json()["feedback"]["status"] == "ok"
    store_rows = load_table(data, logschema.FEEDBACK)  # the WAL is read too
    assert sorted(store_rows["score"].to_pylist()) == [-1, 1]
