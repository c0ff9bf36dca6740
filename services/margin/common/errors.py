"""Domain errors. Cores raise these; the service interceptor maps each to one gRPC status code.

The core never imports grpc: the mapping lives in :mod:`margin.common.interceptor`.
"""
from __future__ import annotations


class MarginError(Exception):
    """Base of every error a user is meant to read. ``str(err)`` is the message sent to the caller."""

    code_name = "UNKNOWN"


class InvalidArgument(MarginError):
    code_name = "INVALID_ARGUMENT"


class NotFound(MarginError):
    """Also used for another tenant's objects, so existence never leaks."""

    code_name = "NOT_FOUND"


class AlreadyExists(MarginError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(MarginError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(MarginError):
    """Quota, rate limit or budget. ``retry_after_s`` is sent as trailing metadata when set."""

    code_name = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(MarginError):
    code_name = "UNAUTHENTICATED"


class PermissionDenied(MarginError):
    code_name = "PERMISSION_DENIED"


class Unavailable(MarginError):
    """A dependency is down or not ready yet. ``retry_after_s`` (e.g. a cold start in progress) is sent as trailing
    metadata when set."""

    code_name = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unimplemented(MarginError):
    code_name = "UNIMPLEMENTED"
