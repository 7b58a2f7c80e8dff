"""The transport ceiling: a bare grpc server with one generic unary handler that echoes the request.

It answers `ModelInfer` by turning the request's bytes into a valid ModelInferResponse carrying the same tensors
(a byte-level rewrite of the top-level fields: `raw_input_contents` (7) becomes `raw_output_contents` (6), the
requested-outputs field (6) is dropped), so nnserve's SDK, the raw load generator and perf_analyzer can all drive it
exactly as they drive a model server. The metadata RPCs perf_analyzer needs are answered with canned replies built
once at start. No protobuf parsing, no numpy, no batching: what is left is grpc's own cost per call.

Three flavours, so that the ceiling is the fastest bare echo and not just one: grpc.aio on asyncio's event loop
(nnserve's own stack), grpc.aio on uvloop (`--uvloop`), and grpc's synchronous server on a thread pool
(`--threads N`). A fourth, `--typed`, is not a ceiling but the floor under nnserve: its generated servicer and
decoding guard, with protobuf messages parsed and built per call, and no model path (no validation, batching,
onnxruntime or statistics), so that nnserve minus `--typed` is what serving a model costs.

Run as `python benchmarks/echo_server.py --port 8001 --model echo --width 4` (one process, Ctrl-C or SIGTERM stops).
Every flavour also serves grpc.health.v1 ("" SERVING once it listens), and `--port 0 --port-file FILE` picks a free
port and writes `{"pid": ..., "grpc": PORT}` there once bound, as `nnserve serve --port-file` does, so tests wait for
it the way they wait for nnserve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

_SERVICE = "inference.GRPCInferenceService"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def echo_response(request: bytes) -> bytes:
    """ModelInferRequest bytes -> ModelInferResponse bytes with the same model name, id, tensors and raw contents."""
    out = bytearray()
    pos = 0
    end = len(request)
    while pos < end:
        start = pos
        tag, pos = _varint(request, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(request, pos)
            pos += length
        elif wire == 0:
            _, pos = _varint(request, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if field == 6:  # requested outputs: no counterpart in the response
            continue
        if field == 7:  # raw_input_contents -> raw_output_contents, same wire type
            out.append((6 << 3) | 2)
            out += request[start + 1 : pos]
            continue
        out += request[start:pos]
    return bytes(out)


def canned_replies(model: str, width: int) -> dict[str, bytes]:
    """Serialized replies to the metadata RPCs (built with nnserve's generated protos, once)."""
    from nnserve.protos import grpc_service_pb2 as pb
    from nnserve.protos import model_config_pb2 as mc

    tensor = pb.ModelMetadataResponse.TensorMetadata(name="input", datatype="FP32", shape=[-1, width])
    metadata = pb.ModelMetadataResponse(name=model, versions=["1"], platform="echo", inputs=[tensor], outputs=[tensor])
    config = mc.ModelConfig(name=model, platform="echo", max_batch_size=1 << 20)
    config.input.add(name="input", data_type=mc.TYPE_FP32, dims=[width])
    config.output.add(name="input", data_type=mc.TYPE_FP32, dims=[width])
    stats = pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name=model, version="1")])
    return {
        "ServerLive": pb.ServerLiveResponse(live=True).SerializeToString(),
        "ServerReady": pb.ServerReadyResponse(ready=True).SerializeToString(),
        "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
        "ServerMetadata": pb.ServerMetadataResponse(name="echo", version="0").SerializeToString(),
        "ModelMetadata": metadata.SerializeToString(),
        "ModelConfig": pb.ModelConfigResponse(config=config).SerializeToString(),
        "ModelStatistics": stats.SerializeToString(),
    }


class EchoHandler(grpc.GenericRpcHandler):
    """Coroutine handlers for grpc.aio; plain functions for the synchronous server (`asynchronous=False`)."""

    def __init__(self, canned: dict[str, bytes], *, asynchronous: bool = True) -> None:
        async def infer_async(request: bytes, context: object) -> bytes:
            return echo_response(request)

        def infer_sync(request: bytes, context: object) -> bytes:
            return echo_response(request)

        def constant(reply: bytes):  # type: ignore[no-untyped-def]
            async def handler_async(request: bytes, context: object) -> bytes:
                return reply

            def handler_sync(request: bytes, context: object) -> bytes:
                return reply

            return handler_async if asynchronous else handler_sync

        infer = infer_async if asynchronous else infer_sync

        self._handlers = {f"/{_SERVICE}/ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
        for name, reply in canned.items():
            self._handlers[f"/{_SERVICE}/{name}"] = grpc.unary_unary_rpc_method_handler(constant(reply))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


def add_typed_echo(server: grpc.aio.Server, canned: dict[str, bytes]) -> None:
    """nnserve's registration (generated servicer, decoding guard) with an echo for ModelInfer."""
    from nnserve.protos import grpc_service_pb2 as pb
    from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
    from nnserve.server.decode_guard import GuardedRegistrar

    replies = {name: getattr(pb, f"{name}Response").FromString(data) for name, data in canned.items()}

    class TypedEcho(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
            return pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version or "1", id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                         for t in request.inputs],
                raw_output_contents=list(request.raw_input_contents),
            )

    servicer = TypedEcho()
    for name, reply in replies.items():
        async def answer(request: object, context: object, reply: object = reply) -> object:
            return reply

        setattr(servicer, name, answer)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, GuardedRegistrar(server))


def write_port_file(path: str | None, port: int) -> None:
    """The bound port for whoever started this process (temp file + rename: never read half-written)."""
    if path:
        target = Path(path)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "grpc": port}))
        os.replace(temporary, target)


async def serve(host: str, port: int, model: str, width: int, typed: bool = False,
                port_file: str | None = None) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    )
    if typed:
        add_typed_echo(server, canned_replies(model, width))
    else:
        server.add_generic_rpc_handlers((EchoHandler(canned_replies(model, width)),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    write_port_file(port_file, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def serve_threads(host: str, port: int, model: str, width: int, threads: int, port_file: str | None = None) -> None:
    """grpc's synchronous server: a thread pool runs the handlers, grpc's own thread polls the completion queue."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
    )
    server.add_generic_rpc_handlers((EchoHandler(canned_replies(model, width), asynchronous=False),))
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    write_port_file(port_file, bound)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (see --port-file)")
    parser.add_argument("--port-file", default=None, help="write {pid, grpc} here as JSON once listening")
    parser.add_argument("--model", default="echo")
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="> 0: grpc's synchronous server with this many threads")
    parser.add_argument("--uvloop", action="store_true", help="grpc.aio on uvloop's event loop instead of asyncio's")
    parser.add_argument("--typed", action="store_true", help="nnserve's servicer registration and protobuf messages")
    args = parser.parse_args()
    if args.threads > 0:
        serve_threads(args.host, args.port, args.model, args.width, args.threads, args.port_file)
        return
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.host, args.port, args.model, args.width, typed=args.typed, port_file=args.port_file))
        return
    asyncio.run(serve(args.host, args.port, args.model, args.width, typed=args.typed, port_file=args.port_file))


if __name__ == "__main__":
    main()
