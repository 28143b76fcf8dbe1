"""The HTTP API (FastAPI): OpenAI-compatible routes, feedback routes, admin routes, health,
Prometheus metrics and the web page — one ASGI app beside the gRPC server, same process and loop.

It shares everything with gRPC: the `CompletionRunner` (limits, defaults, admission, generation
log, metrics), the `FeedbackStore` (same validation and durability: a 2xx means fsync'd), the
`ModelSwitcher` (registry, hot-swap) and the bearer tokens (`Authorization: Bearer`; user routes
need a user or admin token, /v1/admin/* an admin token; /health, /metrics and the page are open).
Typed errors become HTTP statuses in `status_mapping.http_status_of`, with OpenAI's error body,
so the `openai` SDK raises its own exceptions. Bodies over `--max-message-bytes` get 413 before
they are read. A client that disconnects aborts its request in the engine.

This module assembles the app: the two ASGI middlewares, the error handlers and the routers —
http_openai.py (generation, models, whoami), http_feedback.py, http_admin.py and http_web.py
(health, metrics, the page) — which share one `HttpContext` (http_deps.py) as a dependency.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request

from prefloop.server.api import http_admin, http_feedback, http_openai, http_web
from prefloop.server.api.auth import AuthConfig
from prefloop.server.api.completions import CompletionRunner
from prefloop.server.api.http_deps import HttpContext, json_error
from prefloop.server.api.metrics import Metrics
from prefloop.server.api.status_mapping import details_of, http_status_of
from prefloop.server.errors import PrefloopError

log = logging.getLogger(__name__)


class LimitBody:
    """ASGI middleware: 413 for a body over `max_bytes`, before the app reads it (Content-Length
    checked first; a chunked body is read here, up to the limit, and then handed on)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._refuse(scope, receive, send, f"has {int(length)} bytes")
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:  # no length given: read the chunks here, counting
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(scope, receive, send, f"exceeds {self.max_bytes} bytes")
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, what: str):
        response = json_error(413, f"the request body {what}; the server limit is "
                                    f"{self.max_bytes} bytes (--max-message-bytes)")
        return await response(scope, receive, send)


class CountRequests:
    """ASGI middleware: every HTTP request counted by route and status in the metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = f"{scope['method']} {path if path.startswith('/v1/') else 'other'}"
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels("http", route, str(status)).inc()


class NameReplica:
    """ASGI middleware: on a replica (`state["replica"]`), every response names it in an
    `X-Prefloop-Replica` header — which server behind the balancer answered."""

    def __init__(self, app, state: dict) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        replica = self.state.get("replica")
        if scope["type"] != "http" or not replica:
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-prefloop-replica", replica.encode())]
            await send(message)

        await self.app(scope, receive, send_named)


def build_http_app(runner: CompletionRunner, *, auth: AuthConfig, metrics: Metrics,
                   max_body_bytes: int, store=None, switcher=None, data_dir: Path | None = None,
                   state: dict | None = None, ab=None) -> FastAPI:
    """The ASGI app. `state["draining"]` (set at shutdown) turns /health to 503;
    `state["replica"]` names the replica in every response."""
    app = FastAPI(title="prefloop", docs_url="/docs", redoc_url=None)
    state = state if state is not None else {}
    app.state.prefloop = HttpContext(runner, auth, metrics, store=store, switcher=switcher,
                                     data_dir=data_dir, state=state, ab=ab)

    @app.exception_handler(PrefloopError)
    async def typed_error(request: Request, exc: PrefloopError):
        return json_error(http_status_of(exc), details_of(exc), exc.code.lower())

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return json_error(500, details_of(exc, getattr(request.state, "request_id", None)))

    app.include_router(http_openai.router)
    app.include_router(http_feedback.router)
    app.include_router(http_admin.router)
    http_web.add_web(app)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(NameReplica, state=state)
    return app
