"""The KServe v2 REST protocol (and Triton's HTTP extensions) over aiohttp, on the event loop gRPC runs on.

Routes translate onto `DataPlane` exactly as the gRPC servicer does: the same batcher, limits, readiness, drain,
statistics and token scopes (each route is checked as the gRPC RPC it corresponds to; the health routes stay open,
as grpc.health.v1 does, for kubelet and KServe probes). Errors answer `{"error": "..."}` with the status of
`frontends.status.HTTP_STATUS`. The body's form is decided by `Inference-Header-Content-Length`, never by
Content-Type (tritonclient sends none, `curl -d` sends a form type).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format

from nnserve import __version__
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.dataplane import DataPlane, InferenceRequest
from nnserve.server.errors import InvalidInputError, QueueFullError, ServingError
from nnserve.server.frontends.grpc_servicer import EXTENSIONS, SERVER_NAME, build_model_config
from nnserve.server.frontends.rest_codec import (
    HEADER_LENGTH,
    OutputChoice,
    RestEncoder,
    json_body,
    parse_infer_request,
)
from nnserve.server.frontends.status import http_status
from nnserve.server.limits import MIN_RETRY_AFTER_MS, RETRY_AFTER_KEY, client_message
from nnserve.server.model_view import PLATFORM
from nnserve.server.providers import CUDA
from nnserve.server.repository import ServedVersion
from nnserve.server.security import TokenTable, authorize

log = logging.getLogger(__name__)

JSON = "application/json"
OCTETS = "application/octet-stream"
_INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_OPEN = "health"
"""Route name of the endpoints that need no token (the health checks)."""
_INTERNAL_MESSAGE = "internal error in nnserve; the server log has the details"
_SERVER_METADATA = json_body({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
_INT64 = frozenset({pb_descriptor.FieldDescriptor.TYPE_INT64, pb_descriptor.FieldDescriptor.TYPE_UINT64,
                    pb_descriptor.FieldDescriptor.TYPE_SINT64, pb_descriptor.FieldDescriptor.TYPE_FIXED64,
                    pb_descriptor.FieldDescriptor.TYPE_SFIXED64})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestFrontend:
    """The aiohttp application and its listener; `start` serves on an already bound socket."""

    def __init__(self, dataplane: DataPlane, *, tokens: TokenTable | None, max_body_bytes: int) -> None:
        self.dataplane = dataplane
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        middlewares = [self._errors] if tokens is None else [self._errors, self._authorize]
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        self._add_routes(self.app.router)
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        # handler_cancellation: a client that hangs up cancels its handler, so a queued request leaves the queue.
        # shutdown_timeout: the drain has already waited for every accepted request when the runner is cleaned up.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        """Close the listener and the connections (after the drain: nothing accepted is still running)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes ----------------------------------------------------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        router.add_get("/v2/health/live", self.live, name="health-live")
        router.add_get("/v2/health/ready", self.ready, name="health-ready")
        router.add_get("/v2", self.server_metadata, name="ServerMetadata")
        router.add_get("/v2/models/stats", self.statistics, name="ModelStatistics")  # before {model}
        for base, suffix in ((model, ""), (version, "-version")):
            router.add_get(base, self.model_metadata, name=f"ModelMetadata{suffix}")
            router.add_get(base + "/ready", self.model_ready, name=f"ModelReady{suffix}")
            router.add_post(base + "/infer", self.infer, name=f"ModelInfer{suffix}")
            router.add_get(base + "/config", self.model_config, name=f"ModelConfig{suffix}")
            router.add_get(base + "/stats", self.statistics, name=f"ModelStatistics-model{suffix}")
        router.add_post("/v2/repository/index", self.repository_index, name="RepositoryIndex")
        router.add_post("/v2/repository/models/{model}/load", self.load, name="RepositoryModelLoad")
        router.add_post("/v2/repository/models/{model}/unload", self.unload, name="RepositoryModelUnload")

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.dataplane.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=_SERVER_METADATA, content_type=JSON)

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._lookup(request, "ModelMetadata")
        entry = self.dataplane.entry(served.name)
        signature = served.runner.signature

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

        return _json({
            "name": served.name, "versions": [str(v) for v in entry.ready_versions], "platform": PLATFORM,
            "inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs),
        })

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        self.dataplane.entry(name)  # 404 for a model the server does not know
        ready = self.dataplane.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        served = self._lookup(request, "ModelConfig")
        return _json(config_json(served))

    async def statistics(self, request: web.Request) -> web.Response:
        served = self.dataplane.statistics(request.match_info.get("model", ""), request.match_info.get("version", ""))
        return _json({"model_stats": [statistics_json(s) for s in served]})

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        ready_only = bool(body.get("ready", False))
        rows = self.dataplane.index(ready_only=ready_only)
        return _json([{"name": r.name, "version": r.version, "state": r.state, "reason": r.reason} for r in rows])

    async def load(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        await self.dataplane.load(request.match_info["model"], list(_parameters_of(body)))
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        await self.dataplane.unload(request.match_info["model"], list(_parameters_of(body)))
        return _json({})

    async def infer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter_ns()
        body = await self._read_body(request)
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            neutral, choice = parse_infer_request(body, request.headers.get(HEADER_LENGTH), model, version,
                                                  self.dataplane.limits, None)
        except InvalidInputError as exc:  # refused after routing: an unknown model is 404, and statistics count it
            neutral, choice = InferenceRequest(model, version, (), invalid=str(exc)), OutputChoice({}, False)
        response = await self.dataplane.infer(neutral, RestEncoder(choice), started)
        payload, header_length = response.body()
        if header_length is None:
            reply = web.Response(body=payload, content_type=JSON)
        else:
            reply = web.Response(body=payload, content_type=OCTETS, headers={HEADER_LENGTH: str(header_length)})
        _compress_if_asked(request, reply)
        return reply

    # -- helpers -----------------------------------------------------------------------------------------------

    def _lookup(self, request: web.Request, rpc: str) -> ServedVersion:
        return self.dataplane.lookup(request.match_info["model"], request.match_info.get("version", ""), rpc)

    async def _read_body(self, request: web.Request) -> bytes:
        """The (decompressed) body; a declared length over the limit is refused before anything is read."""
        declared = request.content_length
        if declared is not None and declared > self._max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_body_bytes, actual_size=declared)
        return await request.read()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as `{"error": ...}` with its status: the domain table, aiohttp's own 4xx, or 500."""
        try:
            return await handler(request)
        except QueueFullError as exc:
            hint = getattr(exc, "retry_after_ms", MIN_RETRY_AFTER_MS)
            headers = {"Retry-After": str(max(1, math.ceil(hint / 1000))), RETRY_AFTER_KEY: str(hint)}
            return _error(http_status(exc), f"{exc} (retry after ~{hint} ms)", headers)
        except ServingError as exc:
            return _error(http_status(exc), str(exc))
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, f"the request body is larger than this server accepts ({self._max_body_bytes} bytes, "
                               f"--max-message-bytes; decompressed bodies count): {exc.text}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason if exc.status in (404, 405) else (exc.text or exc.reason),
                          {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed unexpectedly", request.method, request.path[:128])
            return _error(500, _INTERNAL_MESSAGE)

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name
        if route is not None and not route.startswith(_OPEN):
            assert self._tokens is not None
            rpc = route.split("-", 1)[0]
            denial = authorize(self._tokens, f"/{_INFERENCE_SERVICE}/{rpc}", request.headers.getall("Authorization",
                                                                                                 []), "header")
            if denial is not None:
                if denial.unauthenticated:
                    return _error(401, denial.message, {"WWW-Authenticate": "Bearer"})
                return _error(403, denial.message)
        return await handler(request)


# -- bodies --------------------------------------------------------------------------------------------------------


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_body(document), status=status, content_type=JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_body({"error": client_message(message)}), status=int(status), content_type=JSON,
                        headers=headers)


