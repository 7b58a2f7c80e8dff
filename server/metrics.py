"""Prometheus metrics: per model and version, built from the statistics at scrape time; aggregated across workers.

One function (`serving_metrics`) turns the serving state (repository, statistics recorders, executors) into metric
families. The request path never touches prometheus_client: it updates the lock-free recorders of `statistics`, and
the families are built only when someone reads them:

- one process: `/metrics` (`MetricsServer`) calls it on every scrape, so values are exact and current;
- `--workers N` (`PROMETHEUS_MULTIPROC_DIR` set): each worker's `MultiprocessWriter` copies the families into
  prometheus_client's per-process mmap files every second and once more on shutdown, and the supervisor's
  `serve_aggregated_metrics` merges every worker's files (counters and histograms summed; gauges summed, min'd or
  max'd as `GAUGE_MODES` says) and adds each live worker's process metrics.

Names follow Prometheus conventions: an `nnserve_` prefix, base units (seconds, bytes) in the name, `_total` on
counters, `_info` on the info-style gauge. Every per-model series has the labels `model` and `version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nnserve import __version__
from nnserve.server.inflight_budget import InflightBudget
from nnserve.server.repository import ModelRepository, ModelState, ServedVersion
from nnserve.server.statistics import FAILURE_REASONS, Histogram, StatisticsRecorder, UnroutedRequests

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL_S = 1.0
"""How often a worker copies its metrics to the shared directory: at most this stale, well below any scrape
interval (Prometheus' default is 15 s)."""

_LABELS = ("model", "version")

GAUGE_MODES: dict[str, str] = {
    "nnserve_queue_depth": "livesum",
    "nnserve_queue_capacity": "livesum",
    "nnserve_inflight_batches": "livesum",
    "nnserve_inflight_requests": "livesum",
    "nnserve_inflight_bytes": "livesum",
    "nnserve_inflight_bytes_limit": "livesum",
    "nnserve_model_ready": "livemin",
    "nnserve_model_parameters": "livemax",
    "nnserve_model_weight_bytes": "livemax",
    "nnserve_model_flops_per_sample": "livemax",
    "nnserve_model_execution_provider_info": "livemax",
    "nnserve_model_provider_fallback": "livemax",
    "nnserve_batch_delay_seconds": "livemax",
    "nnserve_build_info": "livemax",
}
"""How each gauge aggregates across workers: totals (queues, in-flight work) add up; a model is ready only where
every live worker has it ready (min); facts, flags and the batching delay take the largest value (max). Only live
workers count: a dead worker's gauges are dropped."""


@dataclass(frozen=True)
class ServingState:
    """What the metrics are built from: the repository, failures before routing, the in-flight request count,
    the in-flight byte budget and, when tracing is on, the spans exported and dropped."""

    repository: ModelRepository
    unrouted: UnroutedRequests
    inflight: Callable[[], int]
    budget: InflightBudget | None = None
    span_counts: Callable[[], tuple[int, dict[str, int]]] | None = None
    """(spans exported, spans dropped by reason) since the start (`tracing_export.SpanCounts.snapshot`)."""


# -- building the families ---------------------------------------------------------------------------------------


def serving_metrics(state: ServingState, recorders: list[StatisticsRecorder] | None = None) -> list[Metric]:
    """Every nnserve metric family for the current state (process metrics apart).

    `recorders` limits the statistics (counters, histograms) to those versions; None: every version since start.
    """
    families = _Families()
    families.add_statistics(state, state.repository.recorders() if recorders is None else recorders)
    families.add_executors(state.repository)
    families.add_readiness(state.repository)
    families.inflight_requests.add_metric([], state.inflight())
    if state.budget is not None:
        families.inflight_bytes.add_metric([], state.budget.used)
        families.inflight_bytes_limit.add_metric([], state.budget.limit)
    families.build.add_metric(["nnserve", __version__], 1.0)
    return families.all() + ([] if state.span_counts is None else span_metrics(*state.span_counts()))


def span_metrics(exported: int, dropped: dict[str, int]) -> list[Metric]:
    """The tracing families (only when tracing is on): what reached the collector, and what never will."""
    sent = CounterMetricFamily("nnserve_trace_spans_exported", "Spans (requests' and batches', with their stages) "
                               "the OTLP or console exporter delivered.")
    sent.add_metric([], exported)
    lost = CounterMetricFamily(
        "nnserve_trace_spans_dropped", "Spans that will never reach the collector, by reason: queue_full (the export "
        "queue, OTEL_BSP_MAX_QUEUE_SIZE, was full: the collector is down, slow or blocking), export_failed (the "
        "collector refused them or the export timed out), shutdown (still queued when the grace period ended).",
        labels=["reason"])
    for reason, count in sorted(dropped.items()):
        lost.add_metric([reason], count)
    return [sent, lost]


class _Families:
    """The metric families of one scrape (fresh objects each time: collectors must not share samples)."""

    def __init__(self) -> None:
        labels = list(_LABELS)
        self.requests = CounterMetricFamily(
            "nnserve_requests", "Inference requests by outcome: success, or the reason they failed "
            f"({', '.join(FAILURE_REASONS)}); model and version are '_unknown' for names the server does not know.",
            labels=[*labels, "outcome"])
        self.lookup_failures = CounterMetricFamily(
            "nnserve_model_lookup_failures", "Failed ModelMetadata and ModelConfig calls (not inference requests) by "
            "rpc and reason (not_found, not_ready); model and version are '_unknown' for names the server does not "
            "know. Clients look a model up before inferring, so this counts requests for unknown models that never "
            "reached nnserve_requests_total.", labels=[*labels, "rpc", "reason"])
        self.inferences = CounterMetricFamily(
            "nnserve_inferences", "Rows (batch items) inferred by successful requests.", labels=labels)
        self.executions = CounterMetricFamily(
            "nnserve_executions", "Successful model executions (one per batch, whatever its number of requests).",
            labels=labels)
        self.request_seconds = HistogramMetricFamily(
            "nnserve_request_duration_seconds",
            "End-to-end time of successful requests, from receipt by the server to the response being ready.",
            labels=labels)
        self.stage_seconds = HistogramMetricFamily(
            "nnserve_request_stage_duration_seconds",
            "Time of successful requests per stage: queue (waiting for a batch to start), compute_input (decoding the "
            "request), compute_infer (running the batch it ran in), compute_output (encoding its outputs).",
            labels=[*labels, "stage"])
        self.batch_collection = HistogramMetricFamily(
            "nnserve_batch_collection_duration_seconds",
            "Per execution: from the arrival of its oldest request to the start of the execution (the batching "
            "window, plus any wait for a free instance).", labels=labels)
        self.batch_rows = HistogramMetricFamily(
            "nnserve_batch_size_rows", "Rows per successful execution (the dynamic batch size).", labels=labels)
        self.queue_depth = GaugeMetricFamily(
            "nnserve_queue_depth", "Requests accepted and not yet executing.", labels=labels)
        self.queue_capacity = GaugeMetricFamily(
            "nnserve_queue_capacity", "Most requests the queue holds before rejecting (max_queue_size).", labels=labels)
        self.inflight_batches = GaugeMetricFamily(
            "nnserve_inflight_batches", "Batches executing now (at most the model's instances).", labels=labels)
        self.batch_delay = GaugeMetricFamily(
            "nnserve_batch_delay_seconds", "Current batching delay: how long a batch waits for companions at most "
            "(the configured max_queue_delay unless the batcher adapts it; 0 without batching).", labels=labels)
        self.ready = GaugeMetricFamily(
            "nnserve_model_ready", "1 when the model version serves requests, 0 when it is known but unavailable.",
            labels=labels)
        self.parameters = GaugeMetricFamily(
            "nnserve_model_parameters", "Parameters (weights and biases) of the network.", labels=labels)
        self.weight_bytes = GaugeMetricFamily(
            "nnserve_model_weight_bytes", "Bytes of the network's weights in its stored dtype.", labels=labels)
        self.flops = GaugeMetricFamily(
            "nnserve_model_flops_per_sample", "Floating-point operations per row (builder models only).",
            labels=labels)
        self.provider = GaugeMetricFamily(
            "nnserve_model_execution_provider_info", "The onnxruntime execution provider the version runs on (always "
            "1; the provider is a label).", labels=[*labels, "provider"])
        self.fallback = GaugeMetricFamily(
            "nnserve_model_provider_fallback", "1 when the version could have used CUDA (device auto or cuda, an "
            "onnxruntime build with CUDA) but runs on another provider.", labels=labels)
        self.inflight_requests = GaugeMetricFamily(
            "nnserve_inflight_requests", "Inference requests accepted and not yet answered, over all models.")
        self.inflight_bytes = GaugeMetricFamily(
            "nnserve_inflight_bytes", "Bytes reserved by accepted, unanswered inference requests (their messages, "
            "decoded inputs, batch copies and outputs), over all models: what --max-inflight-bytes bounds.")
        self.inflight_bytes_limit = GaugeMetricFamily(
            "nnserve_inflight_bytes_limit", "The in-flight byte budget (--max-inflight-bytes, or its derived "
            "default); requests beyond it are refused with outcome over_budget.")
        self.build = GaugeMetricFamily("nnserve_build_info", "nnserve build (always 1).", labels=["name", "version"])

    def all(self) -> list[Metric]:
        return list(vars(self).values())

    def add_statistics(self, state: ServingState, recorders: list[StatisticsRecorder]) -> None:
        requests: dict[tuple[str, str, str], int] = {}
        for stats in recorders:
            model, version = stats.model, str(stats.version)
            requests[(model, version, "success")] = stats.success.count
            for reason, count in dict(stats.failures).items():
                requests[(model, version, reason)] = count
            key = [model, version]
            self.inferences.add_metric(key, stats.inference_count)
            self.executions.add_metric(key, stats.execution_count)
            _add_histogram(self.request_seconds, key, stats.request_seconds)
            for stage, histogram in stats.stage_seconds.items():
                _add_histogram(self.stage_seconds, [*key, stage], histogram)
            _add_histogram(self.batch_collection, key, stats.batch_collection_seconds)
            _add_histogram(self.batch_rows, key, stats.batch_rows)
        for labels, count in state.unrouted.snapshot():
            requests[labels] = requests.get(labels, 0) + count
        for labels, count in sorted(requests.items()):
            self.requests.add_metric(list(labels), count)
        for lookup_labels, count in state.unrouted.lookup_snapshot():
            self.lookup_failures.add_metric(list(lookup_labels), count)

    def add_executors(self, repository: ModelRepository) -> None:
        for entry in repository.entries():
            for served in sorted(entry.served_versions, key=lambda s: s.version):
                key = [served.name, served.version_text]
                runner, executor = served.runner, served.executor
                self.queue_depth.add_metric(key, executor.queue_depth)
                self.queue_capacity.add_metric(key, served.batching.max_queue_size)
                self.inflight_batches.add_metric(key, executor.in_flight_batches)
                self.batch_delay.add_metric(key, batch_delay_seconds(served))
                self.parameters.add_metric(key, runner.facts.parameter_count)
                self.weight_bytes.add_metric(key, runner.facts.weight_bytes)
                if runner.facts.flops_per_sample is not None:
                    self.flops.add_metric(key, runner.facts.flops_per_sample)
                self.provider.add_metric([*key, runner.provider], 1.0)
                self.fallback.add_metric(key, 1.0 if runner.provider_fallback else 0.0)

    def add_readiness(self, repository: ModelRepository) -> None:
        for entry in repository.entries():
            if not entry.versions:
                self.ready.add_metric([entry.name, ""], 0.0)  # the model as a whole failed (config, no versions)
            for version, status in sorted(entry.versions.items()):
                self.ready.add_metric([entry.name, str(version)], 1.0 if status.state is ModelState.READY else 0.0)


def batch_delay_seconds(served: ServedVersion) -> float:
    """The batcher's current delay when it reports one (`current_delay_s`), else the configured one; 0 unbatched."""
    current = getattr(served.executor, "current_delay_s", None)
    if callable(current):
        current = current()
    if current is not None:
        return float(current)
    batching = served.batching
    return batching.max_queue_delay_s if served.runner.batched and batching.enabled else 0.0


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    counts, total = histogram.snapshot()
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*histogram.bounds, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric(labels, buckets, total)


# -- one process ------------------------------------------------------------------------------------------------


class ServingCollector(Collector):
    """The nnserve families of one server, built at every scrape."""

    def __init__(self, state: ServingState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        yield from serving_metrics(self._state)


class _MetricsEndpoint:
    """A `/metrics` HTTP endpoint over its own registry (several servers can share a test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: Any = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Serve `/metrics` on a daemon thread; returns the bound port (useful when `port` is 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsServer(_MetricsEndpoint):
    """The server's `/metrics`: its model versions, and the process."""

    def __init__(self, state: ServingState) -> None:
        super().__init__()
        self.registry.register(ServingCollector(state))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)


# -- several worker processes -------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The shared metrics directory when this process is one of several workers, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class MultiprocessWriter:
    """Copies this worker's families into prometheus_client's mmap files, which the supervisor merges.

    Each value is written as this process's running total (counters, histogram buckets) or current value (gauges),
    so the merge (a sum over processes for counters) is exact, and a worker that exits leaves its totals behind:
    counters never go backwards when a worker is replaced. Flushes run on a thread, off the event loop (they read
    the statistics as a scrape does), and rewrite only versions that saw traffic since the last flush, plus the
    gauges: an idle server's flush costs about a millisecond.
    """

    def __init__(self, state: ServingState, *, interval: float = FLUSH_INTERVAL_S) -> None:
        self._state = state
        self._interval = interval
        value_class = prometheus_values.ValueClass
        # The process's own class when prometheus_client saw the variable at import (its files are then shared
        # with any other metric of this process); otherwise a private one (nothing else writes files then).
        self._value_class = value_class if getattr(value_class, "_multiprocess", False) else \
            prometheus_values.MultiProcessValue()
        self._values: dict[tuple[Any, ...], list[Any]] = {}
        self._flushed_updates: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def start(self) -> None:
        """Flush every `interval` seconds (the first at once) from the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="nnserve-metrics-writer")

    async def stop(self) -> None:
        """Stop the periodic flush and write the final values (so a clean exit loses no count)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.flush)

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.flush)
            await asyncio.sleep(self._interval)

    def flush(self) -> None:
        """Write every changed value; a failure is logged (once with its traceback) and never breaks serving."""
        with self._lock:
            try:
                changed = []
                for recorder in self._state.repository.recorders():
                    key = (recorder.model, recorder.version)
                    updates = recorder.updates
                    if self._flushed_updates.get(key) != updates:
                        changed.append(recorder)
                        self._flushed_updates[key] = updates
                self._write(serving_metrics(self._state, changed))
            except Exception:
                log.log(logging.DEBUG if self._failed else logging.ERROR, "writing multi-process metrics failed",
                        exc_info=True)
                self._failed = True
                self._flushed_updates.clear()  # rewrite everything next time

    def _write(self, families: Iterable[Metric]) -> None:
        seen: set[tuple[Any, ...]] = set()
        for family in families:
            mode = GAUGE_MODES.get(family.name, "livesum") if family.type == "gauge" else ""
            previous_bucket: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in family.samples:
                if family.type == "histogram" and sample.name.endswith(("_created", "_count")):
                    continue  # the merge derives _count from the buckets
                labels = dict(sample.labels)
                value = sample.value
                if sample.name.endswith("_bucket"):
                    # The merge expects per-bucket counts and accumulates them itself.
                    rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                    value -= previous_bucket.get(rest, 0.0)
                    previous_bucket[rest] = sample.value
                key = (family.type, mode, family.name, sample.name, tuple(sorted(labels.items())))
                seen.add(key)
                self._set(key, family.documentation, labels, value)
        for key, slot in self._values.items():
            if key[0] == "gauge" and key not in seen and slot[1] != 0.0:
                slot[0].set(0.0)  # a version that was unloaded: its gauges stop counting
                slot[1] = 0.0

    def _set(self, key: tuple[Any, ...], documentation: str, labels: dict[str, str], value: float) -> None:
        slot = self._values.get(key)
        if slot is None:
            typ, mode, metric_name, sample_name, _ = key
            names = list(labels)
            holder = self._value_class(typ, metric_name, sample_name, names, [labels[n] for n in names],
                                       documentation, multiprocess_mode=mode)
            slot = self._values[key] = [holder, None]
        if slot[1] != value:
            slot[0].set(float(value))
            slot[1] = value


