"""Tracing end to end: `nnserve serve` configured by OTEL_* variables, exporting OTLP/gRPC to a real receiver.

The receiver is opentelemetry-proto's TraceService, served by the test on 127.0.0.1: what a collector runs. The
spans are read from what it received once the server has exited (a server that traces flushes its spans when it
stops), so no test waits for an export by time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nnserve.client import AsyncInferenceClient, InferenceClient
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    ServeProcess,
    dense_model,
    infer_request,
    serve_command,
    serve_process,
    wait_until,
    write_model,
)

TIMEOUT_S = 30.0
HOLD_S = 60.0
"""Longest the blocking receiver holds an export before giving up by itself (the test releases it far sooner)."""
SECRET = "SECRET-7f3a"
"""Put in request ids, parameters and a model name: none of it may reach a span."""
SERVER_KIND = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on 127.0.0.1; `hold()` makes every export wait until `release()`."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._gate: threading.Event | None = None
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.calls += 1
            gate = self._gate
        if gate is not None:
            gate.wait(HOLD_S)
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def hold(self) -> None:
        self._gate = threading.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def stop(self) -> None:
        self.release()
        self._server.stop(0).wait(TIMEOUT_S)

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return [span for request in self.requests for resource in request.resource_spans
                    for scope in resource.scope_spans for span in scope.spans]

    def wire(self) -> bytes:
        with self._lock:
            return b"".join(request.SerializeToString() for request in self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracing-export-repository")
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    return root


def x() -> np.ndarray:
    return np.full((1, DENSE_W.shape[0]), 0.25, dtype=np.float32)


def tracing_env(receiver: Receiver, **more: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100", **more}


def infer(running: ServeProcess, *, traceparent: str | None = None, model: str = "dense", **kwargs: Any) -> Any:
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = [] if traceparent is None else [("traceparent", traceparent)]
        return stub.ModelInfer(infer_request(model, {"input": x()}, **kwargs), metadata=metadata, timeout=TIMEOUT_S)


def stop(running: ServeProcess) -> int:
    running.terminate()
    return running.process.wait(timeout=60)


def scrape(running: ServeProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, sample: str) -> float:
    """The value of one sample, `name{labels}` exactly as the exposition writes it."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} is not in the metrics")


SUCCEEDED = 'nnserve_requests_total{model="dense",outcome="success",version="1"}'


def test_spans_reach_an_otlp_receiver_in_the_sdk_callers_traces_without_request_values(
    tmp_path: Path, repository: Path, receiver: Receiver
) -> None:
    """Both SDK clients carry a traced application's context: the server's spans are children of its spans."""
    app_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app_spans))
    tracer = provider.get_tracer("application")
    env = tracing_env(receiver, OTEL_SERVICE_NAME="nnserve-under-test")
    with serve_process(repository, tmp_path / "serve.log", "--metrics-port", "0", env=env) as running:
        with tracer.start_as_current_span("sync-call"), InferenceClient(running.address) as client:
            client.infer("dense", {"input": x()}, request_id=SECRET, parameters={SECRET: SECRET}, timeout=TIMEOUT_S)

        async def call_async() -> None:
            async with AsyncInferenceClient(running.address) as client:
                await client.infer("dense", {"input": x()}, request_id=SECRET, timeout=TIMEOUT_S)

        with tracer.start_as_current_span("async-call"):
            asyncio.run(call_async())
        sampled = "00-0000000000000000000000000000beef-00000000000000aa-01"
        with pytest.raises(grpc.RpcError) as unknown:
            infer(running, traceparent=sampled, model=SECRET)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        assert "nnserve_trace_spans_exported_total" in scrape(running)
        assert stop(running) == 0
    assert "tracing: on, OTLP/grpc to " + receiver.endpoint in running.log()

    resources = [r.resource for request in receiver.requests for r in request.resource_spans]
    assert resources
    assert all({a.key: a.value.string_value for a in r.attributes}["service.name"] == "nnserve-under-test"
               for r in resources)
    servers = [s for s in receiver.spans() if s.kind == SERVER_KIND]
    for app_span in app_spans.get_finished_spans():
        context = app_span.get_span_context()
        children = [s for s in servers if s.trace_id == context.trace_id.to_bytes(16, "big")]
        assert len(children) == 1, app_span.name
        assert children[0].parent_span_id == context.span_id.to_bytes(8, "big")
    refused = [s for s in servers if s.trace_id == (0xBEEF).to_bytes(16, "big")]
    assert len(refused) == 1
    assert {a.key: a.value.string_value for a in refused[0].attributes}["nnserve.outcome"] == "not_found"
    assert SECRET.encode() not in receiver.wire()  # no request id, parameter or unknown name in any span


def test_tracing_off_exports_nothing(tmp_path: Path, repository: Path, receiver: Receiver) -> None:
    """OTEL_TRACES_EXPORTER=none beside an endpoint (an operator-injected one): no span, no tracing metrics."""
    env = tracing_env(receiver, OTEL_TRACES_EXPORTER="none")
    with serve_process(repository, tmp_path / "serve.log", "--metrics-port", "0", env=env) as running:
        for _ in range(3):
            infer(running, traceparent="00-0000000000000000000000000000abcd-00000000000000ab-01")
        assert "nnserve_trace_spans" not in scrape(running)
        assert stop(running) == 0
    assert receiver.calls == 0
    assert "tracing: on" not in running.log()


def test_requests_complete_while_the_collector_blocks_and_after_it_is_gone(
    tmp_path: Path, repository: Path, receiver: Receiver
) -> None:
    """Every export waits on the receiver until the test releases it: requests are not slowed into failure, the
    spans that do not fit the export queue are counted as dropped; then the receiver goes away, requests still
    complete, and the server still stops within its grace period."""
    receiver.hold()
    env = tracing_env(receiver, OTEL_TRACES_SAMPLER="always_on", OTEL_BSP_MAX_QUEUE_SIZE="16",
                      OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8", OTEL_EXPORTER_OTLP_TIMEOUT="30")
    with serve_process(repository, tmp_path / "serve.log", "--metrics-port", "0", "--grace-period", "2",
                       env=env) as running:
        for _ in range(20):
            infer(running)
        wait_until(lambda: receiver.calls >= 1, TIMEOUT_S, "an export to reach the receiver")
        for _ in range(40):  # the receiver holds that export: these spans have nowhere to go
            infer(running)
        text = scrape(running)
        assert metric(text, 'nnserve_trace_spans_dropped_total{reason="queue_full"}') > 0
        assert metric(text, SUCCEEDED) == 60
        receiver.stop()  # released, then gone
        for _ in range(20):
            infer(running)
        assert metric(scrape(running), SUCCEEDED) == 80
        assert stop(running) == 0


def test_otel_variables_without_the_packages_are_a_clear_start_up_error(tmp_path: Path, repository: Path) -> None:
    """A package named `opentelemetry` that fails to import stands in for an environment without the extra."""
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("opentelemetry is hidden by the test")\n')
    path = os.pathsep.join(p for p in (str(shadow.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    command = serve_command(repository, tmp_path / "ports.json")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set" in done.stderr
    assert "nnserve[tracing]" in done.stderr
