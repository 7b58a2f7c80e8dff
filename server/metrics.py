"""Prometheus `/metrics` on its own port: basic per-model counters read from the statistics at scrape time.

Reading the cumulative statistics when Prometheus scrapes keeps the request path free of
metric updates. The observability issue extends this module (histograms per stage, batching
delay, multi-process aggregation); names follow Prometheus conventions (`_total`, seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from nnserve import __version__
from nnserve.server.repository import ModelRepository, ModelState

log = logging.getLogger(__name__)

_NS = 1e-9


class ServingCollector(Collector):
    """Per model and version: requests by outcome, inferences, executions, time totals, queue depth, facts."""

    def __init__(self, repository: ModelRepository, inflight: Callable[[], int]) -> None:
        self._repository = repository
        self._inflight = inflight

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "nnserve_requests",
            "Inference requests by outcome (success or failure reason).",
            labels=[*labels, "outcome"],
        )
        inferences = CounterMetricFamily("nnserve_inferences", "Rows inferred by successful requests.", labels=labels)
        executions = CounterMetricFamily("nnserve_executions", "Model executions (batches).", labels=labels)
        request_seconds = CounterMetricFamily(
            "nnserve_request_duration_seconds", "Total end-to-end time of successful requests.", labels=labels
        )
        queue_seconds = CounterMetricFamily(
            "nnserve_queue_duration_seconds", "Total time successful requests waited in the queue.", labels=labels
        )
        compute_seconds = CounterMetricFamily(
            "nnserve_compute_infer_duration_seconds", "Total model execution time of successful requests.",
            labels=labels,
        )
        queue_depth = GaugeMetricFamily("nnserve_queue_depth", "Requests queued, not yet executing.", labels=labels)
        ready = GaugeMetricFamily("nnserve_model_ready", "1 when the model version is ready.", labels=labels)
        parameters = GaugeMetricFamily("nnserve_model_parameters", "Parameters of the network.", labels=labels)
        weight_bytes = GaugeMetricFamily("nnserve_model_weight_bytes", "Bytes of weights.", labels=labels)
        provider = InfoMetricFamily(
            "nnserve_model_execution_provider", "The onnxruntime execution provider in use.", labels=labels
        )
        for entry in self._repository.entries():
            for version, status in sorted(entry.versions.items()):
                key = [entry.name, str(version)]
                ready.add_metric(key, 1.0 if status.state is ModelState.READY else 0.0)
        for stats in self._repository.recorders():
            key = [stats.model, str(stats.version)]
            requests.add_metric([*key, "success"], stats.success.count)
            for reason, count in sorted(stats.failures.items()):
                requests.add_metric([*key, reason], count)
            inferences.add_metric(key, stats.inference_count)
            executions.add_metric(key, stats.execution_count)
            request_seconds.add_metric(key, stats.success.ns * _NS)
            queue_seconds.add_metric(key, stats.queue.ns * _NS)
            compute_seconds.add_metric(key, stats.compute_infer.ns * _NS)
        for entry in self._repository.entries():
            for served in entry.served_versions:
                key = [served.name, served.version_text]
                queue_depth.add_metric(key, served.executor.queue_depth)
                parameters.add_metric(key, served.runner.facts.parameter_count)
                weight_bytes.add_metric(key, served.runner.facts.weight_bytes)
                provider.add_metric(key, {"provider": served.runner.provider})
        inflight = GaugeMetricFamily("nnserve_inflight_requests", "Inference requests accepted and not yet answered.")
        inflight.add_metric([], self._inflight())
        info = InfoMetricFamily("nnserve_build", "nnserve version.")
        info.add_metric([], {"version": __version__})
        yield from (requests, inferences, executions, request_seconds, queue_seconds, compute_seconds, queue_depth,
                    ready, parameters, weight_bytes, provider, inflight, info)


class MetricsServer:
    """The `/metrics` HTTP endpoint, with its own registry (several servers can share a test process)."""

    def __init__(self, repository: ModelRepository, inflight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServingCollector(repository, inflight))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._http: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Serve `/metrics` on a daemon thread; returns the bound port (useful when `port` is 0)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
