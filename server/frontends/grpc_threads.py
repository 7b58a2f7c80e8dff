"""The threaded gRPC transport: grpc's synchronous thread-pool server in front of the same asyncio services.

`ThreadedServer` has the part of `grpc.aio.Server`'s surface the server is built with (handler registration, ports,
start, stop), so everything registered on it is the same grpc.aio code as on the default transport: the
GRPCInferenceService servicer, the decoding guard, the payload codecs, the token gate, health and reflection. Each
call runs on a thread of grpc's pool and drives its handler's coroutine through a `LoopBridge`: its first step in
that thread while the event loop is parked, the rest (a queued batch, a load, a stream) on the loop. A tiny model's
request thus runs from the socket to the response in one thread, with no hand-off to the loop: what makes a lone
client as fast as on a plain synchronous server (issue 18, README: Performance). Batching, deadlines, cancellation,
limits, statistics and drain are the data plane's, unchanged.

What differs from grpc.aio, and how it is kept the same for the handlers:

* the context: `_AioContext` gives the aio methods (`abort` and `write` as coroutines, `add_done_callback`) over the
  synchronous one; callbacks run on the loop;
* the end of a call: grpc's `add_callback` (the client went away, the deadline passed) cancels the continuation on
  the loop, as grpc.aio cancels the handler's task;
* request streams are read on threads of their own (`stream_readers`) so the loop never blocks on a socket;
* interceptors (the token gate) are grpc.aio interceptors, run when a call's handler is looked up; they must not
  wait (the token gate does not);
* a call holds its pool thread until it is answered, so `threads` bounds the calls inside the server at once
  (beyond it, calls wait for a thread before they reach the batcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from nnserve.server.loop_bridge import BridgeClosedError, LoopBridge, Pending

Handler = Any  # grpc.RpcMethodHandler
_END = object()
_NO_DEADLINE_S = 1e8
"""grpc's synchronous context reports a call without a deadline as (nearly) infinite time remaining; grpc.aio's
says None, which is what the servicer expects."""
_STOPPING = "the server is stopping"


class _CallEnd:
    """Cancels whatever continuation a call is waiting for when the call ends (client gone, deadline passed)."""

    __slots__ = ("_context", "_ended", "_lock", "_pending", "_registered")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._pending: Pending | None = None
        self._registered = False
        self._ended = False
        self._lock = threading.Lock()

    def track(self, pending: Pending) -> None:
        """`LoopBridge.run`'s `on_suspend`: the call now waits for `pending`."""
        with self._lock:
            self._pending = pending
            ended = self._ended
        if not ended and not self._registered:
            self._registered = True  # registered once per call, on its first wait: most calls never wait
            if not self._context.add_callback(self._on_end):
                self._on_end()
        elif ended:
            pending.cancel()

    def _on_end(self) -> None:
        with self._lock:
            self._ended = True
            pending = self._pending
        if pending is not None:
            pending.cancel()


class _AioContext:
    """grpc.aio's ServicerContext methods over grpc's synchronous one (the rest is passed through)."""

    def __init__(self, context: grpc.ServicerContext, bridge: LoopBridge,
                 writes: queue.SimpleQueue[Any] | None = None) -> None:
        self._context = context
        self._bridge = bridge
        self._writes = writes

    def time_remaining(self) -> float | None:
        remaining = self._context.time_remaining()
        return None if remaining is None or remaining > _NO_DEADLINE_S else float(remaining)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()) -> None:
        if trailing_metadata:
            self._context.set_trailing_metadata(tuple(trailing_metadata))
        self._context.abort(code, details)  # raises: grpc answers with this status

    async def write(self, message: Any) -> None:
        if self._writes is None:
            raise RuntimeError("write() is only for response-streaming calls")
        self._writes.put(message)

    async def send_initial_metadata(self, metadata: Sequence[Any]) -> None:
        self._context.send_initial_metadata(tuple(metadata))

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        """Run `callback(self)` on the loop once the call has ended (grpc.aio passes the call)."""
        run = functools.partial(self._bridge.call_soon, functools.partial(callback, self))
        if not self._context.add_callback(run):
            run()

    def done(self) -> bool:
        return not self._context.is_active()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Requests:
    """A synchronous request iterator read as an async one, each message read on a stream-reader thread."""

    def __init__(self, iterator: Iterator[Any], readers: ThreadPoolExecutor) -> None:
        self._iterator = iterator
        self._readers = readers

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        message = await asyncio.get_running_loop().run_in_executor(self._readers, next, self._iterator, _END)
        if message is _END:
            raise StopAsyncIteration
        return message


