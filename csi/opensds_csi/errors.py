"""The one place where internal failures become gRPC status codes (CSI spec semantics)."""
from __future__ import annotations

import socket

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from opensds_operator.hosttools import missing_tool_message, package_of


class CsiError(Exception):
    """An error with the gRPC status code the CSI spec prescribes for it."""

    code_name = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CsiError):
    code_name = "INVALID_ARGUMENT"


class NotFound(CsiError):
    code_name = "NOT_FOUND"


class AlreadyExists(CsiError):
    code_name = "ALREADY_EXISTS"


class OutOfRange(CsiError):
    code_name = "OUT_OF_RANGE"


class Aborted(CsiError):
    """Another operation on the same volume id is in flight (the caller retries)."""

    code_name = "ABORTED"


class ResourceExhausted(CsiError):
    code_name = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CsiError):
    code_name = "FAILED_PRECONDITION"


class ToolMissing(FailedPrecondition):
    """A host tool the node needs is not installed: the message names the Debian package to install."""

    def __init__(self, tool: str) -> None:
        super().__init__(missing_tool_message(tool))
        self.tool = tool


class Unavailable(CsiError):
    code_name = "UNAVAILABLE"


class DeadlineExceeded(CsiError):
    """The backend work goes on; the CO retries the (idempotent) call and finds it done."""

    code_name = "DEADLINE_EXCEEDED"


class Unimplemented(CsiError):
    code_name = "UNIMPLEMENTED"


class PermissionDenied(CsiError):
    """The plugin's own credentials may not do this (RBAC): a deployment to fix, not a caller's mistake."""

    code_name = "PERMISSION_DENIED"


class Unauthenticated(CsiError):
    code_name = "UNAUTHENTICATED"


# API answers -> what the CSI caller should do: retry (UNAVAILABLE/ABORTED/DEADLINE), fix the
# request (INVALID_ARGUMENT) or fix the deployment (PERMISSION_DENIED/UNAUTHENTICATED).
_API_STATUS: dict[int, type[CsiError]] = {
    400: InvalidArgument, 401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 409: Aborted,
    410: Aborted, 422: InvalidArgument, 429: Unavailable, 504: DeadlineExceeded,
}


def csi_error(error: Exception) -> CsiError:
    """The CsiError an exception means to a CSI caller; INTERNAL only for what we did not foresee."""
    if isinstance(error, CsiError):
        return error
    if isinstance(error, ApiException):
        status = error.status or 0  # 0: no HTTP answer at all (the client's own failure)
        kind = _API_STATUS.get(status) or (Unavailable if status >= 500 or status == 0 else CsiError)
        return kind(f"Kubernetes API: {status} {error.reason}")
    if isinstance(error, FileNotFoundError) and error.filename and package_of(str(error.filename)):
        return ToolMissing(str(error.filename))  # a tool started outside run.run()
    if isinstance(error, (HTTPError, socket.timeout, TimeoutError, ConnectionError)):
        return Unavailable(f"Kubernetes API unreachable: {type(error).__name__}: {error}")
    return CsiError(f"internal error: {type(error).__name__}: {error}")
