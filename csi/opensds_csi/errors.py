"""The one place where internal failures become gRPC status codes (CSI spec semantics)."""
from __future__ import annotations


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


class Unavailable(CsiError):
    code_name = "UNAVAILABLE"


class DeadlineExceeded(CsiError):
    """The backend work goes on; the CO retries the (idempotent) call and finds it done."""

    code_name = "DEADLINE_EXCEEDED"


class Unimplemented(CsiError):
    code_name = "UNIMPLEMENTED"
