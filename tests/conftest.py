"""Shared fixtures: model repositories built in the test session, and the real server on 127.0.0.1:0.

The in-process server runs on its own event loop in a background thread; the subprocess one
is `nnserve serve` itself. Both are awaited through the gRPC health service, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from nnserve.builder import build
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.app import InferenceServer, create_server
from nnserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STARTUP_TIMEOUT_S = 30.0

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
}


# ---------------------------------------------------------------------------------------------------------------
# Models: plain ONNX, written into tmp_path repositories.


def finish_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """IR 10 / opset 21: what the pinned onnxruntime loads (onnx 1.23 would write IR 14)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def dense_model(weights: np.ndarray, bias: np.ndarray, activation: str = "linear") -> onnx.ModelProto:
    """y = act(x @ W + b) with a dynamic batch dimension; W has shape (inputs, outputs)."""
    n_in, n_out = weights.shape
    nodes = [helper.make_node("Gemm", ["input", "W", "b"], ["z"])]
    if activation == "linear":
        nodes.append(helper.make_node("Identity", ["z"], ["output"]))
    else:
        nodes.append(helper.make_node({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}[activation], ["z"],
                                      ["output"]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    return finish_model(graph)


def multi_io_model() -> onnx.ModelProto:
    """Two inputs of different datatypes, two outputs: sum = a + float(b) (FP32), doubled = 2 * int64(b) (INT64)."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("Cast", ["b"], ["b_long"], to=TensorProto.INT64),
        helper.make_node("Add", ["b_long", "b_long"], ["doubled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT8, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 3]),
        ],
    )
    return finish_model(graph)


def fixed_shape_model() -> onnx.ModelProto:
    """No batch dimension: input [2, 3] -> Relu -> output [2, 3] (served with max_batch_size 0)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return finish_model(graph)


def scale_model(dtype: np.dtype[Any], factor: float, width: int = 4) -> onnx.ModelProto:
    """y = factor * x for a dtype (FP16, FP64, ...), dynamic batch."""
    elem = _ONNX_TYPES[np.dtype(dtype)]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", elem, ["batch", width])],
        [helper.make_tensor_value_info("y", elem, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array([factor], dtype=dtype), "k")],
    )
    return finish_model(graph)


def chain_model(weights: np.ndarray, depth: int) -> onnx.ModelProto:
    """output = tanh(... tanh(tanh(input @ W) @ W) ...), depth times: CPU work that grows with width and depth."""
    nodes = []
    current = "input"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [current, "W"], [f"m{i}"]))
        out = "output" if i == depth - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        current = out
    width = weights.shape[0]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return finish_model(graph)


def slow_model(width: int = 256, depth: int = 64) -> onnx.ModelProto:
    """A chain reusing one fixed random weight matrix: CPU work that grows with depth, from a small file."""
    rng = np.random.default_rng(0)
    return chain_model((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), depth)


def gather_model() -> onnx.ModelProto:
    """output = table[index]: an index out of range fails inside onnxruntime at run time, not in validation."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"])],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "table")],
    )
    return finish_model(graph)


def string_identity_model(width: int = 2) -> onnx.ModelProto:
    """BYTES in, BYTES out: text [batch, width] -> Identity -> same [batch, width]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", width])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", width])],
    )
    return finish_model(graph)


LABEL_KEYS = ["cat", "dog", "größe", ""]
"""The label model's vocabulary: word -> id (its index, -1 for anything else) -> class name (`CLASS_NAMES`)."""
CLASS_NAMES = ["Katze", "Hund", "ß-Wort", "leer"]
UNKNOWN_CLASS = "?"


