"""Domain errors with a reason; the gRPC interceptor maps each to its status code."""

from __future__ import annotations

import grpc


class FlywheelError(Exception):
    """An error a client can act on; its message is sent back as the status details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FlywheelError):
    """The request is malformed or out of bounds."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FlywheelError):
    """The thing asked for does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(FlywheelError):
    """Not ready, or a dependency is down; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(FlywheelError):
    """Overloaded or over a quota; the client may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(FlywheelError):
    """The system is not in a state that allows the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(FlywheelError):
    """No valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FlywheelError):
    """Valid credentials without the role the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(FlywheelError):
    """The client's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
