"""How a model version executes requests: the dynamic batcher, or direct execution for unbatched models.

Both expose the same small interface (`Executor`), so the servicer and the repository never
care which one a model uses. Direct execution is for models without a batch dimension
(max_batch_size 0), whose requests cannot be merged; it keeps the batcher's guarantees that
matter to callers: a bounded queue, deadlines checked before running, `instances` concurrent
runs, and a drain on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import numpy as np

from nnserve.server.batcher import BatchOutcome, BatchStats, DynamicBatcher
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import DeadlineExpiredError, QueueFullError, ServerUnavailableError

if TYPE_CHECKING:
    from nnserve.server.tracing import RequestTrace

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Executor(Protocol):
    """What serving needs from a model's execution path."""

    @property
    def queue_depth(self) -> int: ...
    @property
    def in_flight_batches(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self, drain: bool = True, timeout: float | None = None) -> None: ...
    async def submit(self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None,
                     trace: RequestTrace | None = None) -> BatchOutcome:
        """Run one request; `trace` is its span when it is sampled (a batcher links its batch's span to it)."""
        ...


class DirectExecutor:
    """Runs each request on its own, at most `instances` at a time, on a dedicated thread pool."""

    def __init__(
        self,
        run: RunFn,
        *,
        instances: int = 1,
        max_queue_size: int = 1024,
        name: str = "",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._run = run
        self._instances = instances
        self._max_queue_size = max_queue_size
        self._label = f"model '{name}'" if name else "the model"
        self._name = name
        self._on_batch = on_batch
        self._slots = asyncio.Semaphore(instances)
        self._waiting = 0
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool: ThreadPoolExecutor | None = None
        self._accepting = False

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def in_flight_batches(self) -> int:
        return self._running

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self._instances, thread_name_prefix=f"run-{self._name or 'model'}")
        self._accepting = True

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with drain, wait (up to `timeout`) for accepted ones to finish."""
        self._accepting = False
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None,
                     trace: RequestTrace | None = None) -> BatchOutcome:
        # A request run on its own is no batch: a sampled one gets its compute span as a child (`RequestTrace`).
        if not self._accepting:
            raise ServerUnavailableError(f"{self._label} is not serving (not started or shutting down)")
        if self._waiting >= self._max_queue_size:
            raise QueueFullError(
                f"the queue of {self._label} is full (max_queue_size {self._max_queue_size} requests); "
                "retry with backoff"
            )
        enqueued = time.monotonic()
        self._waiting += 1
        self._idle.clear()
        try:
            await self._acquire(deadline)
        finally:
            self._waiting -= 1
            self._maybe_idle()
        self._running += 1
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            outputs, compute = await loop.run_in_executor(self._pool, _timed_run, self._run, dict(inputs))
        finally:
            self._running -= 1
            self._slots.release()
            self._maybe_idle()
        # An unbatched model's request is one inference, whatever its shape.
        if self._on_batch is not None:
            self._on_batch(BatchStats(1, 1, (started - enqueued,), compute, succeeded=True))
        return BatchOutcome(outputs, started - enqueued, compute, 1, 1)

    async def _acquire(self, deadline: float | None) -> None:
        if deadline is None:
            await self._slots.acquire()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExpiredError(f"the deadline had passed before the request reached {self._label}")
        try:
            await asyncio.wait_for(self._slots.acquire(), remaining)
        except TimeoutError:
            raise DeadlineExpiredError(
                f"the deadline passed while the request waited for {self._label}; it was not executed"
            ) from None

    def _maybe_idle(self) -> None:
        if self._waiting == 0 and self._running == 0:
            self._idle.set()


def make_executor(
    run: RunFn,
    *,
    batched: bool,
    settings: BatchingSettings,
    name: str,
    on_batch: Callable[[BatchStats], None] | None = None,
) -> Executor:
    """The dynamic batcher for models with a batch dimension, else direct execution."""
    if batched:
        return DynamicBatcher(run, settings, name=name, on_batch=on_batch)
    return DirectExecutor(
        run, instances=settings.instances, max_queue_size=settings.max_queue_size, name=name, on_batch=on_batch
    )


def _timed_run(run: RunFn, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    started = time.perf_counter()
    outputs = run(inputs)
    return outputs, time.perf_counter() - started


__all__ = ["BatchOutcome", "DirectExecutor", "Executor", "make_executor"]
