"""Typed client exceptions, one per gRPC status a prefloop server returns.

`error_from_rpc(rpc_error)` converts a grpc.RpcError; catch `ClientError` for all of them, or a
subclass (e.g. `InvalidArgument`) for one. `code` is the status name, `details` the server's
message (meant for the user).
"""
from __future__ import annotations

import grpc


class ClientError(Exception):
    """A failed call. `code`: gRPC status name; `details`: the server's message."""

    code = "UNKNOWN"

    def __init__(self, details: str = "", code: str | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.details}" if self.details else self.code


class InvalidArgument(ClientError):
    code = "INVALID_ARGUMENT"


class NotFound(ClientError):
    code = "NOT_FOUND"


class ResourceExhausted(ClientError):
    """The server is busy or the request is too large; retrying later may help."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ClientError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ClientError):
    code = "PERMISSION_DENIED"


class Unavailable(ClientError):
    """The server is down, unreachable or shutting down; retrying may help."""

    code = "UNAVAILABLE"


class FailedPrecondition(ClientError):
    code = "FAILED_PRECONDITION"


class DeadlineExceeded(ClientError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ClientError):
    code = "CANCELLED"


class Unimplemented(ClientError):
    code = "UNIMPLEMENTED"


class InternalError(ClientError):
    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_from_rpc(error: grpc.RpcError) -> ClientError:
    """The typed exception for a grpc.RpcError (ClientError with the code for unlisted ones)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ClientError(details, code=code.name if code is not None else "UNKNOWN")
    return cls(details)
