"""The candidates for nnserve's REST frontend, each run on the same asyncio loop as a grpc.aio server, in one process.

    python benchmarks/http_candidates.py aiohttp|starlette|asgi|asgi-watch --port-file FILE [--codec orjson|json]

Started by `http_stack.py` with the interpreter of its own virtual environment (aiohttp, uvicorn, httptools,
starlette, orjson: none of them is installed into nnserve's). Each process starts an empty grpc.aio server on port 0,
then the HTTP server on the same running loop, writes `{"pid", "grpc", "http"}` to the port file once both listen,
and stops on SIGTERM or SIGINT (its own loop's handlers: uvicorn installs none).

The candidates differ only in the HTTP layer; the request handling is one function for all of them
(`infer_reply`: the v2 JSON request straight to a numpy array, the array back as the v2 JSON response):

* `aiohttp`: `web.Application` with `AppRunner(handler_cancellation=True, access_log=None)` and a `TCPSite`;
* `starlette`: a Starlette app (`max_body_size` set) served by `uvicorn.Server(config).serve()` with httptools;
* `asgi`: the same uvicorn with a bare ASGI callable that does its own dispatch and body limit;
* `asgi-watch`: that callable with what aiohttp's `handler_cancellation` gives for free: each infer is raced
  against the client's disconnect (a `receive()` task per request), the price of that behaviour on uvicorn.

Besides the two benchmarked routes (`GET /v2/health/ready`, `POST /v2/models/echo/infer`), each serves the probes
that `http_stack.py` uses for its caveats: `POST /probe/slow` (sleeps; records whether it completed or was
cancelled when the client went away), `GET /probe/state` (what was recorded) and `POST /probe/body` (the number of
body bytes the handler was given: compressed or not, and whether the size limit stopped it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

HEALTH_PATH = "/v2/health/ready"
INFER_PATH = "/v2/models/echo/infer"
HEALTH_BODY = b'{"ready":true}'
SLOW_S = 1.0
"""How long `/probe/slow` sleeps: the prober disconnects well before."""

PROBES: dict[str, Any] = {}
"""What the probe routes recorded, returned by `/probe/state`."""


class Codec:
    """The JSON codec of the request path: orjson (the numpy array serialized directly) or the standard library."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "orjson":
            import orjson

            self.loads: Callable[[bytes], Any] = orjson.loads
            self._orjson = orjson
        elif name == "json":
            self.loads = json.loads
        else:
            raise ValueError(f"unknown codec {name!r} (orjson, json)")

    def dumps(self, value: dict[str, Any]) -> bytes:
        if self.name == "orjson":
            return self._orjson.dumps(value, option=self._orjson.OPT_SERIALIZE_NUMPY)
        return json.dumps(value, separators=(",", ":"), default=_tolist).encode()


def _tolist(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")


def infer_reply(body: bytes, codec: Codec) -> tuple[int, bytes]:
    """A v2 JSON inference request -> (status, v2 JSON response) echoing the first input as output "output"."""
    try:
        request = codec.loads(body)
        tensor = request["inputs"][0]
        if tensor["datatype"] != "FP32":
            raise ValueError(f"datatype {tensor['datatype']!r} is not FP32")
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return 400, codec.dumps({"error": f"bad inference request: {exc}"})
    response = {"model_name": "echo", "outputs": [
        {"name": "output", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel()}]}
    return 200, codec.dumps(response)


async def slow_probe(report_disconnect: Callable[[], Awaitable[str]] | None = None) -> None:
    """Sleep; record whether the framework cancelled this handler when its client went away."""
    PROBES["slow"] = "started"
    try:
        await asyncio.sleep(SLOW_S)
    except asyncio.CancelledError:
        PROBES["slow"] = "cancelled"
        raise
    PROBES["slow"] = "completed"
    if report_disconnect is not None:
        PROBES["slow_receive_after"] = await report_disconnect()


def body_report(body: bytes) -> bytes:
    return json.dumps({"received": len(body), "head": body[:4].hex()}).encode()


# -- aiohttp ------------------------------------------------------------------------------------------------------


def aiohttp_app(codec: Codec, max_body: int) -> Any:
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=HEALTH_BODY, content_type="application/json")

    async def infer(request: web.Request) -> web.Response:
        status, body = infer_reply(await request.read(), codec)
        return web.Response(status=status, body=body, content_type="application/json")

    async def slow(request: web.Request) -> web.Response:
        await slow_probe()
        return web.Response(body=b"{}", content_type="application/json")

    async def state(request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(PROBES).encode(), content_type="application/json")

    async def body_size(request: web.Request) -> web.Response:
        return web.Response(body=body_report(await request.read()), content_type="application/json")

    app = web.Application(client_max_size=max_body)
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_post(INFER_PATH, infer)
    app.router.add_post("/probe/slow", slow)
    app.router.add_get("/probe/state", state)
    app.router.add_post("/probe/body", body_size)
    return app


