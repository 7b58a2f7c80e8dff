"""Cumulative per-model-version statistics: the one record behind ModelStatistics and the Prometheus metrics.

Updated on the event loop only (requests by the servicer, batches by the executor's `on_batch` hook), so the request
path takes no lock: a success costs a few integer additions and five bisections, about a microsecond, where five
prometheus_client histograms would cost three to four (and twice that in multi-process mode). Readers on other
threads (the /metrics HTTP thread) copy each bucket list in one step, atomic under the GIL. Because ModelStatistics
and /metrics read the same numbers, they always agree.

Times are integer nanoseconds, the protocol's unit; histograms are in seconds, Prometheus' base unit.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nnserve.server.timing import RequestTiming

if TYPE_CHECKING:
    from nnserve.server.batcher import BatchStats

FAILURE_REASONS = (
    "invalid", "not_found", "not_ready", "rejected", "over_budget", "deadline", "cancelled", "unavailable",
    "internal",
)
"""Values of the `outcome` label besides `success`: every way a request can fail, as the metrics report it.
`rejected` is a full queue; `over_budget` a request the in-flight byte budget had no room for (`--max-inflight-bytes`),
or one larger than the whole budget."""

UNKNOWN_LABEL = "_unknown"
"""Label value for a model or version the server does not know. Real model names start with a letter or digit,
so it cannot collide, and it keeps requests for arbitrary names from creating unbounded series."""

DEFAULT_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of the latency histograms: 10 us (a tiny network's compute) to 10 s (a large batch on CPU)
in 1-2.5-5 steps, so that p50/p99 stay within a factor 2.5 at every scale."""

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper bounds (rows) of the batch size histogram: powers of two up to 4096 rows."""


def validate_buckets(bounds: Iterable[float]) -> tuple[float, ...]:
    """Strictly increasing, finite, positive upper bounds; ValueError quoting the offending value otherwise."""
    values = tuple(float(b) for b in bounds)
    if not values:
        raise ValueError("at least one histogram bucket bound is needed")
    for previous, current in zip((0.0, *values), values, strict=False):
        if not (current > 0 and current != float("inf")):
            raise ValueError(f"histogram bucket bounds must be positive and finite, found {current!r}")
        if current <= previous:
            raise ValueError(f"histogram bucket bounds must increase strictly, found {current!r} after {previous!r}")
    return values


class Histogram:
    """Fixed upper bounds, one counter per bucket (not cumulative) plus the +Inf bucket, and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, which is Prometheus' `le` (value <= bound).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """Per-bucket counts (the last is above every bound) and the sum, copied for a reader on another thread."""
        return self.counts.copy(), self.sum

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class Duration:
    """A count of events and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchDurations:
    """Executions at one batch size (rows) and their time split.

    Counts are executions. `compute_infer` is each execution's run time; `compute_input`/`compute_output` add up the
    decode/encode time of the requests that ran in those executions (nnserve prepares inputs per request, in the
    servicer), so their sums over all batch sizes equal the totals of `inference_stats`.
    """

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class StatisticsRecorder:
    """Everything ModelStatistics and /metrics report for one model version; cumulative since the server started."""

    model: str
    version: int
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_S
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    """Rows inferred by successful requests (every batch item counts)."""
    execution_count: int = 0
    """Successful model executions (a batch of several requests counts once)."""
    last_inference_ms: int = 0
    """Wall-clock time of the latest successful request, in ms since the Unix epoch (the protocol's unit)."""
    failures: Counter[str] = field(default_factory=Counter)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    request_seconds: Histogram = field(init=False)
    """End-to-end time of successful requests."""
    stage_seconds: dict[str, Histogram] = field(init=False)
    """Per stage (queue, compute_input, compute_infer, compute_output), the time of each successful request."""
    batch_rows: Histogram = field(init=False)
    """Rows per successful execution."""
    batch_collection_seconds: Histogram = field(init=False)
    """Per successful execution: from the arrival of its oldest request to the start of the execution."""
    updates: int = 0
    """Bumped by every record: lets the multi-process writer skip versions that saw no traffic since its last
    flush."""

    def __post_init__(self) -> None:
        self.latency_buckets = validate_buckets(self.latency_buckets)
        self.request_seconds = Histogram(self.latency_buckets)
        self._queue_h = Histogram(self.latency_buckets)
        self._input_h = Histogram(self.latency_buckets)
        self._infer_h = Histogram(self.latency_buckets)
        self._output_h = Histogram(self.latency_buckets)
        self.stage_seconds = {
            "queue": self._queue_h,
            "compute_input": self._input_h,
            "compute_infer": self._infer_h,
            "compute_output": self._output_h,
        }
        self.batch_rows = Histogram(BATCH_SIZE_BUCKETS)
        self.batch_collection_seconds = Histogram(self.latency_buckets)

    def record_success(self, rows: int, timing: RequestTiming) -> None:
        """One request answered: `rows` batch items (1 for models without a batch dimension)."""
        self.updates += 1
        self.success.add(timing.total_ns)
        self.queue.add(timing.queue_ns)
        self.compute_input.add(timing.input_ns)
        self.compute_infer.add(timing.infer_ns)
        self.compute_output.add(timing.output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.request_seconds.observe(timing.total_ns * 1e-9)
        self._queue_h.observe(timing.queue_ns * 1e-9)
        self._input_h.observe(timing.input_ns * 1e-9)
        self._infer_h.observe(timing.infer_ns * 1e-9)
        self._output_h.observe(timing.output_ns * 1e-9)
        durations = self.batches.get(timing.batch_rows)
        if durations is None:
            durations = self.batches[timing.batch_rows] = BatchDurations()
        durations.compute_input.ns += timing.input_ns
        durations.compute_output.ns += timing.output_ns

    def record_failure(self, reason: str, total_ns: int) -> None:
        """One request failed after it was routed to this version; `reason` is one of FAILURE_REASONS."""
        self.updates += 1
        self.fail.add(total_ns)
        self.failures[reason] += 1

    def record_execution(self, rows: int, infer_ns: int, collection_seconds: float = 0.0) -> None:
        """One successful model execution (a batch) of `rows` rows."""
        self.updates += 1
        self.execution_count += 1
        durations = self.batches.get(rows)
        if durations is None:
            durations = self.batches[rows] = BatchDurations()
        durations.compute_input.count += 1
        durations.compute_infer.add(infer_ns)
        durations.compute_output.count += 1
        self.batch_rows.observe(rows)
        self.batch_collection_seconds.observe(collection_seconds)

    def on_batch(self, stats: BatchStats) -> None:
        """The executor's `on_batch` hook: count successful executions (failed ones fail their requests, counted
        there). The collection wait is the batcher's own measure when it reports one, else the oldest request's
        wait: the collection window, plus any wait for a free instance."""
        if not stats.succeeded:
            return
        collection = getattr(stats, "collect_seconds", None)
        if collection is None:
            collection = max(stats.queue_seconds, default=0.0)
        self.record_execution(stats.rows, int(stats.compute_seconds * 1e9), collection)


@dataclass
class UnroutedRequests:
    """Requests that failed before reaching a served version: unknown model or version, model not ready, draining.

    Keyed by (model, version, reason) label values; callers pass UNKNOWN_LABEL for names the server does not know,
    so the number of keys is bounded by the repository, not by what clients send.
    """

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    lookups: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    """Failed ModelMetadata / ModelConfig lookups by (model, version, rpc, reason): clients (the SDK, the CLI,
    tritonclient) ask for metadata before their first inference, so a request for an unknown model often ends
    there and never becomes an inference request."""

    def record(self, model: str, version: str, reason: str) -> None:
        self.counts[(model, version, reason)] += 1

    def record_lookup(self, model: str, version: str, rpc: str, reason: str) -> None:
        self.lookups[(model, version, rpc, reason)] += 1

    def snapshot(self) -> list[tuple[tuple[str, str, str], int]]:
        return sorted(self.counts.copy().items())

    def lookup_snapshot(self) -> list[tuple[tuple[str, str, str, str], int]]:
        return sorted(self.lookups.copy().items())


def unrouted_labels(model: str, version: str, known_versions: Collection[int] | None) -> tuple[str, str]:
    """Bounded label values for a request that did not reach a served version.

    `known_versions` are the versions the repository has for `model` (None: the model is unknown). Unknown names
    become UNKNOWN_LABEL; a request that named no version keeps the empty version label.
    """
    if known_versions is None:
        return UNKNOWN_LABEL, UNKNOWN_LABEL
    if not version:
        return model, ""
    if len(version) <= 18 and version.isascii() and version.isdigit() and int(version) in known_versions:
        return model, str(int(version))
    return model, UNKNOWN_LABEL