def string_label_model() -> onnx.ModelProto:
    """A mixed model (ai.onnx.ml LabelEncoder): word BYTES [batch] and score FP32 [batch, 2] in; id INT64 [batch]
    (the word's index in LABEL_KEYS, -1 if absent), name BYTES [batch] (CLASS_NAMES[id], "?" if -1) and
    scaled FP32 [batch, 2] (2 x score) out."""
    graph = helper.make_graph(
        [
            helper.make_node("LabelEncoder", ["word"], ["id"], domain="ai.onnx.ml", keys_strings=LABEL_KEYS,
                             values_int64s=list(range(len(LABEL_KEYS))), default_int64=-1),
            helper.make_node("LabelEncoder", ["id"], ["name"], domain="ai.onnx.ml",
                             keys_int64s=list(range(len(CLASS_NAMES))), values_strings=CLASS_NAMES,
                             default_string=UNKNOWN_CLASS),
            helper.make_node("Mul", ["score", "two"], ["scaled"]),
        ],
        "labels",
        [helper.make_tensor_value_info("word", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("id", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("name", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([2.0], dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 4)],
                              ir_version=10)
    onnx.checker.check_model(model)
    return model


def label_reference(words: Sequence[str], scores: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Independent forward pass of `string_label_model`."""
    ids = np.array([LABEL_KEYS.index(w) if w in LABEL_KEYS else -1 for w in words], dtype=np.int64)
    names = [CLASS_NAMES[i] if i >= 0 else UNKNOWN_CLASS for i in ids]
    return ids, names, scores.astype(np.float32) * 2


def write_model(
    repository: Path, name: str, model: onnx.ModelProto | bytes, *, version: int = 1,
    config: Mapping[str, Any] | None = None,
) -> Path:
    path = repository / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if config is not None:
        (repository / name / "config.json").write_text(json.dumps(config))
    return path


DENSE_W = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 0.1]], dtype=np.float32)
DENSE_B = np.array([0.1, -0.2], dtype=np.float32)


def dense_reference(x: np.ndarray) -> np.ndarray:
    """Independent numpy forward pass of the `dense` test model."""
    return x.astype(np.float64) @ DENSE_W.astype(np.float64) + DENSE_B


def standard_repository(root: Path) -> Path:
    """The repository most tests share: seed networks from examples/ plus models for every feature."""
    root.mkdir(parents=True, exist_ok=True)
    for spec in sorted(EXAMPLES.glob("*.json")):
        build(spec, root)
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    write_model(root, "multi_io", multi_io_model())
    write_model(root, "fixed", fixed_shape_model())
    write_model(root, "gather", gather_model(), config={"dynamic_batching": {"enabled": False}})
    write_model(root, "fp16", scale_model(np.dtype(np.float16), 2.0))
    write_model(root, "fp64", scale_model(np.dtype(np.float64), -3.0))
    write_model(root, "strings", string_identity_model(), config={"max_batch_size": 8})
    write_model(root, "unbatched_cfg", scale_model(np.dtype(np.float32), 1.5),
                config={"max_batch_size": 0, "dynamic_batching": {"enabled": False}})
    write_model(root, "versioned", scale_model(np.dtype(np.float32), 1.0), version=1,
                config={"version_policy": {"all": True}})
    write_model(root, "versioned", scale_model(np.dtype(np.float32), 2.0), version=2)
    write_model(root, "versioned", scale_model(np.dtype(np.float32), 3.0), version=3)
    return root


# ---------------------------------------------------------------------------------------------------------------
# The in-process server.


@dataclass
class RunningServer:
    """A server started on its own event loop thread; `call` runs a coroutine there."""

    app: InferenceServer
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stub(self, **options: Any) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(self.address, options=list(options.items()))
        self.channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    def health(self) -> health_pb2_grpc.HealthStub:
        channel = grpc.insecure_channel(self.address)
        self.channels.append(channel)
        return health_pb2_grpc.HealthStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        try:
            self.call(self.app.stop(grace=5.0), timeout=30.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10.0)


@contextmanager
def running_server(repository: Path, *, health_service: str = "", tracing: Any = None,
                   **overrides: Any) -> Iterator[RunningServer]:
    """Start the real server (grpc.aio, onnxruntime) on 127.0.0.1:0; wait for health; stop on exit.

    Waits until `health_service` ("" is the whole server) is SERVING. `tracing`: a `nnserve.server.tracing.Tracing`
    for the server to trace with (off by default).
    """
    settings = ServerSettings(**{"model_repository": repository, "host": "127.0.0.1", "grpc_port": 0,
                                 "http_port": None, "metrics_port": None, **overrides})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nnserve-test-server", daemon=True)
    thread.start()

    async def start() -> tuple[InferenceServer, int]:
        app, port = await create_server(settings, tracing=tracing)
        await app.start()
        return app, port

    try:
        app, port = asyncio.run_coroutine_threadsafe(start(), loop).result(STARTUP_TIMEOUT_S)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        raise
    server = RunningServer(app, port, loop, thread)
    try:
        wait_for_health(server.address, health_service)
        yield server
    finally:
        server.close()


def wait_for_health(address: str, service: str = "", timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Block on grpc.health.v1 Watch until `service` is SERVING (the stream pushes each change)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        responses = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True)
        for response in responses:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                responses.cancel()
                return
    raise AssertionError(f"health of {service!r} at {address} never became SERVING")


@pytest.fixture(scope="session")
def standard_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standard_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def server(standard_repo: Path) -> Iterator[RunningServer]:
    """One shared server over the standard repository (tests must not change its models); metrics on a free port."""
    with running_server(standard_repo, metrics_port=0) as running:
        yield running


@pytest.fixture
def stub(server: RunningServer) -> pb_grpc.GRPCInferenceServiceStub:
    return server.stub()


# ---------------------------------------------------------------------------------------------------------------
# Requests.


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    request_id: str = "",
    outputs: Sequence[str] = (),
    datatypes: Mapping[str, str] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying numpy arrays as raw_input_contents."""
    from nnserve.server.tensors import datatype_of

    tensors = [
        pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=(datatypes or {}).get(name) or datatype_of(array.dtype), shape=array.shape
        )
        for name, array in inputs.items()
    ]
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=tensors,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[np.ascontiguousarray(a).tobytes() for a in inputs.values()],
    )


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    from nnserve.server.tensors import DATATYPES

    return {
        tensor.name: np.frombuffer(raw, dtype=DATATYPES[tensor.datatype]).reshape(tuple(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


# ---------------------------------------------------------------------------------------------------------------
# `nnserve serve` as a subprocess.


@dataclass
class ServeProcess:
    """A server subprocess and what it reported about itself (its port file: `grpc`, `metrics`, `pid`, ...)."""

    process: subprocess.Popen[str]
    ports: dict[str, Any]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.ports["grpc"])

    @property
    def metrics_port(self) -> int | None:
        port = self.ports.get("metrics")
        return None if port is None else int(port)

    @property
    def http_port(self) -> int | None:
        port = self.ports.get("http")
        return None if port is None else int(port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


def free_port() -> int:
    """A port free at this moment; only for checks that need no server on it. To start a server, pass port 0 and
    read the port it reports (`start_server_process`); to have nothing listen, use `held_port`."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def held_port() -> Iterator[int]:
    """A loopback port bound by the test but not listening: every connection to it is refused, and nothing else can
    take it, until a server started with SO_REUSEPORT (`reuse_port=True`) listens on it beside this socket. Use it
    for "no server there" checks instead of a port that was free a moment ago."""
    import socket

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


def serve_command(repository: Path, port_file: Path, *extra: str) -> list[str]:
    """`nnserve serve` on free ports (0), reporting them in `port_file`; HTTP and metrics off unless `extra` says
    otherwise (a later flag wins)."""
    return [sys.executable, "-m", "nnserve", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "off", "--metrics-port", "off", "--port-file", str(port_file), *extra]


def read_port_file(port_file: Path, process: subprocess.Popen[Any], log_path: Path,
                   timeout: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
    """The ports a starting server reports once it has bound them; fails at once if the process exits first.

    The file appears by rename, so it is complete when it exists; only its appearance is polled, with a deadline.
    """
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}) before reporting its ports:\n"
                                 f"{log_path.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the server reported no ports within {timeout} s:\n"
                                 f"{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.01)
    reported: dict[str, Any] = json.loads(port_file.read_text())
    return reported


@contextmanager
def start_server_process(
    command: Sequence[str], log_path: Path, port_file: Path, *, env: Mapping[str, str] | None = None,
    wait: bool = True, health_service: str = "", cwd: Path | None = None,
) -> Iterator[ServeProcess]:
    """The one way tests start a server subprocess: run `command` (which must write `port_file`), learn its ports
    from it, and (with `wait`) wait on its grpc.health.v1 service with a deadline; killed if a test leaves it
    running."""
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            list(command), stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        running = ServeProcess(process, read_port_file(port_file, process, log_path), log_path)
        if wait:
            try:
                wait_for_health(running.address, health_service)
            except grpc.RpcError:
                raise AssertionError(f"the server did not become healthy:\n{running.log()}") from None
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def serve_process(
    repository: Path, log_path: Path, *extra: str, env: Mapping[str, str] | None = None, wait: bool = True
) -> Iterator[ServeProcess]:
    """Run `nnserve serve` (the real CLI) on free ports and wait on its health service."""
    port_file = log_path.with_suffix(".ports.json")
    with start_server_process(serve_command(repository, port_file, *extra), log_path, port_file, env=env,
                              wait=wait) as running:
        yield running


def run_in_threads(fn: Callable[[], Any], count: int) -> list[Future[Any]]:
    """Start `count` calls of `fn` on their own threads; the futures settle as each returns."""
    futures: list[Future[Any]] = []
    for _ in range(count):
        future: Future[Any] = Future()

        def target(f: Future[Any] = future) -> None:
            try:
                f.set_result(fn())
            except BaseException as exc:
                f.set_exception(exc)

        threading.Thread(target=target, daemon=True).start()
        futures.append(future)
    return futures


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition the server exposes no event for (bounded; fails the test when it times out)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