class AggregatedCollector(Collector):
    """Every worker's nnserve metrics merged, plus each live worker's process metrics (labelled by pid)."""

    _PID = re.compile(r"_(\d+)\.db$")

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self._directory, "*.db"))
        pids = sorted({int(m.group(1)) for f in files if (m := self._PID.search(f))})
        live = [pid for pid in pids if _alive(pid)]
        for pid in set(pids) - set(live):
            mark_process_dead(pid, self._directory)  # drops the dead worker's live* gauges, keeps its counters
        yield from self._merged()
        workers = GaugeMetricFamily("nnserve_workers", "Live worker processes writing metrics.")
        workers.add_metric([], len(live))
        yield workers
        yield from _worker_process_metrics(live)

    def _merged(self, attempts: int = 5) -> list[Metric]:
        """The workers' files merged. A worker may be extending its file while it is read (seen on a busy machine as
        a scrape failing with 500 while the workers started): a read that fails is tried again a moment later."""
        for attempt in range(attempts):
            files = glob.glob(os.path.join(self._directory, "*.db"))
            try:
                return list(MultiProcessCollector.merge(files, accumulate=True))
            except Exception:
                if attempt == attempts - 1:
                    raise
                log.debug("merging the workers' metrics files failed; reading them again", exc_info=True)
                time.sleep(0.01 * (attempt + 1))
        return []  # pragma: no cover


