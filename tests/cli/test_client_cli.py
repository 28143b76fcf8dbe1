"""`prefloop chat` and `prefloop bench`: the session logic on the fake server (fast), and both
commands as subprocesses against the real server (slow)."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import USER_TOKEN

from prefloop.cli.bench import percentile
from prefloop.cli.chat import COMMANDS, ChatSession, add_arguments, command, handle_line, sampling_of
from prefloop.clients import Client


def test_chat_session_keeps_the_conversation(fake_server):
    out = io.StringIO()
    with Client(fake_server.target, timeout=30) as client:
        session = ChatSession(client, out=out, system="be brief", sampling={"max_tokens": 2})
        assert handle_line(session, "hello")
        first_id = session.last_response_id
        assert handle_line(session, "again")
        assert [m["role"] for m in session.messages] == [
            "system", "user", "assistant", "user", "assistant"]
        assert session.messages[2]["content"] == " w1 w2"
        assert session.last_response_id.startswith("resp-") and session.last_response_id != first_id
        assert handle_line(session, "/version")
        assert "fake-v0" in out.getvalue()
        assert "server sampling defaults: temperature 0.3, top_p 0.9, top_k 0, repetition_penalty 1" in out.getvalue()
        assert handle_line(session, "/reset")
        assert session.messages == [{"role": "system", "content": "be brief"}]
        assert session.last_response_id is None
        assert handle_line(session, "/nope") and "unknown command" in out.getvalue()
        assert handle_line(session, "/help") and "/reset" in out.getvalue()
        assert handle_line(session, "/quit") is False
    # the prompt-side record: the server saw the full conversation on the second turn
    assert fake_server.recorder.rows[1]["messages"][-1] == {"role": "user", "content": "again"}


def test_chat_errors_do_not_end_the_session(fake_server):
    out = io.StringIO()
    with Client(fake_server.target, timeout=30) as client:
        session = ChatSession(client, out=out, sampling={"max_tokens": 0})
        assert handle_line(session, "hello") is True
        assert "error: INVALID_ARGUMENT" in out.getvalue()
        assert session.messages == []  # the failed turn is not kept


def test_chat_commands_are_extensible(fake_server):
    seen = []

    @command("/good", "rate the last answer up")
    def good(session, arg):
        seen.append(session.last_response_id)
        return True

    try:
        with Client(fake_server.target, timeout=30) as client:
            session = ChatSession(client, out=io.StringIO(), sampling={"max_tokens": 1})
            handle_line(session, "hi")
            handle_line(session, "/good")
        assert seen == [session.last_response_id] and seen[0]
    finally:
        COMMANDS.pop("/good")


def test_chat_flags_reach_the_engine_as_sampling_params(fake_server):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-tokens", "2", "--repetition-penalty", "1.1",
                              "--frequency-penalty", "0.5", "--presence-penalty", "-0.25", "--seed", "7"])
    sampling = sampling_of(args)
    assert "temperature" not in sampling and "top_p" not in sampling  # unset: the server's defaults
    with Client(fake_server.target, timeout=30) as client:
        assert handle_line(ChatSession(client, out=io.StringIO(), sampling=sampling), "hi")
    used = fake_server.generator.params[-1]
    assert (used.max_tokens, used.repetition_penalty, used.frequency_penalty, used.presence_penalty,
            used.seed) == (2, 1.1, 0.5, -0.25, 7)


@pytest.mark.parametrize("flag, value, message", [
    ("--frequency-penalty", "3", "frequency_penalty must be in [-2, 2]"),
    ("--presence-penalty", "-2.5", "presence_penalty must be in [-2, 2]"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
])
def test_chat_refuses_a_bad_sampling_flag_before_connecting(flag, value, message):
    result = _cli("chat", "--target", "127.0.0.1:1", flag, value, stdin="hi\n", timeout=60)
    assert result.returncode == 2
    assert f"prefloop chat: {message}" in result.stderr
    assert "cannot reach" not in result.stderr  # it never tried to connect


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99


def _cli(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFLOOP_TOKEN=USER_TOKEN)
    return subprocess.run([sys.executable, "-m", "prefloop.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_command_end_to_end(real_server):
    result = _cli("chat", "--target", real_server.target, "--max-tokens", "16",
                  "--temperature", "0",
                  stdin="What is the capital of France?\n/version\n/reset\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "model version SmolLM2-135M-Instruct" in result.stdout
    assert "[conversation reset]" in result.stdout
    eof = _cli("chat", "--target", real_server.target, stdin="")  # Ctrl-D at once
    assert eof.returncode == 0, eof.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_command_reports_unreachable_server():
    result = _cli("chat", "--target", "127.0.0.1:1", stdin="hi\n", timeout=60)
    assert result.returncode == 1 and "cannot reach" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_command_json(real_server):
    result = _cli("bench", "--target", real_server.target, "--concurrency", "1,2",
                  "--max-tokens", "8", "--rounds", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["concurrency"] for r in report["results"]] == [1, 2]
    for level in report["results"]:
        assert level["errors"] == 0 and level["requests"] == level["concurrency"]
        assert 0 < level["completion_tokens"] <= 8 * level["requests"]
        assert level["tokens_per_s"] > 0
        assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_p99"]
        assert 0 < level["itl_ms_p50"] <= level["itl_ms_p99"]
    table = _cli("bench", "--target", real_server.target, "--concurrency", "1",
                 "--max-tokens", "4", "--rounds", "1", "--warmup", "0")
    assert table.returncode == 0 and "tok/s" in table.stdout


class _Reader:
    """Collects a subprocess's stdout in a thread so the test can wait for text with a timeout."""

    def __init__(self, stream) -> None:
        import threading

        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        while True:
            data = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not data:
                return
            with self._lock:
                self.text += data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0) -> bool:
        from conftest import wait_until

        return wait_until(lambda: needle in self.text, timeout=timeout)


