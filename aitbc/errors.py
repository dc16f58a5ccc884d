"""Domain errors. Domain code raises these; one interceptor maps them to a gRPC
status with google.rpc.ErrorInfo, so domain modules never import grpc.

`code` is the canonical gRPC code name; `reason` is the UPPER_SNAKE_CASE
ErrorInfo reason a client can branch on.
"""

from __future__ import annotations

from collections.abc import Mapping

DOMAIN = "aitbc.dev"


class AitbcError(Exception):
    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.field = field
        self.metadata = dict(metadata or {})
        if field is not None:
            self.metadata.setdefault("field", field)


class InvalidArgument(AitbcError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class FailedPrecondition(AitbcError):
    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class NotFound(AitbcError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(AitbcError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class PermissionDenied(AitbcError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Unauthenticated(AitbcError):
    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class ResourceExhausted(AitbcError):
    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float = 0.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        # Sent as google.rpc.RetryInfo: when the caller may try again.
        self.retry_after = retry_after


class Unavailable(AitbcError):
    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float = 0.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        # Sent as google.rpc.RetryInfo when set: when to try again.
        self.retry_after = retry_after
