"""The HTTP layer under the REST routes: uvicorn (httptools) serving an ASGI callable on the loop gRPC runs on,
request bodies read with a bound (and decompressed with the same bound), responses compressed when asked.

Why uvicorn with a bare ASGI callable: measured side by side on the 2-core machine (`benchmarks/http_stack.py`,
README: HTTP/REST), it cost 0.74x aiohttp's server CPU per inference request (0.86x with the disconnect watch that
nnserve needs), and a framework (Starlette) added cost for nothing nnserve uses. uvicorn parses HTTP; nnserve
routes, bounds bodies and watches for clients that hang up.

Decompression is nnserve's own, bounded: zlib is asked for at most the body limit plus one byte, so a gzip bomb
costs the loop no more than a body of the limit's size before it is refused (aiohttp's automatic decompression
kept inflating a 1 GiB bomb for seconds after refusing it, stalling every protocol on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEEP_ALIVE_S = 60
"""How long an idle keep-alive connection stays open (uvicorn's 5 s would make clients reconnect between bursts)."""
COMPRESS_LEVEL = 1
"""gzip/deflate level of responses compressed on request: the cheapest, since the CPU is shared with inference."""


class BodyTooLarge(Exception):
    """The (decompressed) body passes the limit; answered 413."""


class BadEncoding(Exception):
    """A Content-Encoding nnserve does not decode, or a compressed body that does not decompress; answered 400."""


class ClientGone(Exception):
    """The client hung up while its body was being read."""


async def read_body(receive: Receive, declared: int | None, limit: int) -> bytes:
    """The whole request body; BodyTooLarge as soon as it (or its declared length) passes `limit`."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body passes {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from its Content-Encoding (gzip, deflate, identity), at most `limit` bytes of output."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        candidates = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        candidates = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped, as HTTP says, or raw, as some clients send
    else:
        raise BadEncoding(f"Content-Encoding {encoding[:32]!r} is not supported (gzip, deflate or identity)")
    for wbits in candidates:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise BodyTooLarge(f"the {encoding} body decompresses to more than {limit} bytes")
        if not inflater.eof:
            raise BadEncoding(f"the {encoding} body is cut short: it does not decompress completely")
        return out
    raise BadEncoding(f"the body is not valid {encoding} data")


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """`body` in the first encoding the client accepts of gzip and deflate, or as it is."""
    accepted = accept_encoding.lower()
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=COMPRESS_LEVEL), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, COMPRESS_LEVEL), "deflate"
    return body, None


def watch_disconnect(receive: Receive, task: asyncio.Task[Any]) -> asyncio.Future[Message]:
    """Cancel `task` if the client hangs up before it is done (the done-callback form: no extra `asyncio.wait`).

    uvicorn's `receive()` returns `http.disconnect` once the client is gone, or once the response is complete (the
    task is done by then, and nothing is cancelled)."""
    watcher = asyncio.ensure_future(receive())

    def on_message(done: asyncio.Future[Message]) -> None:
        if not done.cancelled() and done.exception() is None and not task.done():
            task.cancel()

    watcher.add_done_callback(on_message)
    return watcher


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket (bound by nnserve, so port 0 reports its real port and `--workers N` share it
    with SO_REUSEPORT). Made with IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every
    small response waits ~40 ms for the peer's delayed ACK."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS for the HTTP port from the same files as gRPC's; mutual TLS (client certificates required) with a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpServer:
    """uvicorn serving `app` on an already bound socket, started and stopped by nnserve (its own signal handling,
    main loop and logging are not used: nnserve drains first, then stops it)."""

    def __init__(self, app: ASGIApp, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        self._sock = sock
        config = uvicorn.Config(
            app, lifespan="off", http="httptools", loop="none", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, date_header=False, timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=1, backlog=2048,
            ssl_context_factory=None if ssl_context is None else (lambda _config, _default: ssl_context),
        )
        self._config = config
        self._server = uvicorn.Server(config)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        if not self._config.loaded:
            self._config.load()
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        # What uvicorn's own serve() sets up before startup() (its signal handling and main loop are not wanted).
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[self._sock])

    async def stop(self) -> None:
        """Close the listener and every connection (after the drain: nothing accepted is still running)."""
        with contextlib.suppress(Exception):
            await self._server.shutdown()
        self._sock.close()
