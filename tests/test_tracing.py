"""Tracing's span structure, in-process: the real server, the real OpenTelemetry SDK, its in-memory exporter.

Each test starts a server that traces through `Tracing` with the SDK's `InMemorySpanExporter` in place of OTLP
(the export path, `CountingSpanProcessor` and the SDK's batch processor, is the production one) and sends real
gRPC or HTTP requests carrying W3C `traceparent` headers. `test_tracing_export.py` sends the same spans over
OTLP/gRPC to a real receiver from a `nnserve serve` process.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.tracing import Tracing
from nnserve.server.tracing_config import TracingConfig
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    infer_request,
    running_server,
    wait_until,
    write_model,
)

BATCH = 8
"""Rows (and requests) of the batched model's one batch: it closes when full, long before its 10 s window."""
STAGES = ("decode", "queue", "compute", "encode")
TIMEOUT_S = 30.0
INPUT = "input"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracing-repository")
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    # A batch waits up to 10 s for companions and closes as soon as it holds BATCH rows.
    write_model(root, "gathered", dense_model(DENSE_W, DENSE_B), config={
        "max_batch_size": BATCH, "dynamic_batching": {"max_queue_delay_us": 10_000_000, "delay_mode": "fixed",
                                                      "preferred_batch_sizes": [BATCH]}})
    write_model(root, "alone", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 0,
                                                                     "dynamic_batching": {"enabled": False}})
    return root


class Traced:
    """A running server and the spans it exported."""

    def __init__(self, server: RunningServer, tracing: Tracing, exporter: InMemorySpanExporter) -> None:
        self.server = server
        self.tracing = tracing
        self.exporter = exporter

    def spans(self) -> list[ReadableSpan]:
        assert self.tracing.force_flush(TIMEOUT_S), "the span exporter did not flush"
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module")
def traced(repository: Path) -> Iterator[Traced]:
    """The default sampler (parent-based, 1% of roots): a caller's sampled context is always followed."""
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingConfig(exporters=("otlp",)), exporter=exporter)
    with running_server(repository, tracing=tracing, http_port=0) as server:
        yield Traced(server, tracing, exporter)


@pytest.fixture
def fresh(traced: Traced) -> Traced:
    traced.spans()
    traced.exporter.clear()
    return traced


def traceparent(trace: int, span: int, sampled: bool = True) -> str:
    return f"00-{trace:032x}-{span:016x}-{'01' if sampled else '00'}"


def rows(count: int = 1, value: float = 0.5) -> np.ndarray:
    return np.full((count, DENSE_W.shape[0]), value, dtype=np.float32)


def grpc_infer(server: RunningServer, model: str, header: str | None, **kwargs: Any) -> pb.ModelInferResponse:
    metadata = [] if header is None else [("traceparent", header)]
    stub = server.stub()
    return stub.ModelInfer(infer_request(model, {INPUT: rows()}, **kwargs), metadata=metadata, timeout=TIMEOUT_S)


def server_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    found = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}
    assert len(found) == len([s for s in spans if s.parent is not None
                              and s.parent.span_id == parent.context.span_id]), "a stage was recorded twice"
    return found


def check_request_tree(spans: list[ReadableSpan], trace_id: int, parent_id: int) -> ReadableSpan:
    """The one server span of `trace_id`: child of the caller's span, with the four stages as its children."""
    mine = [s for s in server_spans(spans) if s.context.trace_id == trace_id]
    assert len(mine) == 1, [s.name for s in spans]
    span = mine[0]
    assert span.parent is not None
    assert span.parent.span_id == parent_id
    assert span.parent.is_remote
    stages = children(spans, span)
    assert set(stages) == set(STAGES)
    assert all(stage.context.trace_id == trace_id for stage in stages.values())
    assert span.start_time is not None
    assert span.end_time is not None
    for stage in stages.values():  # every stage lies inside the request's span
        assert stage.start_time is not None
        assert stage.end_time is not None
        assert span.start_time <= stage.start_time <= stage.end_time <= span.end_time
    return span


