"""Exporting spans in the background, with every span that never reached the collector counted.

The SDK's `BatchSpanProcessor` already keeps export off the request path: `on_end` appends to a bounded deque and
one worker thread exports. What it does not do is say how many spans it lost: a full queue silently pushes the
oldest span out, and a failed export is a log line. `CountingSpanProcessor` puts a counted admission in front of
it and a counting exporter behind it:

* admission: a span is handed to the batch processor only while fewer than `max_queue_size` spans are queued (so
  its own deque never overflows); otherwise it is dropped at once (`queue_full`). Handing over is an append under a
  lock held for a few instructions: a collector that is down, slow or blocking costs the request path nothing;
* the exporter wrapper counts what each export call took out of the queue, and what it delivered (`exported`) or
  lost (`export_failed`: the collector refused it, or the export timed out or failed);
* `close(timeout)` bounds shutdown by the drain's grace period: the last spans are flushed while time is left,
  then the exporter is shut down (which ends an export blocked on the collector), and whatever is still queued is
  counted (`shutdown`).

`SpanCounts` is what the Prometheus metrics read (`metrics.ServingState.span_counts`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "export_failed", "shutdown")


class SpanCounts:
    """Spans exported and dropped since the start, by reason; updated from the loop and the export thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exported = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)

    def add_exported(self, count: int) -> None:
        with self._lock:
            self.exported += count

    def add_dropped(self, reason: str, count: int) -> None:
        with self._lock:
            self._dropped[reason] += count

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(exported, dropped by reason), consistent with each other."""
        with self._lock:
            return self.exported, dict(self._dropped)

    @property
    def dropped(self) -> int:
        with self._lock:
            return sum(self._dropped.values())


class _CountingExporter(SpanExporter):
    """The real exporter, with each batch counted as taken from the queue and as delivered or lost."""

    def __init__(self, inner: SpanExporter, counts: SpanCounts, taken: Callable[[int], None]) -> None:
        self._inner = inner
        self._counts = counts
        self._taken = taken
        self._closed = False
        self._close_lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self._taken(count)
        try:
            result = self._inner.export(spans)
        except Exception:
            self._counts.add_dropped("export_failed", count)
            raise  # the batch processor logs it
        if result is SpanExportResult.SUCCESS:
            self._counts.add_exported(count)
        else:
            self._counts.add_dropped("export_failed", count)
        return result

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        """Shut the real exporter down once (the batch processor and `close` may both ask)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._inner.shutdown()
        except Exception:
            log.debug("shutting the span exporter down failed", exc_info=True)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingSpanProcessor(SpanProcessor):
    """The SDK's batch span processor behind a counted, never-blocking admission (see the module docstring)."""

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int, counts: SpanCounts | None = None) -> None:
        self.counts = counts or SpanCounts()
        self._capacity = max_queue_size
        self._queued = 0
        self._lock = threading.Lock()
        self._exporter = _CountingExporter(exporter, self.counts, self._on_taken)
        self._batch = BatchSpanProcessor(self._exporter, max_queue_size=max_queue_size)
        self._closed = False

    @property
    def queued(self) -> int:
        """Spans handed to the batch processor and not yet taken by an export."""
        return self._queued

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        with self._lock:
            admitted = not self._closed and self._queued < self._capacity
            if admitted:
                self._queued += 1
        if admitted:
            self._batch.on_end(span)
        else:
            self.counts.add_dropped("queue_full" if not self._closed else "shutdown", 1)

    def _on_taken(self, count: int) -> None:
        with self._lock:
            self._queued = max(0, self._queued - count)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._batch.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """What the tracer provider calls; `close` has usually done the work (then this returns at once)."""
        self.close(timeout=5.0)

    def close(self, timeout: float) -> None:
        """Flush what is queued within `timeout` seconds, then stop exporting; spans left are counted as dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        finished = threading.Event()

        def shut_down() -> None:
            try:
                self._batch.shutdown()  # the worker exports what is queued, then the exporter is shut down
            except Exception:
                log.debug("stopping the batch span processor failed", exc_info=True)
            finished.set()

        threading.Thread(target=shut_down, name="nnserve-trace-shutdown", daemon=True).start()
        if not finished.wait(max(0.0, timeout)):
            # The collector did not take the last spans in time: shutting the exporter down ends the export
            # it is blocked in (its channel closes), and the worker stops with what is left.
            self._exporter.shutdown()
            finished.wait(min(1.0, max(0.1, timeout)))
        with self._lock:
            left, self._queued = self._queued, 0
        if left:
            self.counts.add_dropped("shutdown", left)
            log.warning("tracing: %d spans were not exported before the end of the grace period", left)


__all__ = ["DROP_REASONS", "CountingSpanProcessor", "SpanCounts"]
