"""Optional bearer-token authentication in two roles, as a grpc.aio server interceptor.

Clients send `authorization: Bearer <token>` metadata. A *user* token may call Generation, Feedback
and the read RPCs of Models (`USER_METHODS`); an *admin* token may call everything. Every other
prefloop RPC (Models' write RPCs, GetEngineStats, anything added later) is admin-only unless listed,
so new RPCs are closed by default. Health checks and server reflection need no token.

Tokens come from a file (`--auth-tokens FILE`: one `<role> <token>` per line, `#` comments) and/or
the env vars PREFLOOP_USER_TOKENS / PREFLOOP_ADMIN_TOKENS (comma-separated). With no token
configured, authentication is off. Tokens are compared in constant time and never logged: rejected
calls are logged with their method and status only.
"""
from __future__ import annotations

import enum
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping

import grpc

log = logging.getLogger("prefloop.server.access")

USER_TOKENS_ENV = "PREFLOOP_USER_TOKENS"
ADMIN_TOKENS_ENV = "PREFLOOP_ADMIN_TOKENS"

# Services and methods a user token may call; everything else under prefloop.* needs admin.
USER_SERVICES = ("/prefloop.v1.Generation/", "/prefloop.v1.Feedback/")
USER_METHODS = frozenset({"/prefloop.v1.Models/GetModelInfo"})
# Services that need no token at all.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Role(enum.IntEnum):
    USER = 1
    ADMIN = 2


def required_role(method: str) -> Role | None:
    """The role a full method name ("/pkg.Service/Method") needs; None for open services."""
    if method.startswith(OPEN_SERVICES):
        return None
    if method.startswith(USER_SERVICES) or method in USER_METHODS:
        return Role.USER
    return Role.ADMIN


@dataclass(slots=True)
class AuthConfig:
    """The configured tokens (secrets: the repr hides them)."""

    user_tokens: tuple[str, ...] = field(default=(), repr=False)
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.user_tokens = tuple(self.user_tokens)
        self.admin_tokens = tuple(self.admin_tokens)
        for token in self.user_tokens + self.admin_tokens:
            if not token or any(c.isspace() for c in token):
                raise ValueError("auth tokens must be non-empty and contain no whitespace")

    @property
    def enabled(self) -> bool:
        return bool(self.user_tokens or self.admin_tokens)

    def role_of(self, token: str) -> Role | None:
        """The role of a presented token (constant-time comparison), None if unknown."""
        role = None
        for candidate in self.admin_tokens:
            if hmac.compare_digest(candidate.encode(), token.encode()):
                role = Role.ADMIN
        if role is None:
            for candidate in self.user_tokens:
                if hmac.compare_digest(candidate.encode(), token.encode()):
                    role = Role.USER
        return role

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             environ: Mapping[str, str] | None = None) -> "AuthConfig":
        """Tokens from the file (if given) plus the PREFLOOP_*_TOKENS env vars."""
        environ = os.environ if environ is None else environ
        user = [t.strip() for t in environ.get(USER_TOKENS_ENV, "").split(",") if t.strip()]
        admin = [t.strip() for t in environ.get(ADMIN_TOKENS_ENV, "").split(",") if t.strip()]
        if path is not None:
            for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or parts[0] not in ("user", "admin"):
                    # The message names the line, never its content (it holds a secret).
                    raise ValueError(f"{path}:{lineno}: expected '<user|admin> <token>'")
                (admin if parts[0] == "admin" else user).append(parts[1])
        return cls(user_tokens=tuple(user), admin_tokens=tuple(admin))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry of gRPC metadata (or of HTTP
    headers' items), if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                       details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails the call with (code, details)."""

    async def abort_unary(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)

    async def abort_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator (never reached)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid token for the method's role (see `required_role`)."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    def check(self, method: str, metadata: tuple | None) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may proceed, else the (status, message) to fail it with."""
        needed = required_role(method)
        if needed is None or not self.config.enabled:
            return None
        token = bearer_token(metadata)
        if token is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "missing bearer token: send metadata 'authorization: Bearer <token>'")
        role = self.config.role_of(token)
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        if role < needed:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs an admin token; this token has the user role")
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        failure = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if failure is None:
            return handler
        code, details = failure
        log.info(json.dumps({"event": "request", "method": handler_call_details.method,
                             "status": code.name, "reason": details}))
        return _rejecting_handler(handler, code, details)