def test_grpc_request_span_joins_the_callers_trace(fresh: Traced) -> None:
    trace_id, parent_id = 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321, 0x00F0_67AA_0BA9_02B7
    grpc_infer(fresh.server, "dense", traceparent(trace_id, parent_id))
    spans = fresh.spans()
    span = check_request_tree(spans, trace_id, parent_id)
    assert span.name == "inference.GRPCInferenceService/ModelInfer"
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.method"] == "ModelInfer"
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert attributes["nnserve.model.name"] == "dense"
    assert attributes["nnserve.model.version"] == "1"
    assert attributes["nnserve.request.rows"] == 1
    assert attributes["nnserve.outcome"] == "success"
    assert attributes["nnserve.provider"] == "CPUExecutionProvider"
    assert span.status.status_code is StatusCode.UNSET


def test_http_request_span_joins_the_callers_trace(fresh: Traced) -> None:
    trace_id, parent_id = 0xABCD_0000_0000_0000_0000_0000_0000_0001, 0x1111_2222_3333_4444
    body = {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": [1, DENSE_W.shape[0]],
                        "data": rows().ravel().tolist()}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{fresh.server.app.http_port}/v2/models/dense/versions/1/infer",
        data=json.dumps(body).encode(), method="POST",
        headers={"traceparent": traceparent(trace_id, parent_id), "tracestate": "vendor=opaque"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.status == 200
    span = check_request_tree(fresh.spans(), trace_id, parent_id)
    assert span.name == "POST /v2/models/{model}/versions/{version}/infer"
    attributes = dict(span.attributes or {})
    assert attributes["http.route"] == "/v2/models/{model}/versions/{version}/infer"
    assert attributes["http.response.status_code"] == 200
    assert span.context.trace_state.get("vendor") == "opaque"  # the caller's tracestate travels on


def test_unsampled_callers_and_unsampled_roots_export_nothing(fresh: Traced) -> None:
    """A caller that did not sample says so in its flags; without a context, 1% of roots start a trace (the
    SDK's ratio sampler decides on the trace id, which is random: a run of requests can hold a sampled one, so
    only the caller's decision is asserted here, with no root requests)."""
    for index in range(5):
        grpc_infer(fresh.server, "dense", traceparent(0x77 + index, 0x99, sampled=False))
    assert fresh.spans() == []
    assert fresh.tracing.counts.snapshot()[1] == {"queue_full": 0, "export_failed": 0, "shutdown": 0}


def test_one_batch_span_links_to_every_sampled_request_it_served(fresh: Traced) -> None:
    """BATCH concurrent requests, half of them sampled by their callers: one execution (the statistics say so),
    and one batch span in a trace of its own, linked to the sampled request spans and to no other."""
    server = fresh.server
    before = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="gathered"), timeout=TIMEOUT_S)
    headers = [traceparent(0x5000 + i, 0x600 + i, sampled=i % 2 == 0) for i in range(BATCH)]
    with ThreadPoolExecutor(BATCH) as pool:
        list(pool.map(lambda header: grpc_infer(server, "gathered", header), headers))
    after = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="gathered"), timeout=TIMEOUT_S)
    executions = after.model_stats[0].execution_count - before.model_stats[0].execution_count
    inferences = after.model_stats[0].inference_count - before.model_stats[0].inference_count
    assert (executions, inferences) == (1, BATCH), "the requests did not share one batch"

    spans = fresh.spans()
    batches = [s for s in spans if s.name == "batch"]
    assert len(batches) == 1
    batch = batches[0]
    assert batch.parent is None  # it roots its own trace
    sampled = {0x5000 + i for i in range(0, BATCH, 2)}
    requests = server_spans(spans)
    assert {s.context.trace_id for s in requests} == sampled
    assert {(link.context.trace_id, link.context.span_id) for link in batch.links} == \
        {(s.context.trace_id, s.context.span_id) for s in requests}
    attributes = dict(batch.attributes or {})
    assert attributes["nnserve.batch.rows"] == BATCH
    assert attributes["nnserve.batch.requests"] == BATCH
    assert attributes["nnserve.batch.sampled_requests"] == len(sampled)
    assert attributes["nnserve.batch.instance"] == 0
    assert attributes["nnserve.model.name"] == "gathered"
    assert attributes["nnserve.outcome"] == "success"
    batch_id = f"{batch.context.span_id:016x}"
    for request in requests:  # each request records its batch: by attribute, and by a link from its compute span
        assert (request.attributes or {})["nnserve.batch.span_id"] == batch_id
        assert (request.attributes or {})["nnserve.batch.requests"] == BATCH
        compute = children(spans, request)["compute"]
        assert [link.context.span_id for link in compute.links] == [batch.context.span_id]


