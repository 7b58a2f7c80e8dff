"""Requests that are not valid protobuf get INVALID_ARGUMENT, not grpc's UNKNOWN and an ERROR traceback each.

Without a guard, grpc.aio answers a request whose bytes do not parse with UNKNOWN ("Unexpected <class
DecodeError>") and logs a traceback at ERROR, which anyone could use to flood the log. `GuardedRegistrar` stands in
for the server while the services register and wraps every method handler once: a deserializer that never raises
and a behaviour that refuses what did not parse. Wrapping at registration (instead of in an interceptor) keeps the
per-call cost to one `isinstance` check and keeps grpc's registered-method fast path, which finds handlers in C.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

Handler = Any  # grpc.RpcMethodHandler (a namedtuple in grpc's implementation)


class GuardedRegistrar:
    """Pass it where generated `add_..._to_server(servicer, server)` functions expect the server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(handler) for handler in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        guarded = {name: guard_decoding(handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose handlers are guarded (each wrapped once, on its first call)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded[method] = (handler, guard_decoding(handler))
        return cached[1]


class _Undecodable:
    """Stands in for a request message that did not parse, so the handler can answer INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def guard_decoding(handler: Handler) -> Handler:
    """The handler with a deserializer that never raises and a behaviour that refuses what did not parse."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler

    def safe_deserialize(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary"
    )
    behavior = getattr(handler, kind)
    guard = _guard_stream_requests if handler.request_streaming else _guard_unary_request
    wrapped = guard(behavior)
    if wrapped is None:
        return handler  # a synchronous behaviour: left as grpc runs it
    return handler._replace(request_deserializer=safe_deserialize, **{kind: wrapped})


def _refusal(request: _Undecodable) -> str:
    return f"the request is not a valid protobuf message of this method's request type ({request.reason})"


def _guard_unary_request(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            async for response in behavior(request, context):
                yield response

        return guarded_stream
    if inspect.iscoroutinefunction(behavior):

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            return await behavior(request, context)

        return guarded
    return None


def _guard_stream_requests(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request))
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response

        return guarded_stream
    if inspect.iscoroutinefunction(behavior):

        async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(checked(requests, context), context)

        return guarded
    return None
