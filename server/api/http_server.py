"""Runs the HTTP app with uvicorn inside the gRPC server's event loop (no signal handlers of its
own: `PrefloopServer` owns SIGTERM/SIGINT and stops both fronts).

The socket is bound here, before uvicorn starts, so a port in use is an OSError the caller reports
in one line (uvicorn itself would exit the process).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gRPC server handles signals for both
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError when taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServer:
    def __init__(self, app, sock: socket.socket, *, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=None)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting; streams in flight get `grace` seconds, then are closed."""
        if self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(grace, 0.5)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5)
        if not self._task.done():
            self._server.force_exit = True
            self._task.cancel()
        self._task = None
