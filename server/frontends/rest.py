"""The KServe v2 REST protocol (and Triton's HTTP extensions) as an ASGI application on the loop gRPC runs on.

Routes translate onto `DataPlane` exactly as the gRPC servicer does: the same batcher, limits, readiness, drain,
statistics and token scopes (each route is checked as the gRPC RPC it corresponds to; the health routes stay open,
as grpc.health.v1 does, for kubelet and KServe probes). Errors answer `{"error": "..."}` with the status of
`frontends.status.HTTP_STATUS`. The body's form is decided by `Inference-Header-Content-Length`, never by
Content-Type (tritonclient sends none, `curl -d` sends a form type). `rest_http` is the HTTP layer underneath.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
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
from nnserve.server.frontends.rest_http import (
    BadEncoding,
    BodyTooLarge,
    ClientGone,
    Receive,
    Scope,
    Send,
    compress,
    decompress,
    read_body,
    watch_disconnect,
)
from nnserve.server.frontends.status import http_status
from nnserve.server.limits import MIN_RETRY_AFTER_MS, RETRY_AFTER_KEY, client_message
from nnserve.server.model_view import PLATFORM
from nnserve.server.providers import CUDA
from nnserve.server.repository import ServedVersion
from nnserve.server.security import TokenTable, authorize

log = logging.getLogger(__name__)

JSON = b"application/json"
OCTETS = b"application/octet-stream"
_INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_INTERNAL_MESSAGE = "internal error in nnserve; the server log has the details"
_SERVER_METADATA = json_body({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
_SERVER_HEADER = (b"server", f"nnserve/{__version__}".encode())
_INFER_ROUTE, _VERSION_INFER_ROUTE = "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"
_INT64 = frozenset({pb_descriptor.FieldDescriptor.TYPE_INT64, pb_descriptor.FieldDescriptor.TYPE_UINT64,
                    pb_descriptor.FieldDescriptor.TYPE_SINT64, pb_descriptor.FieldDescriptor.TYPE_FIXED64,
                    pb_descriptor.FieldDescriptor.TYPE_SFIXED64})


@dataclass(slots=True)
class Request:
    """What a route sees: the path's parameters, the headers (lower-case names, every value) and the body."""

    method: str
    params: dict[str, str]
    headers: dict[str, list[str]]
    body: bytes = b""
    held: int = 0
    """In-flight budget bytes reserved for the body before it was read (infer only); infer hands them on."""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    compressible: bool = True


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    rpc: str | None
    """The gRPC RPC whose token scope the route needs; None for the open health routes."""
    reads_body: bool = False
    watches: bool = False
    """Whether a client hanging up cancels the handler (inference, whose request may wait in a queue)."""


def _path(template: str) -> re.Pattern[str]:
    """`/v2/models/{model}` -> a regex with named groups; a parameter is one path segment."""
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template) + "$")