async def serve_aiohttp(codec: Codec, max_body: int, ready: Callable[[int], None], stop: asyncio.Event) -> None:
    from aiohttp import web

    runner = web.AppRunner(aiohttp_app(codec, max_body), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ready(int(runner.addresses[0][1]))
    await stop.wait()
    await runner.cleanup()


# -- uvicorn: Starlette, and a bare ASGI callable -----------------------------------------------------------------


def starlette_app(codec: Codec, max_body: int) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def health(request: Request) -> Response:
        return Response(HEALTH_BODY, media_type="application/json")

    async def infer(request: Request) -> Response:
        status, body = infer_reply(await request.body(), codec)
        return Response(body, status_code=status, media_type="application/json")

    async def slow(request: Request) -> Response:
        await slow_probe()
        return Response(b"{}", media_type="application/json")

    async def state(request: Request) -> Response:
        return Response(json.dumps(PROBES).encode(), media_type="application/json")

    async def body_size(request: Request) -> Response:
        return Response(body_report(await request.body()), media_type="application/json")

    routes = [Route(HEALTH_PATH, health, methods=["GET"]), Route(INFER_PATH, infer, methods=["POST"]),
              Route("/probe/slow", slow, methods=["POST"]), Route("/probe/state", state, methods=["GET"]),
              Route("/probe/body", body_size, methods=["POST"])]
    return Starlette(routes=routes, max_body_size=max_body)


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_JSON_HEADER = (b"content-type", b"application/json")


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON_HEADER, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past `limit` bytes (uvicorn itself has no limit)."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """`await work`, cancelled if the client disconnects first: uvicorn cancels nothing, so a `receive()` task
    watches for `http.disconnect` and cancels the awaiting task (a callback, not `asyncio.wait`: cheaper)."""
    current = asyncio.current_task()
    assert current is not None

    def on_message(watcher: asyncio.Task[dict[str, Any]]) -> None:
        if not watcher.cancelled() and watcher.result()["type"] == "http.disconnect":
            current.cancel("client disconnected")

    watcher = asyncio.ensure_future(receive())
    watcher.add_done_callback(on_message)
    try:
        return await work
    finally:
        watcher.remove_done_callback(on_message)
        watcher.cancel()


def asgi_app(codec: Codec, max_body: int, watch: bool = False) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The bare ASGI callable; `watch`: each infer races its reply future against the client's disconnect, as
    nnserve would race its batcher's future (here already resolved, so the difference from `asgi` is the watch)."""
    too_large = json.dumps({"error": f"request body over {max_body} bytes"}).encode()
    loop = asyncio.get_running_loop()

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, HEALTH_BODY)

    async def infer(scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, max_body)
        if body is None:
            await _respond(send, 413, too_large)
            return
        if not watch:
            await _respond(send, *infer_reply(body, codec))
            return
        reply: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        reply.set_result(infer_reply(body, codec))
        with contextlib.suppress(asyncio.CancelledError):
            await _respond(send, *await _unless_disconnected(reply, receive))

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the (empty) body
        if watch:
            with contextlib.suppress(asyncio.CancelledError):
                await _unless_disconnected(slow_probe(), receive)
            return

        async def next_message() -> str:
            try:
                return str((await asyncio.wait_for(receive(), 1.0))["type"])
            except TimeoutError:
                return "none within 1 s (still connected)"

        await slow_probe(next_message)
        await _respond(send, 200, b"{}")

    async def state(scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, json.dumps(PROBES).encode())

    async def body_size(scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, max_body)
        await _respond(send, *((413, too_large) if body is None else (200, body_report(body))))

    routes = {("GET", HEALTH_PATH): health, ("POST", INFER_PATH): infer, ("POST", "/probe/slow"): slow,
              ("GET", "/probe/state"): state, ("POST", "/probe/body"): body_size}
    not_found = b'{"error":"not found"}'

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = routes.get((scope["method"], scope["path"]))
        if route is None:
            await _respond(send, 404, not_found)
            return
        await route(scope, receive, send)

    return app


async def serve_uvicorn(app: Any, ready: Callable[[int], None], stop: asyncio.Event) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            """None: the process's own loop handlers stop both servers."""
            return contextlib.nullcontext()

    config = uvicorn.Config(app, http="httptools", loop="asyncio", lifespan="off", access_log=False,
                            log_level="warning", proxy_headers=False, ws="none", interface="asgi3")
    server = Server(config)
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with proto 0 every
    # response uvicorn writes in two parts (head, body) waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn has no event for it
        if serving.done():
            serving.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    ready(int(sock.getsockname()[1]))
    await stop.wait()
    server.should_exit = True
    await serving


async def serve(kind: str, port_file: Path, codec: Codec, max_body: int) -> None:
    import grpc

    grpc_server = grpc.aio.server()
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(http_port: int) -> None:
        temporary = port_file.with_name(f".{port_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "grpc": grpc_port, "http": http_port}))
        os.replace(temporary, port_file)

    try:
        if kind == "aiohttp":
            await serve_aiohttp(codec, max_body, ready, stop)
        elif kind == "starlette":
            await serve_uvicorn(starlette_app(codec, max_body), ready, stop)
        elif kind in ("asgi", "asgi-watch"):
            await serve_uvicorn(asgi_app(codec, max_body, watch=kind == "asgi-watch"), ready, stop)
        else:
            raise ValueError(f"unknown candidate {kind!r}")
    finally:
        await grpc_server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("aiohttp", "starlette", "asgi", "asgi-watch"))
    parser.add_argument("--port-file", type=Path, required=True, help="{pid, grpc, http} as JSON once listening")
    parser.add_argument("--codec", default="orjson", choices=("orjson", "json"))
    parser.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (aiohttp's default)")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port_file, Codec(args.codec), args.max_body))


if __name__ == "__main__":
    main()
