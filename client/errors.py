"""The client's exceptions, and the one place that maps gRPC status codes onto them.

Modelled on httpx's `_exceptions.py`: a shallow hierarchy that callers can catch broadly (`InferenceError`) or
narrowly (`ModelNotFoundError`), with the gRPC status and the server's own message kept on every instance so nothing
the server said is lost in translation.
"""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A request failed; `.code` is the gRPC status and `.message` the server's (or client's) explanation."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code: grpc.StatusCode = code
        self.message: str = message


class ModelNotFoundError(InferenceError):
    """The server does not know the model or the requested version (NOT_FOUND)."""


class InvalidInputError(InferenceError):
    """The request does not fit the model: names, datatypes or shapes (INVALID_ARGUMENT)."""


class ServerOverloadedError(InferenceError):
    """The server rejected the request because its queue is full; back off and retry (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(InferenceError):
    """The call's deadline passed before the server answered (DEADLINE_EXCEEDED)."""


class ServerUnavailableError(InferenceError):
    """No server could be reached, or it is shutting down (UNAVAILABLE)."""


_BY_CODE: dict[grpc.StatusCode, type[InferenceError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerOverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
}


def error_for(code: grpc.StatusCode, message: str) -> InferenceError:
    """The exception class for a status code; codes without their own class give the base `InferenceError`."""
    return _BY_CODE.get(code, InferenceError)(message, code)


def from_rpc_error(error: grpc.RpcError) -> InferenceError:
    """Translate a sync or asyncio gRPC failure (both are `grpc.Call`s) into the client's hierarchy."""
    code = error.code() if callable(getattr(error, "code", None)) else None  # type: ignore[attr-defined]
    details = error.details() if callable(getattr(error, "details", None)) else None  # type: ignore[attr-defined]
    return error_for(code or grpc.StatusCode.UNKNOWN, details or str(error))
