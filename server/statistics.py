"""Cumulative per-model-version statistics, the numbers behind ModelStatistics (and later Prometheus).

Updated on the event loop only (requests are recorded by the servicer, batches by the
executor's hook), so no locks; reads take a consistent snapshot. Times are integer
nanoseconds, as the protocol reports them. Failure reasons are the metrics issue's labels.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

FAILURE_REASONS = ("invalid", "not_ready", "rejected", "deadline", "cancelled", "unavailable", "internal")


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
    """Executions at one batch size (rows) and their time split."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class StatisticsRecorder:
    """Everything ModelStatistics reports for one model version; cumulative since the server started."""

    model: str
    version: int
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    """Rows inferred by successful requests (every batch item counts)."""
    execution_count: int = 0
    """Model executions (a batch of several requests counts once)."""
    last_inference_ms: int = 0
    """Wall-clock time of the latest successful request, in ms since the Unix epoch (the protocol's unit)."""
    failures: Counter[str] = field(default_factory=Counter)
    batches: dict[int, BatchDurations] = field(default_factory=dict)

    def record_success(
        self, rows: int, *, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One request answered: `rows` batch items (1 for models without a batch dimension)."""
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, reason: str, total_ns: int) -> None:
        """One request failed after it was routed to this version; `reason` is one of FAILURE_REASONS."""
        self.fail.add(total_ns)
        self.failures[reason] += 1

    def record_execution(self, rows: int, infer_ns: int) -> None:
        """One model execution (a batch) of `rows` rows."""
        self.execution_count += 1
        durations = self.batches.get(rows)
        if durations is None:
            durations = self.batches[rows] = BatchDurations()
        durations.compute_input.add(0)
        durations.compute_infer.add(infer_ns)
        durations.compute_output.add(0)