class RestFrontend:
    """The ASGI application: routing, token scopes, errors, and the v2 REST routes over a DataPlane."""

    def __init__(self, dataplane: DataPlane, *, tokens: TokenTable | None, max_body_bytes: int) -> None:
        self.dataplane = dataplane
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        self._routes = self._build_routes()

    def _build_routes(self) -> list[Route]:
        model, version = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        routes = [
            Route("GET", _path("/v2/health/live"), self.live, None),
            Route("GET", _path("/v2/health/ready"), self.ready, None),
            Route("GET", _path("/v2"), self.server_metadata, "ServerMetadata"),
            Route("GET", _path("/v2/models/stats"), self.statistics, "ModelStatistics"),  # before {model}
        ]
        for base in (model, version):
            routes += [
                Route("GET", _path(base), self.model_metadata, "ModelMetadata"),
                Route("GET", _path(base + "/ready"), self.model_ready, "ModelReady"),
                Route("POST", _path(base + "/infer"), self.infer, "ModelInfer", reads_body=True, watches=True),
                Route("GET", _path(base + "/config"), self.model_config, "ModelConfig"),
                Route("GET", _path(base + "/stats"), self.statistics, "ModelStatistics"),
            ]
        routes += [
            Route("POST", _path("/v2/repository/index"), self.repository_index, "RepositoryIndex", reads_body=True),
            Route("POST", _path("/v2/repository/models/{model}/load"), self.load, "RepositoryModelLoad",
                  reads_body=True),
            Route("POST", _path("/v2/repository/models/{model}/unload"), self.unload, "RepositoryModelUnload",
                  reads_body=True),
        ]
        return routes

    # -- ASGI ------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        reply = await self._respond(scope, receive, headers)
        await self._send(send, reply, headers)

    async def _respond(self, scope: Scope, receive: Receive, headers: dict[str, list[str]]) -> Reply:
        path, method = scope["path"], scope["method"]
        route, params, allowed = self._match(path, method)
        if route is None:
            if allowed:
                return _error(405, "Method Not Allowed", [(b"allow", ", ".join(sorted(allowed)).encode())])
            return _error(404, "Not Found")
        request = Request(method, params, headers)
        try:
            if route.rpc is not None and self._tokens is not None:
                denied = self._authorize(route.rpc, headers)
                if denied is not None:
                    return denied
            if route.reads_body:
                if route.rpc == "ModelInfer":  # the budget sees the body's declared length before it is read
                    request.held = self.dataplane.hold(params["model"], params.get("version", ""),
                                                       _declared_length(request), time.perf_counter_ns())
                request.body = await self._read(receive, request)
            if not route.watches:
                return await route.handler(request)
            task = asyncio.ensure_future(route.handler(request))
            watcher = watch_disconnect(receive, task)
            try:
                return await task
            finally:
                if not watcher.done():
                    watcher.cancel()
        except ClientGone:
            return _error(499, "the client closed the connection")
        except BodyTooLarge as exc:
            return _error(413, f"{exc}: larger than this server accepts ({self._max_body_bytes} bytes, "
                               "--max-message-bytes; a compressed body counts decompressed)",
                          [(b"connection", b"close")])
        except BadEncoding as exc:
            return _error(400, str(exc))
        except QueueFullError as exc:
            hint = getattr(exc, "retry_after_ms", MIN_RETRY_AFTER_MS)
            headers_out = [(b"retry-after", str(max(1, math.ceil(hint / 1000))).encode()),
                           (RETRY_AFTER_KEY.encode(), str(hint).encode())]
            return _error(http_status(exc), f"{exc} (retry after ~{hint} ms)", headers_out)
        except ServingError as exc:
            return _error(http_status(exc), str(exc))
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the server itself is stopping
            return _error(499, "the client closed the connection")  # our handler, cancelled by the watch
        except Exception:
            log.exception("%s %s failed unexpectedly", method, path[:128])
            return _error(500, _INTERNAL_MESSAGE)
        finally:
            if request.held:  # the body was refused or the client left before infer took the reservation over
                self.dataplane.budget.release(request.held)

    def _match(self, path: str, method: str) -> tuple[Route | None, dict[str, str], set[str]]:
        allowed: set[str] = set()
        for route in self._routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, found.groupdict(), allowed
            allowed.add(route.method)
        return None, {}, allowed

    async def _read(self, receive: Receive, request: Request) -> bytes:
        body = await read_body(receive, _declared_length(request), self._max_body_bytes)
        encoding = request.header("content-encoding")
        return decompress(body, encoding, self._max_body_bytes) if encoding else body

    def _authorize(self, rpc: str, headers: dict[str, list[str]]) -> Reply | None:
        assert self._tokens is not None
        denial = authorize(self._tokens, f"/{_INFERENCE_SERVICE}/{rpc}", headers.get("authorization", []), "header")
        if denial is None:
            return None
        if denial.unauthenticated:
            return _error(401, denial.message, [(b"www-authenticate", b"Bearer")])
        return _error(403, denial.message)

    async def _send(self, send: Send, reply: Reply, headers: dict[str, list[str]]) -> None:
        body = reply.body
        extra = list(reply.headers)
        accepted = headers.get("accept-encoding")
        if accepted and reply.compressible and body:
            body, encoding = compress(body, accepted[0])
            if encoding is not None:
                extra.append((b"content-encoding", encoding.encode()))
        response_headers = [(b"content-type", reply.content_type), (b"content-length", str(len(body)).encode()),
                            _SERVER_HEADER, *extra]
        await send({"type": "http.response.start", "status": reply.status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    # -- routes ----------------------------------------------------------------------------------------------

    async def live(self, request: Request) -> Reply:
        return _json({"live": True})

    async def ready(self, request: Request) -> Reply:
        ready = self.dataplane.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Reply:
        return Reply(200, _SERVER_METADATA)

    async def model_metadata(self, request: Request) -> Reply:
        served = self._lookup(request, "ModelMetadata")
        entry = self.dataplane.entry(served.name)
        signature = served.runner.signature

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

        return _json({
            "name": served.name, "versions": [str(v) for v in entry.ready_versions], "platform": PLATFORM,
            "inputs": tensors(signature.inputs), "outputs": tensors(signature.outputs),
        })

    async def model_ready(self, request: Request) -> Reply:
        name, version = request.params["model"], request.params.get("version", "")
        self.dataplane.entry(name)  # 404 for a model the server does not know
        ready = self.dataplane.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: Request) -> Reply:
        return _json(config_json(self._lookup(request, "ModelConfig")))

    async def statistics(self, request: Request) -> Reply:
        served = self.dataplane.statistics(request.params.get("model", ""), request.params.get("version", ""))
        return _json({"model_stats": [statistics_json(s) for s in served]})

    async def repository_index(self, request: Request) -> Reply:
        ready_only = bool(_optional_json(request.body).get("ready", False))
        rows = self.dataplane.index(ready_only=ready_only)
        return _json([{"name": r.name, "version": r.version, "state": r.state, "reason": r.reason} for r in rows])

    async def load(self, request: Request) -> Reply:
        parameters = _parameters_of(_optional_json(request.body))
        await self.dataplane.load(request.params["model"], list(parameters))
        return _json({})

    async def unload(self, request: Request) -> Reply:
        parameters = _parameters_of(_optional_json(request.body))
        await self.dataplane.unload(request.params["model"], list(parameters))
        return _json({})

    async def infer(self, request: Request) -> Reply:
        started = time.perf_counter_ns()
        model, version = request.params["model"], request.params.get("version", "")
        try:
            neutral, choice = parse_infer_request(request.body, request.header(HEADER_LENGTH.lower()), model,
                                                  version, self.dataplane.limits, None)
        except InvalidInputError as exc:  # refused after routing: an unknown model is 404, and statistics count it
            neutral, choice = InferenceRequest(model, version, (), invalid=str(exc)), OutputChoice({}, False)
        neutral.wire_bytes = len(request.body)
        tracing = self.dataplane.tracing
        if tracing is not None:
            route = _VERSION_INFER_ROUTE if "version" in request.params else _INFER_ROUTE
            neutral.trace = tracing.start_http(request.headers, route, started)
        held, request.held = request.held, 0  # from here the data plane releases it
        response = await self.dataplane.infer(neutral, RestEncoder(choice), started, held)
        payload, header_length = response.body()
        if header_length is None:
            return Reply(200, payload)
        return Reply(200, payload, OCTETS, [(HEADER_LENGTH.lower().encode(), str(header_length).encode())])

    def _lookup(self, request: Request, rpc: str) -> ServedVersion:
        return self.dataplane.lookup(request.params["model"], request.params.get("version", ""), rpc)


# -- bodies --------------------------------------------------------------------------------------------------------


def _declared_length(request: Request) -> int | None:
    length = request.header("content-length")
    return int(length) if length is not None and length.isdigit() else None


def _json(document: Any, status: int = 200) -> Reply:
    return Reply(status, json_body(document))


def _error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return Reply(int(status), json_body({"error": client_message(message)}), JSON, headers or [], compressible=False)


def _optional_json(raw: bytes) -> dict[str, Any]:
    """A small JSON object body (repository calls); empty when there is none."""
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


def config_json(served: ServedVersion) -> dict[str, Any]:
    """Triton's ModelConfig as its HTTP endpoint writes it: proto field names, every field, 64-bit integers as JSON
    numbers (protobuf's JSON mapping writes them as strings, which perf_analyzer cannot read)."""
    config = build_model_config(served)
    document = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return _numbers(config.DESCRIPTOR, document)


def _numbers(descriptor: pb_descriptor.Descriptor, document: dict[str, Any]) -> dict[str, Any]:
    for item in descriptor.fields:
        if item.name not in document:
            continue
        value = document[item.name]
        if item.type in _INT64:
            document[item.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif item.message_type is not None:
            if item.message_type.GetOptions().map_entry:
                inner = item.message_type.fields_by_name["value"].message_type
                if inner is not None:
                    for key, entry in value.items():
                        value[key] = _numbers(inner, entry)
            elif isinstance(value, list):
                document[item.name] = [_numbers(item.message_type, entry) for entry in value]
            elif isinstance(value, dict):
                document[item.name] = _numbers(item.message_type, value)
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