def _reading_stdin(pid: int) -> bool:
    """Whether the process's main thread is blocked in read(0, ...) (x86-64/arm64 Linux)."""
    try:
        call = open(f"/proc/{pid}/syscall").read().split()
    except OSError:
        return False
    return len(call) > 1 and call[0] in ("0", "63") and int(call[1], 16) == 0


@pytest.mark.timeout(120)
def test_chat_ctrl_c_stops_the_answer_then_quits(fake_server):
    import signal

    from conftest import wait_until

    fake_server.generator.step_s = 0.05
    # started the way a shell script's background job is (and the way a test process that some
    # library told to ignore SIGINT starts it): SIGINT ignored; the chat must still catch Ctrl-C
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefloop.cli", "chat", "--target", fake_server.target,
         "--max-tokens", "200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        out = _Reader(proc.stdout)
        assert out.wait_for("connected to"), out.text
        proc.stdin.write(b"tell me everything\n")
        proc.stdin.flush()
        assert out.wait_for(" w3"), out.text
        proc.send_signal(signal.SIGINT)  # Ctrl-C during the answer: stop it, stay in the chat
        assert out.wait_for("[answer interrupted"), out.text
        assert wait_until(lambda: not fake_server.generator.running, timeout=10)
        assert fake_server.generator.aborted  # the server aborted the request
        proc.stdin.write(b"/version\n")
        proc.stdin.flush()
        assert out.wait_for("model version fake-v0"), out.text
        assert wait_until(lambda: _reading_stdin(proc.pid), timeout=30)  # back at the prompt
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: quit cleanly
        assert proc.wait(30) == 0
        assert "Traceback" not in out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_stats_command_prints_the_engine_stats(fake_server):
    result = _cli("stats", "--target", fake_server.target, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("version", "running", "waiting", "KV cache used", "prefix hits", "requests"):
        assert label in out
    assert "fake-v0" in out
    assert "sampling       temperature 0.3, top_p 0.9, top_k 0, repetition_penalty 1" in out
    as_json = json.loads(_cli("stats", "--target", fake_server.target, "--json",
                              timeout=60).stdout)
    assert as_json["model_version"] == "fake-v0"
    assert as_json["sampling_defaults"] == {"temperature": 0.3, "top_p": 0.9, "top_k": 0,
                                            "repetition_penalty": 1.0}
    assert {"running", "waiting", "free_blocks", "total_blocks", "kv_use",
            "prefix_cache_hit_tokens"} <= set(as_json)
    down = _cli("stats", "--target", "127.0.0.1:1", "--timeout", "2", timeout=60)
    assert down.returncode == 1 and "prefloop stats: 127.0.0.1:1" in down.stderr


def test_bench_prints_rows_and_a_total_progress_bar(fake_server):
    result = _cli("bench", "--target", fake_server.target, "--concurrency", "1,2",
                  "--max-tokens", "4", "--rounds", "2", "--warmup", "0", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2]
    assert "requests" in result.stderr and "6/6" in result.stderr  # (1 + 2) x 2 rounds
    quiet = _cli("bench", "--target", fake_server.target, "--concurrency", "1",
                 "--max-tokens", "4", "--rounds", "1", "--warmup", "0", "--no-progress",
                 timeout=120)
    assert quiet.returncode == 0 and "1/1" not in quiet.stderr
