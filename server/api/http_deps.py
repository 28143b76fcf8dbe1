"""What the HTTP routers share: `HttpContext` (the runner, auth, metrics, feedback store, switcher,
A/B controller, data dir and the shutdown state of one server), reached by every route through the
`context` dependency (`ctx: Ctx` in a route's parameters), and the helpers every router needs:
the caller's role from its bearer token, the JSON body, the OpenAI error body. One context per app (`app.state.prefloop`), so two apps in
one process never share state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from prefloop.server.api import openai_compat as oa
from prefloop.server.api.auth import AuthConfig, Role
from prefloop.server.api.completions import CompletionRunner
from prefloop.server.api.metrics import Metrics
from prefloop.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)


def json_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """OpenAI's error body with `status` (the `openai` SDK raises its own exception for it)."""
    return JSONResponse(oa.error_body(status, message, code), status_code=status)


async def json_body(request: Request) -> Any:
    """The parsed JSON body (None when empty); InvalidArgument when it is not JSON."""
    raw = await request.body()
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class HttpContext:
    """One server's shared state as the HTTP routes see it. `state["draining"]` (set at shutdown)
    turns /health to 503."""

    runner: CompletionRunner
    auth: AuthConfig
    metrics: Metrics
    store: Any = None  # FeedbackStore
    switcher: Any = None  # ModelSwitcher
    data_dir: Path | None = None
    state: dict = field(default_factory=dict)
    ab: Any = None  # ABController

    @property
    def generator(self):
        return self.runner.generator

    def role_of(self, request: Request) -> Role:
        """The caller's role (ADMIN when auth is off); Unauthenticated for a missing/bad token."""
        if not self.auth.enabled:
            return Role.ADMIN
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
        role = self.auth.role_of(token.strip())
        if role is None:
            raise Unauthenticated("invalid token")
        return role

    def require(self, request: Request, needed: Role) -> Role:
        role = self.role_of(request)
        if role < needed:
            raise PermissionDenied("this route needs an admin token")
        return role

    def feedback_store(self):
        if self.store is None:
            raise FailedPrecondition("this server keeps no feedback log")
        return self.store

    def registry_switcher(self):
        if self.switcher is None:
            raise FailedPrecondition("this server has no model registry (--data-dir with registry/)")
        return self.switcher

    def ab_controller(self):
        if self.ab is None:
            raise FailedPrecondition("this server runs no A/B tests (it has no model registry)")
        return self.ab


def context(request: Request) -> HttpContext:
    """The FastAPI dependency every route takes: its app's `HttpContext`."""
    return request.app.state.prefloop


Ctx = Annotated[HttpContext, Depends(context)]  # a route's parameter `ctx: Ctx`
