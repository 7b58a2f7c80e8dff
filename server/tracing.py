"""Distributed tracing with OpenTelemetry: a span per sampled request, a span per batch linked to every one it served.

Only imported when `tracing_config` says tracing is on (the packages are the `nnserve[tracing]` extra); with
tracing off the request path holds `None` where a `RequestTrace` would be and makes no OpenTelemetry call.

A sampled request (its caller's `traceparent` says sampled, or the root sampler picked it) gets a SERVER span that
joins the caller's trace, from receipt to its response being ready, with child spans `decode`, `queue`, `compute`
and `encode` built when it ends from the same clock readings as the statistics (so a trace and ModelStatistics
never disagree, and the stages cost no spans until the request is done). A request that was executed in a batch
gets a `batch` span of its own, started when the batch is dispatched, with a link to every sampled request span it
served; each of those requests records the batch (attributes on its span, and a link from its `compute` span).

The batch span roots a trace of its own rather than joining the first sampled request's: a batch serves requests
of many traces equally, and hanging it under one of them would put the other callers' work into that caller's
trace and leave the rest with a dangling reference (the README's Tracing section argues it in full). It is sampled
whenever it links to a sampled request (`_NnserveSampler`), whatever the root ratio.

Contexts are passed explicitly (`start_span(context=...)`), never attached: nothing here depends on context
variables, which `loop.run_in_executor` would not carry to a batch's thread anyway, and no span is ever current.
Attributes carry only what the server itself decides: model and version names as served, counts, the provider, the
outcome and the status code; never a request id, a parameter or a message that could quote a request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from nnserve import __version__
from nnserve.server.errors import ServingError
from nnserve.server.frontends.status import CLIENT_CLOSED_REQUEST, grpc_status, http_status
from nnserve.server.tracing_config import TracingConfig
from nnserve.server.tracing_export import CountingSpanProcessor, SpanCounts

if TYPE_CHECKING:
    from nnserve.server.batcher import BatchOutcome
    from nnserve.server.repository import ServedVersion
    from nnserve.server.timing import RequestTiming

log = logging.getLogger(__name__)

GRPC_SERVICE = "inference.GRPCInferenceService"
_CONTEXT_HEADERS = ("traceparent", "tracestate")
_GRPC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": GRPC_SERVICE}
_ROOT = Context()

# Attribute keys: OpenTelemetry's RPC and HTTP conventions, and nnserve's own under `nnserve.`.
MODEL, VERSION, PROVIDER, ROWS, OUTCOME = ("nnserve.model.name", "nnserve.model.version", "nnserve.provider",
                                          "nnserve.request.rows", "nnserve.outcome")
BATCH_ROWS, BATCH_REQUESTS, BATCH_SAMPLED, BATCH_INSTANCE, BATCH_INLINE = (
    "nnserve.batch.rows", "nnserve.batch.requests", "nnserve.batch.sampled_requests", "nnserve.batch.instance",
    "nnserve.batch.inline")
BATCH_TRACE_ID, BATCH_SPAN_ID, BATCH_COMPUTE_US = ("nnserve.batch.trace_id", "nnserve.batch.span_id",
                                                   "nnserve.batch.compute_us")


class Tracing:
    """The tracer provider of one server process, and where its request and batch spans start."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        """`exporter` replaces the configured ones (tests: the SDK's in-memory exporter)."""
        self.config = config
        resource = Resource.create({"service.version": __version__})
        if resource.attributes.get("service.name", "unknown_service") == "unknown_service":  # no OTEL_SERVICE_NAME
            resource = resource.merge(Resource({"service.name": "nnserve"}))
        self.provider = TracerProvider(sampler=_NnserveSampler(_sampler(config)), resource=resource,
                                       shutdown_on_exit=False)
        self._root_ratio = _root_ratio(config)
        self.counts = SpanCounts()
        self.processors = [CountingSpanProcessor(e, max_queue_size=config.max_queue_size, counts=self.counts)
                           for e in ([exporter] if exporter is not None else _exporters(config))]
        for processor in self.processors:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("nnserve", __version__)
        self._propagator = TraceContextTextMapPropagator()

    # -- requests -----------------------------------------------------------------------------------------------

    def start_grpc(self, metadata: Iterable[tuple[str, Any]] | None, method: str,
                   started_ns: int) -> RequestTrace | None:
        """The trace of a gRPC call received at `started_ns` (perf_counter_ns), or None when it is not sampled."""
        carrier = {}
        for key, value in metadata or ():
            if key in _CONTEXT_HEADERS:
                carrier[key] = value if isinstance(value, str) else value.decode("latin-1")
        return self._start(f"{GRPC_SERVICE}/{method}", carrier, {"rpc.method": method, **_GRPC_ATTRIBUTES},
                           started_ns, grpc=True)

    def start_http(self, headers: Mapping[str, list[str]], route: str, started_ns: int) -> RequestTrace | None:
        """The trace of an HTTP request to `route` (the template, e.g. `/v2/models/{model}/infer`)."""
        carrier = {key: headers[key][0] for key in _CONTEXT_HEADERS if headers.get(key)}
        attributes = {"http.request.method": "POST", "http.route": route}
        return self._start(f"POST {route}", carrier, attributes, started_ns, grpc=False)

    def _start(self, name: str, carrier: dict[str, str], attributes: dict[str, Any], started_ns: int,
               *, grpc: bool) -> RequestTrace | None:
        parent = self._propagator.extract(carrier) if carrier else _ROOT
        if (parent is _ROOT or not trace_api.get_current_span(parent).get_span_context().is_valid) and \
                not (self._root_ratio >= 1.0 or random.random() < self._root_ratio):
            return None  # an unsampled root: decided before any span is made (see `_NnserveSampler`)
        offset = time.time_ns() - time.perf_counter_ns()
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=started_ns + offset)
        if not span.is_recording():
            return None
        span.set_attributes(attributes)
        return RequestTrace(self, span, offset, grpc)

    # -- batches ------------------------------------------------------------------------------------------------

    def start_batch(self, traces: Sequence[RequestTrace], *, rows: int, requests: int, instance: int,
                    inline: bool) -> BatchTrace:
        """The span of a batch being dispatched now, linked to the sampled requests it serves."""
        first = traces[0].served
        attributes: dict[str, Any] = {BATCH_ROWS: rows, BATCH_REQUESTS: requests, BATCH_SAMPLED: len(traces),
                                      BATCH_INSTANCE: instance, BATCH_INLINE: inline}
        if first is not None:
            attributes.update({MODEL: first.name, VERSION: first.version_text, PROVIDER: first.runner.provider})
        links = [Link(t.span.get_span_context()) for t in traces]
        span = self.tracer.start_span("batch", context=_ROOT, kind=SpanKind.INTERNAL, attributes=attributes,
                                      links=links)
        batch = BatchTrace(span)
        for t in traces:
            t.batch = batch
        return batch

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export what has ended (tests, benchmarks); False if the exporter did not finish in time."""
        return bool(self.provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self, timeout_s: float) -> None:
        """Flush and stop exporting within `timeout_s` (what is left of the drain's grace period)."""
        deadline = time.monotonic() + timeout_s
        for processor in self.processors:
            processor.close(max(0.0, deadline - time.monotonic()))
        self.provider.shutdown()


class BatchTrace:
    """The span of one executed batch."""

    __slots__ = ("span",)

    def __init__(self, span: trace_api.Span) -> None:
        self.span = span

    def end(self, compute_seconds: float, error: BaseException | None = None) -> None:
        span = self.span
        span.set_attribute(BATCH_COMPUTE_US, int(compute_seconds * 1e6))
        if error is None:
            span.set_attribute(OUTCOME, "success")
        else:
            span.set_attribute(OUTCOME, "internal")
            span.set_status(Status(StatusCode.ERROR, "the batch failed to execute"))
            span.add_event("exception", {"exception.type": type(error).__name__})
        span.end()


class RequestTrace:
    """One sampled request's server span; the data plane reports its routing, then its success or failure."""

    __slots__ = ("_grpc", "batch", "offset", "served", "span", "tracing")

    def __init__(self, tracing: Tracing, span: trace_api.Span, offset: int, grpc: bool) -> None:
        self.tracing = tracing
        self.span = span
        self.offset = offset
        """time_ns() - perf_counter_ns(): turns the data plane's perf_counter_ns readings into span times."""
        self._grpc = grpc
        self.served: ServedVersion | None = None
        self.batch: BatchTrace | None = None
        """The batch it was executed in (set by the batcher); None when it ran alone (unbatched, or at once)."""

    def routed(self, served: ServedVersion) -> None:
        """The request reached a served version: its names (as served, never as asked) go on the span."""
        self.served = served
        self.span.set_attributes({MODEL: served.name, VERSION: served.version_text,
                                  PROVIDER: served.runner.provider})

    def succeeded(self, rows: int, timing: RequestTiming, outcome: BatchOutcome, started_ns: int) -> None:
        """End the span of a request answered successfully, with its stages as child spans."""
        span, offset = self.span, self.offset
        span.set_attributes({ROWS: rows, OUTCOME: "success", BATCH_ROWS: outcome.batch_rows,
                             BATCH_REQUESTS: outcome.batch_requests,
                             "rpc.grpc.status_code" if self._grpc else "http.response.status_code":
                             0 if self._grpc else 200})
        start = started_ns + offset
        decoded = start + timing.input_ns
        dispatched = decoded + timing.queue_ns
        done = start + timing.total_ns
        parent = trace_api.set_span_in_context(span, _ROOT)
        tracer = self.tracing.tracer
        tracer.start_span("decode", context=parent, start_time=start).end(decoded)
        tracer.start_span("queue", context=parent, start_time=decoded).end(dispatched)
        links: list[Link] = []
        attributes: dict[str, Any] = {ROWS: rows}
        if self.batch is not None:
            batch_context = self.batch.span.get_span_context()
            links.append(Link(batch_context))
            attributes[BATCH_SPAN_ID] = ids = trace_api.format_span_id(batch_context.span_id)
            span.set_attributes({BATCH_SPAN_ID: ids, BATCH_TRACE_ID: trace_api.format_trace_id(batch_context.trace_id)})
        tracer.start_span("compute", context=parent, start_time=dispatched, links=links,
                          attributes=attributes).end(dispatched + timing.infer_ns)
        tracer.start_span("encode", context=parent, start_time=done - timing.output_ns).end(done)
        span.end(done)

    def failed(self, reason: str, error: BaseException) -> None:
        """End the span of a failed request (refused, expired, cancelled, failed in its batch) now."""
        span = self.span
        span.set_attribute(OUTCOME, reason)
        if self._grpc:
            span.set_attribute("rpc.grpc.status_code", _grpc_code(error))
        else:
            span.set_attribute("http.response.status_code", _http_code(error))
        if self.batch is not None:
            batch_context = self.batch.span.get_span_context()
            span.set_attributes({BATCH_SPAN_ID: trace_api.format_span_id(batch_context.span_id),
                                 BATCH_TRACE_ID: trace_api.format_trace_id(batch_context.trace_id)})
        # The reason and the exception's class only: its message may quote the request.
        span.set_status(Status(StatusCode.ERROR, reason))
        span.add_event("exception", {"exception.type": type(error).__name__})
        span.end()


def _grpc_code(error: BaseException) -> int:
    if isinstance(error, ServingError):
        code = grpc_status(error)
    elif isinstance(error, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED
    else:
        code = grpc.StatusCode.INTERNAL
    return int(code.value[0])


def _http_code(error: BaseException) -> int:
    if isinstance(error, ServingError):
        return int(http_status(error))
    if isinstance(error, asyncio.CancelledError):
        return CLIENT_CLOSED_REQUEST
    return 500


def _root_ratio(config: TracingConfig) -> float:
    """The share of root requests (no valid incoming context) that start a trace."""
    name = config.sampler.removeprefix("parentbased_")
    return {"always_on": 1.0, "always_off": 0.0}.get(name, config.ratio)


def _sampler(config: TracingConfig) -> sampling.Sampler:
    name, ratio = config.sampler, config.ratio
    samplers: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
    }
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(ratio)
    if name == "parentbased_traceidratio":
        return sampling.ParentBasedTraceIdRatio(ratio)
    return samplers[name]


class _NnserveSampler(sampling.Sampler):
    """The configured sampler for spans with a parent; roots are sampled, because nnserve decided them already.

    A root is either a request without a valid incoming context, whose share (`_root_ratio`) `Tracing._start`
    draws before making any span: the SDK would first build a span and its ids only to drop 99 of 100 at the
    default ratio, the most expensive part of tracing at 1% (the draw is as random as a trace id, and nnserve calls
    no service downstream that would need the decision to follow from the id). Or it is a batch, sampled when it
    links to a sampled request span: otherwise the root ratio would drop most batch spans and leave the requests'
    links dangling.
    """

    def __init__(self, inner: sampling.Sampler) -> None:
        self._inner = inner

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Any = None, links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> sampling.SamplingResult:
        is_root = not trace_api.get_current_span(parent_context).get_span_context().is_valid
        if is_root and (not links or any(link.context.trace_flags.sampled for link in links)):
            # The span keeps the attributes it was started with only if the sampling result carries them.
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"NnserveSampler{{roots decided by nnserve, else {self._inner.get_description()}}}"


def _exporters(config: TracingConfig) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in config.exporters:
        if name == "console":
            exporters.append(ConsoleSpanExporter(service_name="nnserve"))
        elif config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporters.append(GrpcExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporters.append(HttpExporter())
    return exporters


__all__ = ["BatchTrace", "RequestTrace", "Tracing"]
