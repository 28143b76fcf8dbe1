"""Fixtures for the gRPC tests: a fake generator served in-process, and ONE real server per session.

`fake_server` (fast): `PrefloopServer` with `FakeGenerator` on a free loopback port, run on an
event loop in a background thread, so tests use the blocking `Client`. `real_server` (slow):
`prefloop serve --port 0` as a subprocess with the default model and user/admin tokens, shared by
the whole session and stopped with SIGTERM at the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import InvalidArgument

USER_TOKEN = "user-test-token-1"
ADMIN_TOKEN = "admin-test-token-1"


# ---- a fake model folder (registry tests: files only, never loaded) ---------------------------

def fake_model(path: Path, payload: bytes = b"weights-0") -> str:
    """An HF-like folder for registry tests: config, fake weights, tokenizer, and one file that is
    not a model file (a version must not take it over)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(payload)
    (path / "tokenizer.json").write_text("{}")
    (path / "optimizer.pt").write_bytes(b"not copied")  # not a model file
    return str(path)


# ---- a fake generator with the real Generator's interface --------------------------------------

@dataclass(slots=True)
class FakeInfo:
    model_version: str = "fake-v0"
    architecture: str = "FakeForCausalLM"
    context_length: int = 256
    dtype: str = "float32"
    backend: str = "fake"
    model_path: str = ""


@dataclass(slots=True)
class FakeDelta:
    index: int
    text_delta: str
    token_ids: list[int]
    finish_reason: str | None
    completion_tokens: int
    model_version: str = "fake-v0"
    stop_reason: str | None = None


class FakeGenerator:
    """Tokens are the prompt's bytes; completion i emits " w<step>" words, one per `step_s`.

    A prompt containing "BOOM" raises RuntimeError inside stream (an unexpected server bug).
    `running` holds the request ids being generated; each holds `blocks_per_request` blocks;
    `params` the SamplingParams of every request, in order.
    """

    def __init__(self, step_s: float = 0.005, total_blocks: int = 64,
                 blocks_per_request: int = 2, context_length: int = 256) -> None:
        self.info = FakeInfo(context_length=context_length)
        self.step_s = step_s
        self.total_blocks = total_blocks
        self.blocks_per_request = blocks_per_request
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.params: list[SamplingParams] = []
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidArgument("prompt is empty")
        return list(prompt.encode())

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise InvalidArgument("messages is empty")
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidArgument(f"messages[{i}].role {m['role']!r} is unknown")
        return list("".join(f"<{m['role']}>{m['content']}" for m in messages).encode())

    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        if len(prompt_ids) + params.max_tokens > self.info.context_length:
            raise InvalidArgument("prompt + max_tokens exceeds the context length")
        if b"BOOM" in bytes(prompt_ids):
            raise RuntimeError("fake engine bug")
        self.running.add(request_id)
        self.params.append(params)
        try:
            for step in range(1, params.max_tokens + 1):
                await asyncio.sleep(self.step_s)
                for index in range(params.n):
                    last = step == params.max_tokens
                    yield FakeDelta(index, f" w{step}", [step], "length" if last else None, step)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> dict:
        used = len(self.running) * self.blocks_per_request
        return {"running": len(self.running), "waiting": 0, "total_blocks": self.total_blocks,
                "free_blocks": self.total_blocks - used, "prefix_cache_hit_tokens": 0,
                "steps": 7}


class RecordingRecorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def record_generation(self, row) -> None:
        self.rows.append(dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row)


# ---- an in-process server on a background event loop --------------------------------------------

@dataclass
class InProcessServer:
    server: Any
    generator: FakeGenerator
    recorder: RecordingRecorder
    loop: asyncio.AbstractEventLoop
    target: str
    thread: threading.Thread
    extra: dict = field(default_factory=dict)

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        self.call(self.server.shutdown(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_in_process_server(generator=None, **config_kwargs) -> InProcessServer:
    from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig

    generator = generator or FakeGenerator()
    recorder = RecordingRecorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-grpc-server", daemon=True)
    thread.start()
    config = ServerConfig(host="127.0.0.1", port=0, **config_kwargs)

    async def build():  # the grpc.aio server must be created on its own loop
        server = PrefloopServer(generator, config, recorder=recorder)
        port = await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    return InProcessServer(server, generator, recorder, loop, f"127.0.0.1:{port}", thread)


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[..., InProcessServer]]:
    started: list[InProcessServer] = []

    def factory(generator=None, **config_kwargs) -> InProcessServer:
        srv = start_in_process_server(generator, **config_kwargs)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        try:
            srv.stop()
        except Exception:  # already stopped by the test
            pass


@pytest.fixture
def fake_server(fake_server_factory) -> InProcessServer:
    return fake_server_factory()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---- the real server, one per session -----------------------------------------------------------

@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    ready_line: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server_process(tmp_dir: Path, *extra_args: str, auth: bool = True,
                         ready_timeout: float = 300.0) -> ServerProcess:
    """`prefloop serve --port 0 ...` as a subprocess; returns once its ready line is printed."""
    args = [sys.executable, "-m", "prefloop.cli", "serve", "--port", "0",
            "--data-dir", str(tmp_dir / "data"), *extra_args]
    if "--dtype" not in extra_args:
        args += ["--dtype", "float32"]  # the float32 the tests compare against (default: auto)
    if "--votes-per-minute" not in extra_args:  # the tests' clients vote as fast as they can
        args += ["--votes-per-minute", "0", "--token-votes-per-minute", "0"]
    if "--http-port" not in extra_args:
        args += ["--http-port", "0"]  # HTTP off unless a test asks for it (8000 may be taken)
    if auth:
        tokens = tmp_dir / "tokens.txt"
        tokens.write_text(f"# test tokens\nuser {USER_TOKEN}\nadmin {ADMIN_TOKEN}\n")
        args += ["--auth-tokens", str(tokens)]
    log_path = tmp_dir / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True)
    deadline = time.monotonic() + ready_timeout
    assert proc.stdout is not None
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # exited
        if "listening on" in line:
            address = line.split("listening on", 1)[1].split()[0]
            return ServerProcess(proc, address, line.strip(), log_path)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def real_server(tmp_path_factory) -> Iterator[ServerProcess]:
    srv = start_server_process(tmp_path_factory.mktemp("real-server"),
                               "--max-n", "4", "--max-message-bytes", "65536",
                               "--max-prompt-tokens", "1024", "--max-tokens-limit", "512",
                               "--grace", "10")
    yield srv
    srv.terminate()