class ThreadedServer:
    """grpc's synchronous server with grpc.aio handlers bridged onto the serving loop; create it on the loop."""

    def __init__(self, *, threads: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._bridge: LoopBridge | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-call")
        self.stream_readers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-stream")
        self._interceptors = tuple(interceptors)
        self._server = grpc.server(self._pool, options=list(options))
        self._generic: list[grpc.GenericRpcHandler] = []
        self._by_method: dict[str, Handler] = {}
        self._converted: dict[int, tuple[Handler, Handler]] = {}
        self._lookup_registered = False

    # -- registration (what the generated add_..._to_server functions call) ------------------------------------

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)
        if not self._lookup_registered:
            self._lookup_registered = True
            self._server.add_generic_rpc_handlers((_Lookup(self),))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._by_method[f"/{service}/{name}"] = handler
        if not self._interceptors:  # grpc finds these in C; with interceptors every call goes through the lookup
            self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
                service, {name: self.convert(handler) for name, handler in handlers.items()})

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, credentials)

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._bridge = LoopBridge(asyncio.get_running_loop())
        self._server.start()

    async def stop(self, grace: float | None) -> None:
        """grpc's stop: refuse new calls, let running ones finish within `grace`, then cancel them."""
        stopped = self._server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
        if self._bridge is not None:
            self._bridge.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.stream_readers.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self._server.wait_for_termination, timeout)

    # -- handlers ----------------------------------------------------------------------------------------------------

    def find(self, details: grpc.HandlerCallDetails) -> Handler | None:
        """The (grpc.aio) handler of a call, after the interceptors."""
        method: str = details.method  # type: ignore[attr-defined]
        handler = self._by_method.get(method)
        if handler is None:
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    break
        if not self._interceptors:
            return handler

        async def innermost(_details: grpc.HandlerCallDetails) -> Handler | None:
            return handler

        continuation: Callable[[grpc.HandlerCallDetails], Any] = innermost
        for interceptor in reversed(self._interceptors):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        return _run_at_once(continuation(details))

    def convert(self, handler: Handler) -> Handler:
        """The synchronous handler running a grpc.aio handler's behaviour through the bridge (made once each)."""
        cached = self._converted.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"{kind} handler {behavior!r} is not a coroutine or async generator function")
        call = self._streaming(behavior, handler.request_streaming) if handler.response_streaming else \
            self._unary(behavior, handler.request_streaming)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        converted = factory(call, request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        self._converted[id(handler)] = (handler, converted)
        return converted

    def _bridge_for(self, context: grpc.ServicerContext) -> LoopBridge:
        if self._bridge is None:  # calls arrive only after start(); a stop in progress refuses them
            context.abort(grpc.StatusCode.UNAVAILABLE, _STOPPING)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover
        return self._bridge

    def _unary(self, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            bridge = self._bridge_for(context)
            if request_streaming:
                request = _Requests(request, self.stream_readers)
            end = _CallEnd(context)
            try:
                return bridge.run(behavior(request, _AioContext(context, bridge)), on_suspend=end.track)
            except asyncio.CancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "the call ended before its answer")
            except BridgeClosedError:
                context.abort(grpc.StatusCode.UNAVAILABLE, _STOPPING)
            return None  # pragma: no cover - abort raises

        return call

    def _streaming(self, behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
        writer = inspect.iscoroutinefunction(behavior)  # grpc.aio's other style: a coroutine calling write()

        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            bridge = self._bridge_for(context)
            if request_streaming:
                request = _Requests(request, self.stream_readers)
            end = _CallEnd(context)
            if writer:
                return self._written(behavior, request, context, bridge, end)
            return self._generated(behavior(request, _AioContext(context, bridge)), context, bridge, end)

        return call

    def _generated(self, responses: AsyncIterator[Any], context: grpc.ServicerContext, bridge: LoopBridge,
                   end: _CallEnd) -> Iterator[Any]:
        """The responses of an async generator, each step through the bridge."""
        finished = False
        try:
            while True:
                try:
                    response: Any = bridge.run(responses.__anext__(), on_suspend=end.track)  # type: ignore[arg-type]
                except StopAsyncIteration:
                    finished = True
                    return
                except asyncio.CancelledError:
                    finished = True
                    return
                yield response
        except BridgeClosedError:
            finished = True
            context.abort(grpc.StatusCode.UNAVAILABLE, _STOPPING)
        finally:
            if not finished:  # grpc stopped reading (the call ended): let the generator clean up
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    bridge.run(responses.aclose())  # type: ignore[attr-defined]

    def _written(self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext,
                 bridge: LoopBridge, end: _CallEnd) -> Iterator[Any]:
        """The messages a coroutine writes with `context.write`, while it runs on the loop."""
        writes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        aio_context = _AioContext(context, bridge, writes)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                bridge.run(behavior(request, aio_context), on_suspend=end.track)
                outcome.append(None)
            except BaseException as exc:  # handed to the response iterator below
                outcome.append(exc)
            writes.put(_END)

        runner = threading.Thread(target=run, name="grpc-writer", daemon=True)
        runner.start()
        while (message := writes.get()) is not _END:
            yield message
        runner.join()
        error = outcome[0] if outcome else None
        if error is not None and not isinstance(error, asyncio.CancelledError | BridgeClosedError):
            raise error


class _Lookup(grpc.GenericRpcHandler):
    """The synchronous server's generic handler: every call's grpc.aio handler, interceptors applied, converted."""

    def __init__(self, server: ThreadedServer) -> None:
        self._server = server

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._server.find(handler_call_details)
        return None if handler is None else self._server.convert(handler)


def _run_at_once(coro: Any) -> Any:
    """Run a coroutine that never waits (an interceptor's lookup) to its end, here."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a gRPC interceptor waited; the threaded transport runs interceptors without the loop")


__all__ = ["ThreadedServer"]