def test_a_request_run_without_a_batch_gets_its_compute_span_as_a_child(fresh: Traced) -> None:
    trace_id, parent_id = 0xA1, 0xB2
    grpc_infer(fresh.server, "alone", traceparent(trace_id, parent_id))
    spans = fresh.spans()
    assert [s.name for s in spans if s.name == "batch"] == []
    request = check_request_tree(spans, trace_id, parent_id)
    assert "nnserve.batch.span_id" not in (request.attributes or {})
    assert children(spans, request)["compute"].links == ()


def test_a_refused_request_records_its_error(fresh: Traced) -> None:
    trace_id = 0xE1
    with pytest.raises(grpc.RpcError) as refused:
        fresh.server.stub().ModelInfer(infer_request("dense", {"not_an_input": rows()}),
                                       metadata=[("traceparent", traceparent(trace_id, 0xE2))], timeout=TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (span,) = server_spans(fresh.spans())
    assert span.context.trace_id == trace_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "invalid"
    attributes = dict(span.attributes or {})
    assert attributes["nnserve.outcome"] == "invalid"
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [event.name for event in span.events] == ["exception"]
    assert "not_an_input" not in repr(span.to_json())  # the message quotes the name; the span does not


def test_a_request_expiring_in_the_queue_records_the_deadline(fresh: Traced) -> None:
    """Alone in the 10 s window of `gathered`, a request with a 0.5 s deadline expires unexecuted."""
    with pytest.raises(grpc.RpcError) as expired:
        fresh.server.stub().ModelInfer(infer_request("gathered", {INPUT: rows()}),
                                       metadata=[("traceparent", traceparent(0xD1, 0xD2))], timeout=0.5)
    assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's own timer ends its call at the deadline; the server ends the request's span when its expiry
    # reaches the handler, which can be moments later on a busy machine.
    wait_until(lambda: server_spans(fresh.spans()) != [], TIMEOUT_S, "the server to end the expired request's span")
    (span,) = server_spans(fresh.spans())
    attributes = dict(span.attributes or {})
    assert attributes["nnserve.outcome"] == "deadline"
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert attributes["nnserve.model.name"] == "gathered"


def _opentelemetry_calls(server: RunningServer, header: str) -> list[str]:
    """The OpenTelemetry functions the server's event loop thread ran while it answered 10 requests."""
    calls: list[str] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and "opentelemetry" in frame.f_code.co_filename:
            calls.append(frame.f_code.co_qualname)

    async def set_profile(function: Any) -> None:
        sys.setprofile(function)  # the loop's own thread, where frontends, data plane and batcher run

    server.call(set_profile(profile))
    try:
        for _ in range(10):
            grpc_infer(server, "dense", header)
    finally:
        server.call(set_profile(None))
    return calls


def test_tracing_off_makes_no_opentelemetry_call_on_the_request_path(repository: Path, traced: Traced) -> None:
    """Even for a request whose caller sampled it. The same probe on the traced server sees the SDK at work."""
    header = traceparent(0xF00D, 0xF1)
    with running_server(repository) as plain:
        assert plain.app.dataplane.tracing is None
        assert _opentelemetry_calls(plain, header) == []
    assert _opentelemetry_calls(traced.server, header) != []


@pytest.fixture(scope="module")
def traced_threads(repository: Path) -> Iterator[Traced]:
    """The same tracing on the threaded gRPC transport (`--grpc-transport threads`)."""
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingConfig(exporters=("otlp",)), exporter=exporter)
    with running_server(repository, tracing=tracing, grpc_transport="threads") as server:
        yield Traced(server, tracing, exporter)


@pytest.mark.parametrize(("model", "trace_id"), [("dense", 0x7E01), ("alone", 0x7E02)])
def test_the_threaded_grpc_transport_traces_requests_the_same_way(traced_threads: Traced, model: str,
                                                                   trace_id: int) -> None:
    """A lone request on the threaded transport runs from its pool thread (no hop to the loop): its span still
    joins the caller's trace with the four stages, as on grpc.aio."""
    traced_threads.spans()
    traced_threads.exporter.clear()
    parent_id = 0x7F
    grpc_infer(traced_threads.server, model, traceparent(trace_id, parent_id))
    span = check_request_tree(traced_threads.spans(), trace_id, parent_id)
    assert span.name == "inference.GRPCInferenceService/ModelInfer"
    attributes = dict(span.attributes or {})
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert attributes["nnserve.model.name"] == model
    assert attributes["nnserve.outcome"] == "success"
