"""The one place where the core's domain errors become protocol status codes: gRPC codes and HTTP statuses.

The core (`nnserve.server.dataplane` and below) raises `ServingError` subclasses and never imports a protocol;
each frontend looks its answer up here, most specific class first.
"""

from __future__ import annotations

from http import HTTPStatus

import grpc

from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    RepositoryControlError,
    RequestCancelledError,
    RequestTooLargeError,
    ServerUnavailableError,
    ServingError,
)

GRPC_STATUS: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,  # a full queue, and OverBudgetError (its subclass)
    RequestTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestCancelledError: grpc.StatusCode.CANCELLED,
    ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    RepositoryControlError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ExecutionError: grpc.StatusCode.INTERNAL,
}

CLIENT_CLOSED_REQUEST = 499
"""What the client that went away would get, were it there (nginx's and Google's mapping of CANCELLED)."""

HTTP_STATUS: dict[type[ServingError], int] = {
    ModelNotFoundError: HTTPStatus.NOT_FOUND,
    ModelNotReadyError: HTTPStatus.SERVICE_UNAVAILABLE,
    InvalidInputError: HTTPStatus.BAD_REQUEST,
    # 429 rather than Triton's 503: the client sent too much too fast, the server is healthy, and HTTP clients
    # and proxies treat 429 + Retry-After as "back off and retry", while a 503 may take the replica out of rotation.
    QueueFullError: HTTPStatus.TOO_MANY_REQUESTS,  # and OverBudgetError: the same back-off, Retry-After included
    # Larger than the whole in-flight budget: never acceptable, like a body over --max-message-bytes.
    RequestTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    DeadlineExpiredError: HTTPStatus.GATEWAY_TIMEOUT,
    RequestCancelledError: CLIENT_CLOSED_REQUEST,
    ServerUnavailableError: HTTPStatus.SERVICE_UNAVAILABLE,
    # gRPC's FAILED_PRECONDITION: the request is fine, the server's state refuses it (as Triton answers: 400).
    RepositoryControlError: HTTPStatus.BAD_REQUEST,
    ModelLoadError: HTTPStatus.BAD_REQUEST,
    ExecutionError: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def grpc_status(exc: ServingError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = GRPC_STATUS.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def http_status(exc: ServingError) -> int:
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)  # type: ignore[call-overload]
        if status is not None:
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR
