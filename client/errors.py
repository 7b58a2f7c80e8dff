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
    """The server rejected the request because its queue or its in-flight memory budget is full; back off and retry
    (RESOURCE_EXHAUSTED). Also a message over a size limit, or a request larger than the whole budget: those never
    succeed as sent (the message says which), and the SDK does not retry them."""


class DeadlineExceededError(InferenceError):
    """The call's deadline passed before the server answered (DEADLINE_EXCEEDED)."""


class ServerUnavailableError(InferenceError):
    """No server could be reached, or it is shutting down (UNAVAILABLE)."""


class ServerNotReadyError(DeadlineExceededError):
    """`wait_until_ready` ran out of time; `.not_ready` maps what was not ready ("" for the server, else a model
    name) to what was last seen of it."""

    def __init__(self, message: str, not_ready: dict[str, str]) -> None:
        super().__init__(message, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.not_ready: dict[str, str] = not_ready


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


def from_rpc_error(error: grpc.RpcError, *, tls: bool | None = None) -> InferenceError:
    """Translate a sync or asyncio gRPC failure (both are `grpc.Call`s) into the client's hierarchy.

    `tls` says whether the channel used TLS: a failed connection then gets a hint when the likely cause is a TLS
    mismatch, which gRPC reports only as "Socket closed" or a handshake failure.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None  # type: ignore[attr-defined]
    details = error.details() if callable(getattr(error, "details", None)) else None  # type: ignore[attr-defined]
    code = code or grpc.StatusCode.UNKNOWN
    message = details or str(error)
    if code == grpc.StatusCode.UNAVAILABLE and tls is not None:
        message += connection_hint(message, tls)
    return error_for(code, message)


def connection_hint(message: str, tls: bool) -> str:
    """A sentence to append when a connection failure looks like a TLS mismatch ("" otherwise)."""
    lowered = message.lower()
    if not tls and "socket closed" in lowered:
        return (" (the server closed the connection at once: if it serves TLS, connect with tls=True or "
                "root_certificates=..., and a client certificate if it requires mutual TLS)")
    if tls and ("handshake" in lowered or "ssl" in lowered or "wrong_version_number" in lowered):
        return (" (the TLS handshake failed: the server may serve plaintext (connect without TLS), or its "
                "certificate is not signed by root_certificates or does not name this host (tls_server_name), "
                "or it requires a client certificate)")
    return ""
