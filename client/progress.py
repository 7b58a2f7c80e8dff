"""A dependency-free progress line on stderr for `infer_many`.

One carriage-return-rewritten line, throttled to ten updates a second, so that a million small requests do not turn
into a million terminal writes. Thread-safe: the sync client updates it from worker threads.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

ProgressCallback = Callable[[int, int], None]
"""Called as `callback(rows_done, rows_total)` after each finished chunk."""


class Progress:
    """Reports finished rows to a callback, or as a line on a stream, or not at all."""

    def __init__(
        self,
        label: str,
        total_rows: int,
        target: bool | ProgressCallback,
        stream: TextIO | None = None,
        min_interval_s: float = 0.1,
    ) -> None:
        self._label = label
        self._total = total_rows
        self._callback = target if callable(target) else None
        self._stream = (stream or sys.stderr) if target is True else None
        self._min_interval_s = min_interval_s
        self._done = 0
        self._started = time.monotonic()
        self._last_write = 0.0
        self._written = -1  # rows shown by the last write
        self._lock = threading.Lock()

    def advance(self, rows: int) -> None:
        """Count `rows` more as finished and report."""
        with self._lock:
            self._done += rows
            if self._callback is not None:
                self._callback(self._done, self._total)
            if self._stream is not None:
                now = time.monotonic()
                if self._done >= self._total or now - self._last_write >= self._min_interval_s:
                    self._last_write = now
                    self._write(now)

    def close(self) -> None:
        """End the line, so later output starts on a fresh one."""
        with self._lock:
            if self._stream is not None:
                if self._written != self._done:
                    self._write(time.monotonic())
                self._stream.write("\n")
                self._stream.flush()
                self._stream = None

    def _write(self, now: float) -> None:
        assert self._stream is not None
        self._written = self._done
        elapsed = now - self._started
        percent = 100.0 * self._done / self._total if self._total else 100.0
        rate = self._done / elapsed if elapsed > 0 else 0.0
        width = 30
        filled = int(width * percent / 100)
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(
            f"\r{self._label} [{bar}] {self._done}/{self._total} rows {percent:5.1f}% "
            f"{elapsed:6.1f}s {rate:,.0f} rows/s"
        )
        self._stream.flush()
