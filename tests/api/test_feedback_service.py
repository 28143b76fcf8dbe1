"""The Feedback service over gRPC (fast: in-process server with the fake generator and a real
FeedbackStore in a tmp dir), the client methods, and chat's feedback keys."""
from __future__ import annotations

import asyncio
import io
import threading

import pytest
from conftest import FakeGenerator, wait_until

from prefloop.cli.chat import ChatSession, handle_line
from prefloop.clients import AsyncClient, Client, chat_feedback
from prefloop.clients import errors as cerr
from prefloop.server.api.feedback import feedback_extension, store_config_from_env
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig
from prefloop.server.feedback import schema as logschema
from prefloop.server.feedback.export import load_table

Q = [{"role": "user", "content": "hello"}]


class TwoVoices(FakeGenerator):
    """The fake generator, with completions that differ by index (so n=2 gives two answers)."""

    async def stream(self, request_id, prompt_ids, params):
        async for delta in super().stream(request_id, prompt_ids, params):
            delta.text_delta += f"/{delta.index}"
            yield delta


@pytest.fixture
def served(tmp_path):
    """(target, store): a server on a background loop, Feedback wired as `serve` wires it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    store, registration = feedback_extension(tmp_path / "data")

    async def build():
        server = PrefloopServer(TwoVoices(), ServerConfig(port=0), recorder=store,
                                services=[registration])
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    yield f"127.0.0.1:{port}", store
    asyncio.run_coroutine_threadsafe(server.shutdown(0), loop).result(30)  # closes the store
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_preference_and_rating_round_trip(served):
    target, store = served
    with Client(target, timeout=30) as client:
        result = client.chat(Q, max_tokens=3, n=2)
        a, b = (c.response_id for c in result.completions)
        first = client.submit_preference(chosen_response_id=a, rejected_response_id=b,
                                         idempotency_key="k", user_id="u", session_id="s")
        assert not first.duplicate
        again = client.submit_preference(chosen_response_id=a, rejected_response_id=b,
                                         idempotency_key="k")
        assert (again.feedback_id, again.duplicate) == (first.feedback_id, True)
        client.submit_rating(a, 1, scale="stars", comment="one star")
        client.submit_preference(prompt_messages=Q, chosen_text="hi!", rejected_text="go away")
    store.flush()
    rows = load_table(store.data_dir, logschema.FEEDBACK).to_pylist()
    assert sorted(r["kind"] for r in rows) == ["preference", "preference", "rating"]
    (rating,) = [r for r in rows if r["kind"] == "rating"]
    assert (rating["score"], rating["scale"], rating["comment"]) == (1, "stars", "one star")
    (by_id,) = [r for r in rows if r["chosen_response_id"]]
    assert (by_id["feedback_id"], by_id["user_id"], by_id["session_id"]) == (
        first.feedback_id, "u", "s")
    gens = load_table(store.data_dir, logschema.GENERATIONS)
    assert set(gens["response_id"].to_pylist()) == {a, b}  # the server recorded its answers


def test_errors_map_to_status_codes(served):
    target, _ = served
    with Client(target, timeout=30) as client:
        result = client.chat(Q, max_tokens=3, n=2)
        a = result.completions[0].response_id
        with pytest.raises(cerr.NotFound, match="resp-missing"):
            client.submit_rating("resp-missing", 1)
        with pytest.raises(cerr.InvalidArgument, match="same response"):
            client.submit_preference(chosen_response_id=a, rejected_response_id=a)
        with pytest.raises(cerr.InvalidArgument, match="max_text_chars"):
            client.submit_preference(prompt_messages=Q, chosen_text="x" * 40_000,
                                     rejected_text="y")
        with pytest.raises(cerr.InvalidArgument, match="thumbs score"):
            client.submit_rating(a, 3, scale="thumbs")
        with pytest.raises(ValueError):
            client.submit_rating(a, 3, scale="percent")


def test_vote_flood_gets_resource_exhausted(served):
    from prefloop.server.feedback.vote_rate import VoteRateLimiter
    target, store = served
    store.caller_vote_rate = VoteRateLimiter(per_minute=3)  # `--token-votes-per-minute 3`
    with Client(target, timeout=30) as client:
        (answer,) = client.chat(Q, max_tokens=3).completions
        for i in range(3):  # different user ids: the caller's own bucket still empties
            client.submit_rating(answer.response_id, 1, user_id=f"u{i}")
        with pytest.raises(cerr.ResourceExhausted, match="too many votes from anonymous"):
            client.submit_rating(answer.response_id, 1, user_id="u9")


def test_async_client(served):
    target, _ = served

    async def main():
        async with AsyncClient(target, timeout=30) as client:
            result = await client.chat(Q, max_tokens=3, n=2)
            a, b = (c.response_id for c in result.completions)
            acks = await asyncio.gather(*(client.submit_rating(a, -1, idempotency_key=f"k{i % 4}")
                                          for i in range(16)))
            pref = await client.submit_preference(chosen_response_id=b, rejected_response_id=a)
            return acks, pref

    acks, pref = asyncio.run(main())
    assert len({ack.feedback_id for ack in acks}) == 4
    assert sum(not ack.duplicate for ack in acks) == 4 and not pref.duplicate


def test_segment_env_knobs():
    cfg = store_config_from_env("d", {"PREFLOOP_WAL_SEGMENT_SECONDS": "0.5",
                                      "PREFLOOP_WAL_SEGMENT_BYTES": "4096"})
    assert (cfg.wal.max_segment_age_s, cfg.wal.max_segment_bytes) == (0.5, 4096)


# ---- chat feedback keys -------------------------------------------------------------------------

def chat_session(target: str) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    return ChatSession(Client(target, timeout=30), out=out, sampling={"max_tokens": 3},
                       session_id="chat-test", user_id="tester"), out


def test_chat_up_down_better(served):
    target, store = served
    session, out = chat_session(target)
    assert handle_line(session, "/up")
    assert "nothing to rate yet" in out.getvalue()
    handle_line(session, "hi there")
    rated = session.last_response_id
    handle_line(session, "/down too short")
    handle_line(session, "/better Hello! How can I help you today?")
    assert session.messages[-1] == {"role": "assistant",
                                    "content": "Hello! How can I help you today?"}
    session.client.close()
    assert out.getvalue().count("[recorded fb-") == 2
    store.flush()
    rows = sorted(load_table(store.data_dir, logschema.FEEDBACK).to_pylist(),
                  key=lambda r: r["created_at"])
    assert [r["kind"] for r in rows] == ["rating", "preference"]
    assert (rows[0]["response_id"], rows[0]["score"], rows[0]["comment"]) == (
        rated, -1, "too short")
    assert rows[0]["user_id"] == "tester" and rows[0]["session_id"] == "chat-test"
    assert rows[1]["prompt_messages"] == [{"role": "user", "content": "hi there"}]
    assert rows[1]["chosen_text"] == "Hello! How can I help you today?"


def test_chat_pair_picks_the_better(served, monkeypatch):
    target, store = served
    session, out = chat_session(target)
    monkeypatch.setattr(chat_feedback, "read_choice", lambda prompt: "2")
    handle_line(session, "/pair tell me a joke")
    text = out.getvalue()
    assert "--- [A] ---" in text and "--- [B] ---" in text and "[recorded fb-" in text
    session.client.close()
    store.flush()
    (row,) = load_table(store.data_dir, logschema.FEEDBACK).to_pylist()
    assert row["chosen_response_id"] == session.last_response_id
    assert session.messages[-1]["role"] == "assistant"


def test_chat_up_after_better_rates_the_answer_shown(served):
    target, store = served
    session, out = chat_session(target)
    handle_line(session, "hi there")
    shown = session.last_response_id
    handle_line(session, "/better Hello! How can I help you today?")
    assert handle_line(session, "/up good start")
    assert "nothing to rate yet" not in out.getvalue()  # was: refused after /better
    session.client.close()
    assert out.getvalue().count("[recorded fb-") == 2
    store.flush()
    rating = next(r for r in load_table(store.data_dir, logschema.FEEDBACK).to_pylist()
                  if r["kind"] == "rating")
    assert (rating["response_id"], rating["score"]) == (shown, 1)


def test_chat_pair_alone_reuses_the_last_message_side_by_side(served, monkeypatch):
    target, store = served
    session, out = chat_session(target)
    monkeypatch.setattr(chat_feedback, "read_choice", lambda prompt: "b")
    monkeypatch.setattr(chat_feedback, "terminal_width", lambda: 120)
    handle_line(session, "/pair")
    assert "usage: /pair <message>" in out.getvalue()  # nothing to reuse yet
    handle_line(session, "tell me a joke")
    handle_line(session, "/pair")
    lines = out.getvalue().splitlines()
    head = next(line for line in lines if "--- [A] ---" in line)
    assert "| --- [B] ---" in head  # one line: two columns
    assert head.index("|") == (120 - 3) // 2 + 1
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["tell me a joke"]
    assert session.messages[-1]["role"] == "assistant"
    session.client.close()
    store.flush()
    (row,) = load_table(store.data_dir, logschema.FEEDBACK).to_pylist()
    assert row["chosen_response_id"] == session.last_response_id


def test_side_by_side_wraps_each_answer_in_its_column():
    lines = chat_feedback.side_by_side("one two three four five", "x", 23)
    assert lines[0].startswith("--- [A] ---") and "| --- [B] ---" in lines[0]
    assert lines[1] == "one two    | x" and lines[2].startswith("three four |")
    assert all(len(line) <= 23 for line in lines[1:])


def test_grpc_health_marks_feedback_not_serving_while_the_disk_is_full(tmp_path):
    import errno
    import os

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from prefloop.server.api.grpc_server import FEEDBACK_SERVICE
    from prefloop.server.feedback.wal import WalConfig
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = store_config_from_env(tmp_path / "data")
    config.wal = WalConfig(linger_s=0.005, retry_interval_s=0.05)
    store, registration = feedback_extension(tmp_path / "data", config)

    async def build():
        server = PrefloopServer(TwoVoices(), ServerConfig(port=0), recorder=store,
                                feedback_store=store, services=[registration])
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    try:
        import grpc
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                Client(f"127.0.0.1:{port}", timeout=30) as client:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service)).status

            serving = health_pb2.HealthCheckResponse.SERVING
            assert status(FEEDBACK_SERVICE) == serving
            (answer,) = client.chat(Q, max_tokens=2).completions
            real_write = store.wal._write

            def full(fd, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            store.wal._write = full
            with pytest.raises(cerr.Unavailable, match="disk full"):
                client.submit_rating(answer.response_id, 1)
            assert wait_until(lambda: status(FEEDBACK_SERVICE) != serving, timeout=10)
            assert status("") == serving and client.chat(Q, max_tokens=2).text  # chat serves
            store.wal._write = real_write
            client.chat(Q, max_tokens=2)  # its generation row commits: the log writes again
            assert wait_until(lambda: status(FEEDBACK_SERVICE) == serving, timeout=10)
            assert not client.submit_rating(answer.response_id, 1).duplicate
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
