"""Typed errors raised for user-facing failures.

Each class names the gRPC status it maps to; the one mapping lives in the gRPC layer
(`STATUS_OF`), so domain code never imports grpc. `assert` is only for internal invariants.
"""
from __future__ import annotations


class PrefloopError(Exception):
    """Base class: a failure the user can act on. `code` is the gRPC status name."""

    code = "INTERNAL"


class InvalidArgument(PrefloopError):
    code = "INVALID_ARGUMENT"


class NotFound(PrefloopError):
    code = "NOT_FOUND"


class ResourceExhausted(PrefloopError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(PrefloopError):
    code = "UNAUTHENTICATED"


class PermissionDenied(PrefloopError):
    code = "PERMISSION_DENIED"


class Unavailable(PrefloopError):
    code = "UNAVAILABLE"


class FailedPrecondition(PrefloopError):
    code = "FAILED_PRECONDITION"


class UnsupportedModel(InvalidArgument):
    """A model path that is not a supported Llama-family checkpoint."""
