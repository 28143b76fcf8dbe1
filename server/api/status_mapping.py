"""The one mapping from prefloop's typed errors (`server/errors.py`) to gRPC and HTTP statuses.

Servicers never choose status codes themselves: they raise `errors.*` (or let the domain raise
them) and `map_errors` turns them into a status with the error's message. Any other exception
fails only the request that raised it, as INTERNAL with the request id, and is logged with its
traceback. Cancellation (`asyncio.CancelledError`) and aborts already sent pass through.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from prefloop.server import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[str, grpc.StatusCode] = {
    code.name: code for code in grpc.StatusCode
}  # "INVALID_ARGUMENT" -> grpc.StatusCode.INVALID_ARGUMENT, for every PrefloopError.code


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception: the typed error's code, INTERNAL for anything else."""
    if isinstance(exc, errors.PrefloopError):
        return STATUS_OF.get(exc.code, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


HTTP_STATUS: dict[str, int] = {  # gRPC status name -> HTTP status (the HTTP API's errors)
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500,
}


def http_status_of(exc: BaseException) -> int:
    """The HTTP status for an exception, through the same typed-error codes as gRPC."""
    return HTTP_STATUS.get(status_of(exc).name, 500)


def details_of(exc: BaseException, request_id: str | None = None) -> str:
    """The message sent to the client: the typed error's text; nothing internal otherwise."""
    if isinstance(exc, errors.PrefloopError):
        return str(exc) or type(exc).__name__
    suffix = f" (request id {request_id})" if request_id else ""
    return f"internal error{suffix}; the server log has the details"


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException,
                    request_id: str | None = None) -> None:
    """Abort the RPC with the status for `exc` (raises grpc's AbortError, ending the handler)."""
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request %s failed: %s", request_id or "-", exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
    await context.abort(code, details_of(exc, request_id))


# The id of the request being served by the current task; servicers set it once they make one.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "prefloop_request_id", default=None)


def map_errors(method: Callable) -> Callable:
    """Decorate a servicer method (coroutine or async generator) so that errors become statuses.

    The servicer sets `current_request_id` so that an INTERNAL status names the request.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context) -> AsyncIterator[Any]:
            current_request_id.set(None)
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
                await abort_for(context, exc, current_request_id.get())

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context) -> Awaitable[Any]:
        current_request_id.set(None)
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
            await abort_for(context, exc, current_request_id.get())

    return unary_wrapper