async def _optional_json(request: web.Request) -> dict[str, Any]:
    """A small JSON object body (repository calls); empty when there is none."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInputError("the body must be a JSON object")
    return document


def _parameters_of(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be a JSON object")
    return parameters


def _compress_if_asked(request: web.Request, response: web.Response) -> None:
    """gzip or deflate the response when the client's Accept-Encoding asks for it (as Triton does)."""
    accepted = request.headers.get("Accept-Encoding", "")
    if "gzip" in accepted or "deflate" in accepted:
        response.enable_compression()


def config_json(served: ServedVersion) -> dict[str, Any]:
    """Triton's ModelConfig as its HTTP endpoint writes it: proto field names, every field, 64-bit integers as JSON
    numbers (protobuf's JSON mapping writes them as strings, which perf_analyzer cannot read)."""
    config = build_model_config(served)
    document = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return _numbers(config.DESCRIPTOR, document)


def _numbers(descriptor: pb_descriptor.Descriptor, document: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in document:
            continue
        value = document[field.name]
        if field.type in _INT64:
            document[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                inner = field.message_type.fields_by_name["value"].message_type
                if inner is not None:
                    for key, item in value.items():
                        value[key] = _numbers(inner, item)
            elif isinstance(value, list):
                document[field.name] = [_numbers(field.message_type, item) for item in value]
            elif isinstance(value, dict):
                document[field.name] = _numbers(field.message_type, value)
    return document


def statistics_json(served: ServedVersion) -> dict[str, Any]:
    """One model version's statistics as Triton's HTTP endpoint writes them: every field, unsigned JSON numbers."""
    s = served.stats
    runner = served.runner
    on_gpu = runner.provider == CUDA

    def duration(d: Any) -> dict[str, int]:
        return {"count": int(d.count), "ns": int(d.ns)}

    zero = {"count": 0, "ns": 0}
    return {
        "name": s.model,
        "version": str(s.version),
        "last_inference": int(s.last_inference_ms),
        "inference_count": int(s.inference_count),
        "execution_count": int(s.execution_count),
        "inference_stats": {
            "success": duration(s.success), "fail": duration(s.fail), "queue": duration(s.queue),
            "compute_input": duration(s.compute_input), "compute_infer": duration(s.compute_infer),
            "compute_output": duration(s.compute_output), "cache_hit": dict(zero), "cache_miss": dict(zero),
        },
        "response_stats": {},
        "batch_stats": [
            {"batch_size": int(size), "compute_input": duration(b.compute_input),
             "compute_infer": duration(b.compute_infer), "compute_output": duration(b.compute_output)}
            for size, b in sorted(s.batches.items())
        ],
        "memory_usage": [{"type": "GPU" if on_gpu else "CPU", "id": runner.device_id if on_gpu else 0,
                          "byte_size": int(runner.facts.weight_bytes)}],
    }


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket for the HTTP port (bound by nnserve, so that port 0 reports its real port and
    `--workers N` can share it with SO_REUSEPORT)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
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
