"""The low-concurrency reference: a plain KServe v2 model server on grpc's synchronous thread-pool server.

What a microservice team writes in an afternoon, and what issue 18 measures nnserve's lone-client latency against:
`grpc.server(ThreadPoolExecutor(N))` with the generated servicer, one onnxruntime session per model, and ModelInfer
answered in the handler's own thread (`np.frombuffer` on the raw input, `session.run`, raw output contents). No
batching, no queue, no deadlines, no statistics beyond what perf_analyzer insists on, no drain.

It serves what `loadgen.py --client raw` and Triton's `perf_analyzer -i grpc` call: ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata, ModelConfig (max_batch_size and dims without the batch dimension),
ModelStatistics (one entry per model with its version and counts) and ModelInfer (raw contents), plus
grpc.health.v1 ("" SERVING once it listens).

The sessions get nnserve's own CPU options (intra-op threads from the cgroup quota, no spinning) unless
`--ort-defaults`, so that a comparison with nnserve is one of transports and request paths, not of onnxruntime
settings.

Run as `python benchmarks/sync_reference_server.py --port 8001 --model layer_4x3=repo/layer_4x3/1/model.onnx`
(`--model` repeats; `--port 0 --port-file FILE` picks a free port and writes `{"pid": ..., "grpc": PORT}` there
once bound, as `nnserve serve --port-file` does). SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.protos import model_config_pb2 as mc

_DATATYPES = {"tensor(float)": ("FP32", np.float32), "tensor(double)": ("FP64", np.float64),
              "tensor(float16)": ("FP16", np.float16), "tensor(int64)": ("INT64", np.int64),
              "tensor(int32)": ("INT32", np.int32)}


@dataclass
class Model:
    """One served model: its session, its signature and the counters perf_analyzer reads."""

    name: str
    session: ort.InferenceSession
    inputs: list[tuple[str, str, Any, list[int]]]
    """(name, v2 datatype, numpy dtype, shape with -1 for dynamic dimensions)."""
    outputs: list[tuple[str, str, Any, list[int]]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    success: int = 0
    success_ns: int = 0

    @classmethod
    def load(cls, name: str, path: str, ort_defaults: bool) -> Model:
        options = ort.SessionOptions()
        if not ort_defaults:
            from nnserve.server.cpu_quota import intra_op_threads

            options.intra_op_num_threads = intra_op_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        def describe(args: list[Any]) -> list[tuple[str, str, Any, list[int]]]:
            out = []
            for arg in args:
                datatype, dtype = _DATATYPES[arg.type]
                out.append((arg.name, datatype, dtype, [d if isinstance(d, int) else -1 for d in arg.shape]))
            return out

        return cls(name, session, describe(session.get_inputs()), describe(session.get_outputs()))


class ReferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Synchronous handlers: each runs on one of the pool's threads, ModelInfer included."""

    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models

    def _model(self, name: str, context: grpc.ServicerContext) -> Model:
        model = self.models.get(name)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
        return model  # type: ignore[return-value]

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="sync-reference", version="0")

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        model = self._model(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=["1"], platform="onnxruntime_onnx",
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, _, s in model.inputs],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, _, s in model.outputs])

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        model = self._model(request.name, context)
        config = mc.ModelConfig(name=model.name, platform="onnxruntime_onnx", max_batch_size=64)
        for n, d, _, s in model.inputs:
            config.input.add(name=n, data_type=mc.DataType.Value(f"TYPE_{d}"), dims=s[1:])
        for n, d, _, s in model.outputs:
            config.output.add(name=n, data_type=mc.DataType.Value(f"TYPE_{d}"), dims=s[1:])
        return pb.ModelConfigResponse(config=config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> pb.ModelStatisticsResponse:
        chosen = [self._model(request.name, context)] if request.name else list(self.models.values())
        stats = []
        for model in chosen:
            with model.lock:
                success, ns = model.success, model.success_ns
            stats.append(pb.ModelStatistics(
                name=model.name, version="1", inference_count=success, execution_count=success,
                inference_stats=pb.InferStatistics(success=pb.StatisticDuration(count=success, ns=ns))))
        return pb.ModelStatisticsResponse(model_stats=stats)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        model = self._model(request.model_name, context)
        raw = request.raw_input_contents
        if len(raw) != len(request.inputs) or len(raw) != len(model.inputs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send every input once, as raw_input_contents")
        feed = {}
        for tensor, data, (name, _, dtype, _) in zip(request.inputs, raw, model.inputs, strict=True):
            feed[name] = np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.shape))
        try:
            results = model.session.run(None, feed)
        except Exception as exc:  # a shape onnxruntime refuses: the caller's mistake here
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0][:300])
        response = pb.ModelInferResponse(
            model_name=model.name, model_version="1", id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=n, datatype=d, shape=r.shape)
                     for (n, d, _, _), r in zip(model.outputs, results, strict=True)],
            raw_output_contents=[r.tobytes() for r in results])
        elapsed = time.perf_counter_ns() - started
        with model.lock:
            model.success += 1
            model.success_ns += elapsed
        return response


def write_port_file(path: str | None, port: int) -> None:
    """The bound port for whoever started this process (temp file + rename: never read half-written)."""
    if path:
        target = Path(path)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": os.getpid(), "grpc": port}))
        os.replace(temporary, target)


def serve(host: str, port: int, models: dict[str, Model], threads: int, port_file: str | None = None) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceServicer(models), server)
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
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to serve: its name and its .onnx file (repeat for several)")
    parser.add_argument("--threads", type=int, default=16, help="the thread pool's size (grpc's max_workers)")
    parser.add_argument("--ort-defaults", action="store_true",
                        help="onnxruntime's default session options instead of nnserve's CPU options")
    args = parser.parse_args()
    models = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = Model.load(name, path, args.ort_defaults)
    serve(args.host, args.port, models, args.threads, args.port_file)


if __name__ == "__main__":
    main()
