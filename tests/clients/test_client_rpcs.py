"""The two Python clients offer the same RPCs: every public RPC method of `Client` has an
`AsyncClient` counterpart with the same signature (and the reverse), each RPC of the shared table
is exposed by both, and the asyncio client's A/B calls work against an in-process server (fake
engines, a real registry, an `ABController`)."""
from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from ab_helpers import VersionedFake, two_versions
from conftest import ADMIN_TOKEN, USER_TOKEN, InProcessServer, RecordingRecorder

from prefloop.clients import AsyncClient, Client, errors
from prefloop.clients.client import _Rpcs
from prefloop.server.ab import state as ab_state
from prefloop.server.api.ab_controller import ABController
from prefloop.server.api.auth import AuthConfig
from prefloop.server.api.grpc_server import PrefloopServer, ServerConfig
from prefloop.server.serving.ab_router import ABRouter

LIFECYCLE = {"close", "aclose"}  # the one pair that differs by design (blocking vs awaited)
STREAMS = {"generate_stream", "chat_stream"}  # plain methods in both: (async) iterators


def rpc_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and name not in LIFECYCLE and callable(member)}


def test_every_rpc_method_has_a_counterpart_with_the_same_signature():
    sync, aio = rpc_methods(Client), rpc_methods(AsyncClient)
    assert sorted(sync) == sorted(aio), "one client lacks RPCs the other has"
    assert {"ab_start", "ab_status", "ab_stop", "chat", "chat_stream", "submit_rating"} <= set(sync)
    for name, signature in sync.items():
        assert aio[name] == signature, f"{name}: Client{signature} != AsyncClient{aio[name]}"
        awaited = inspect.iscoroutinefunction(getattr(AsyncClient, name))
        assert awaited == (name not in STREAMS), name  # unary RPCs are awaited, streams iterated
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name
        assert "_Call" not in str(signature.return_annotation), name  # the real return type


def test_every_rpc_of_the_shared_table_is_a_public_method_of_both_clients():
    table = {name for name, _ in inspect.getmembers(_Rpcs, inspect.isfunction)
             if not name.startswith("_")}
    assert table == set(rpc_methods(Client)) == set(rpc_methods(AsyncClient))


# ---- the asyncio client's A/B calls against an in-process server -------------------------------

@pytest.fixture
def ab_grpc_server(tmp_path):
    """gRPC only, user/admin tokens; yields (server, registry, candidate version)."""
    registry, v1 = two_versions(tmp_path)
    control = VersionedFake("v0000", "ctrl")
    router = ABRouter(control, registry.version_dir)
    controller = ABController(registry, router, tmp_path / "data", poll_s=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-ab-grpc", daemon=True)
    thread.start()
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "data",
                          auth=AuthConfig(user_tokens=(USER_TOKEN,), admin_tokens=(ADMIN_TOKEN,)))
    recorder = RecordingRecorder()

    async def build():  # the grpc.aio server must be created on its own loop
        server = PrefloopServer(control, config, recorder=recorder, router=router, ab=controller)
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    srv = InProcessServer(server, control, recorder, loop, f"127.0.0.1:{port}", thread)
    yield srv, registry, v1
    srv.call(controller.close())
    srv.stop()


def test_async_client_starts_reads_and_stops_an_ab_test(ab_grpc_server):
    srv, registry, v1 = ab_grpc_server

    async def scenario():
        async with AsyncClient(srv.target, token=ADMIN_TOKEN, timeout=30) as admin:
            before = await admin.ab_status()
            started = await admin.ab_start(v1, traffic=0.5, min_votes=10, sticky="session",
                                           futility_win=0.7, force=True)
            status = await admin.ab_status()
            stopped = await admin.ab_stop("reject", reason="not better")
            with pytest.raises(errors.NotFound):
                await admin.ab_stop()  # none running any more
            again = await admin.ab_start(v1, force=True)  # unset options: the server's defaults
            await admin.ab_stop()
        async with AsyncClient(srv.target, token=USER_TOKEN, timeout=30) as user:
            with pytest.raises(errors.PermissionDenied):
                await user.ab_status()  # admin only
        return before, started, status, stopped, again

    before, started, status, stopped, again = asyncio.run(scenario())
    assert before == {"running": False}
    assert started["running"] and started["candidate"] == v1 and started["control"] == "v0000"
    assert (started["traffic"], started["min_votes"], started["sticky"], started["futility_win"]) \
        == (0.5, 10, "session", 0.7)
    assert status["running"] and status["candidate"] == v1
    assert (status["wins"], status["losses"]) == (0, 0)
    assert not stopped["running"] and stopped["status"] == ab_state.REJECTED
    assert "not better" in stopped["reason"]
    defaults = ab_state.ABState(candidate=v1, control="v0000")
    assert (again["traffic"], again["min_votes"], again["sticky"], again["futility_win"]) == (
        defaults.traffic, defaults.min_votes, defaults.sticky, None)
    assert registry.current() == "v0000"
    assert ab_state.read_state(registry).status == ab_state.STOPPED


def test_async_and_blocking_clients_read_the_same_ab_status(ab_grpc_server):
    srv, _, v1 = ab_grpc_server
    with Client(srv.target, token=ADMIN_TOKEN, timeout=30) as admin:
        admin.ab_start(v1, force=True)
        blocking = admin.ab_status()

    async def read():
        async with AsyncClient(srv.target, token=ADMIN_TOKEN, timeout=30) as admin:
            return await admin.ab_status()

    assert asyncio.run(read()) == blocking and blocking["running"]