def _worker_process_metrics(pids: list[int]) -> list[Metric]:
    """ProcessCollector's metrics of each worker, as `nnserve_worker_process_*{pid=...}` families."""
    merged: dict[str, Metric] = {}
    for pid in pids:
        collector = ProcessCollector(namespace="nnserve_worker", pid=functools.partial(int, pid), registry=None)
        for family in collector.collect():
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
    return list(merged.values())


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a worker that exited but was not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class AggregatedMetricsServer(_MetricsEndpoint):
    """`/metrics` of the supervisor: the workers' merged metrics and every process's own."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.registry.register(AggregatedCollector(directory))
        ProcessCollector(registry=self.registry)


def serve_aggregated_metrics(host: str, port: int, multiproc_dir: str) -> None:
    """Serve the merged metrics of every worker writing to `multiproc_dir` on `host:port`, from a daemon thread.

    Returns at once (like prometheus_client's start_http_server); OSError if the port cannot be bound. The workers
    must run with `PROMETHEUS_MULTIPROC_DIR=multiproc_dir` in their environment; the supervisor removes the
    directory's files before starting them (stale files of an earlier run would be summed in).
    """
    server = AggregatedMetricsServer(multiproc_dir)
    bound = server.start(host, port)
    log.info("aggregated metrics of the workers on http://%s:%d/metrics", host, bound)
