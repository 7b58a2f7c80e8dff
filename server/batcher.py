"""Dynamic batching of one model: merge concurrent requests along axis 0, run them once, split the rows back.

The batcher knows numpy arrays and a synchronous `run(inputs) -> outputs` (an onnxruntime session's run, which is
thread-safe and releases the GIL); it never imports grpc. The servicer translates protos to arrays and the domain
exceptions raised here to status codes.

How a batch forms (one collector coroutine, read `_collect_loop` top to bottom):

1. Wait for an idle instance (a semaphore of `instances` slots), then for the first live request (`queue.get()`:
   an idle batcher has no timers and spends no CPU).
2. One deadline per batch: the first request's *arrival* + `max_queue_delay`. Counting from arrival is the one
   cheap rule beyond a fixed window: a request that already waited because every instance was busy is not made to
   wait again, so the next free instance takes what is queued at once (natural batching under load), and no
   request ever waits more than `max_queue_delay` for companions.
3. Add requests in arrival order while they are compatible (same input names, dtypes and non-batch shapes) and fit
   `max_batch_size` rows. Close the batch when it is full, when it reaches a preferred size and nothing else is
   queued, when the deadline passes, or when the next request does not fit: that request opens the next batch, so
   nothing is reordered.
4. Drop what expired or was cancelled meanwhile (never executed), then run the rest in the executor while the
   collector goes back to step 1.

Clock: every time here is `loop.time()`, which asyncio's event loops take from `time.monotonic()` (on Linux both
are CLOCK_MONOTONIC), so a caller's `deadline` is an absolute `time.monotonic()` value.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    QueueFullError,
    ServerUnavailableError,
)

logger = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""A synchronous model execution: input name -> batch array, to output name -> batch array."""

BatchKey = tuple[tuple[str, np.dtype, tuple[int, ...]], ...]
"""Input names with their dtypes and non-batch shapes: only requests with equal keys can be concatenated."""

_MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one request got back: its own rows of every output, and where its time went (for metrics)."""

    outputs: dict[str, np.ndarray]
    """This request's rows only, in its order (views into the batch's outputs, no copy)."""
    queue_seconds: float
    """From submit to the start of its batch's execution."""
    compute_seconds: float
    """Run time of the batch it was executed in."""
    batch_rows: int
    """Rows of that batch."""
    batch_requests: int
    """Requests merged into that batch."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """One executed batch, passed to the `on_batch` hook; the hook runs on the event loop, so it must be quick."""

    rows: int
    requests: int
    queue_seconds: tuple[float, ...]
    """Queue wait of each request of the batch."""
    compute_seconds: float
    succeeded: bool


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: request validation, merge and split. Property-tested; the batcher is glue around them.


def request_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows of a request, i.e. its axis 0, which must be the same (and >= 1) for every input."""
    if not inputs:
        raise InvalidInputError("the request has no inputs")
    rows: int | None = None
    first = ""
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidInputError(f"input '{name}' is a scalar; a batched model needs a batch dimension (axis 0)")
        if rows is None:
            rows, first = array.shape[0], name
        elif array.shape[0] != rows:
            raise InvalidInputError(
                f"input '{name}' has {array.shape[0]} rows but input '{first}' has {rows}; "
                "all inputs of a request need the same batch dimension (axis 0)"
            )
    if not rows:
        raise InvalidInputError("the request has 0 rows; send at least one row")
    return rows


def batch_key(inputs: Mapping[str, np.ndarray]) -> BatchKey:
    """The compatibility key: names, dtypes and shapes after axis 0 (names are unique, so sorting is total)."""
    return tuple(sorted((name, array.dtype, array.shape[1:]) for name, array in inputs.items()))


def row_offsets(rows: Sequence[int]) -> list[int]:
    """`[0, r0, r0 + r1, ..., total]`: request i owns rows `offsets[i]:offsets[i + 1]` of the batch."""
    return list(itertools.accumulate(rows, initial=0))


def merge_inputs(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate requests with one batch key along axis 0; a lone request is passed through without a copy."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([request[name] for request in requests], axis=0) for name in requests[0]}


def split_outputs(outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Give each request its rows of every output, refusing outputs whose row count is not the batch's.

    A model that drops or adds rows would silently hand one caller another caller's results, so that is an
    ExecutionError for the whole batch rather than a best-effort split.
    """
    if not isinstance(outputs, Mapping):
        raise ExecutionError(f"the model returned {type(outputs).__name__}, expected a mapping of output arrays")
    offsets = row_offsets(rows)
    total = offsets[-1]
    arrays: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != total:
            found = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
            raise ExecutionError(f"output '{name}' has {found} for a batch of {total} input rows")
        arrays[name] = array
    return [{name: array[start:stop] for name, array in arrays.items()} for start, stop in itertools.pairwise(offsets)]


@dataclass(slots=True)
class BatchBuilder:
    """Admission rules of one forming batch, apart from the asyncio code so that they can be tested alone."""

    max_rows: int
    preferred_sizes: frozenset[int] = frozenset()
    key: Hashable = None
    rows: int = 0
    requests: int = 0

    def accepts(self, key: Hashable, rows: int) -> bool:
        """Whether a request fits: the batch's key, and the rows still free (a request is never split)."""
        if self.requests == 0:
            return rows <= self.max_rows
        return key == self.key and self.rows + rows <= self.max_rows

    def add(self, key: Hashable, rows: int) -> None:
        """Admit a request that `accepts` allowed."""
        if not self.accepts(key, rows):
            raise ValueError(f"a request of {rows} rows does not fit this batch ({self.rows}/{self.max_rows} rows)")
        self.key = key
        self.rows += rows
        self.requests += 1

    @property
    def full(self) -> bool:
        """No further row fits."""
        return self.rows >= self.max_rows

    @property
    def at_preferred_size(self) -> bool:
        """The batch has a preferred row count, so it may close without waiting."""
        return self.rows in self.preferred_sizes


# ---------------------------------------------------------------------------------------------------------------
# The batcher.


@dataclass(eq=False, slots=True)
class _Request:
    """A queued request: its arrays, its caller's future and its clocks. Identity-hashed (kept in a set)."""

    inputs: dict[str, np.ndarray]
    rows: int
    key: BatchKey
    future: asyncio.Future[BatchOutcome]
    enqueued_at: float
    deadline: float | None
    timer: asyncio.TimerHandle | None = None
    dispatched: bool = False


class DynamicBatcher:
    """Queue, merge and execute the requests of one model; see the module docstring for how batches form."""

    def __init__(
        self,
        run: RunFn,
        settings: BatchingSettings,
        *,
        name: str = "",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        settings.validate()
        self._run = run
        self._settings = settings
        self._name = name
        self._on_batch = on_batch
        self._label = f"model '{name}'" if name else "the model"
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.instances)
        self._pending: set[_Request] = set()  # accepted, not yet executing: what max_queue_size bounds
        self._carry: _Request | None = None  # the request that did not fit the last batch; it opens the next one
        self._batch_tasks: dict[asyncio.Task[None], list[_Request]] = {}  # executing, each holding an instance
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None
        self._accepting = False
        self._stopped = False
        self._hook_failed = False

    @property
    def settings(self) -> BatchingSettings:
        """The settings this batcher was built with."""
        return self._settings

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet executing (the number `max_queue_size` bounds)."""
        return len(self._pending)

    @property
    def in_flight_batches(self) -> int:
        """Batches executing now (at most `instances`)."""
        return len(self._batch_tasks)

    async def start(self) -> None:
        """Create the executor (one thread per instance) and the collector; call once, on the serving loop."""
        if self._collector is not None or self._stopped:
            raise RuntimeError(f"the batcher of {self._label} can be started only once")
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.instances, thread_name_prefix=f"batch-{self._name or 'model'}"
        )
        self._collector = asyncio.get_running_loop().create_task(
            self._collect_loop(), name=f"batch-collector-{self._name}"
        )
        self._collector.add_done_callback(self._on_collector_done)
        self._accepting = True

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with drain, finish everything queued and executing, else fail the queued requests.

        Whatever is still queued or executing when `timeout` seconds have passed fails with ServerUnavailableError
        (a running onnxruntime call cannot be interrupted; its thread is left to finish and its results dropped).
        """
        if self._stopped:
            return
        self._stopped = True
        self._accepting = False
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        if not drain:
            self._fail_pending(f"{self._label} stopped before the request could run; it was not executed")
        await _wait_until([request.future for request in self._pending], until)
        await _wait_until(self._batch_tasks, until)
        self._fail_pending(f"{self._label} did not drain within {timeout} s; the request was not executed")
        for task in self._batch_tasks:
            task.cancel()
        await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None) -> BatchOutcome:
        """Queue one request and wait for its rows of the outputs.

        Raises (before queueing) InvalidInputError, DeadlineExpiredError, QueueFullError or ServerUnavailableError;
        later DeadlineExpiredError when `deadline` (an absolute `time.monotonic()` value) passes while it is queued,
        ExecutionError when its batch fails. Cancelling the caller while queued removes the request unexecuted.
        """
        request = self._admit(inputs, deadline)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._forget(request)
            raise

    # -- admission ---------------------------------------------------------------------------------------------

    def _admit(self, inputs: Mapping[str, np.ndarray], deadline: float | None) -> _Request:
        """Validate and enqueue, so that one bad request is refused before it can share (and fail) a batch."""
        if not self._accepting:
            raise ServerUnavailableError(f"{self._label} is not serving (not started or shutting down)")
        if not isinstance(inputs, Mapping):
            raise InvalidInputError(f"inputs must map input names to arrays, got {type(inputs).__name__}")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        rows = request_rows(arrays)
        if rows > self._settings.max_batch_size:
            raise InvalidInputError(
                f"the request has {rows} rows, more than max_batch_size {self._settings.max_batch_size} of "
                f"{self._label}; split it into several requests"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExpiredError(f"the deadline had passed before the request reached {self._label}")
        if len(self._pending) >= self._settings.max_queue_size:
            raise QueueFullError(
                f"the queue of {self._label} is full (max_queue_size {self._settings.max_queue_size} requests); "
                "retry with backoff"
            )
        request = _Request(arrays, rows, batch_key(arrays), loop.create_future(), now, deadline)
        if deadline is not None:
            request.timer = loop.call_at(deadline, self._expire, request)
        self._pending.add(request)
        self._queue.put_nowait(request)
        return request

    def _expire(self, request: _Request) -> None:
        """Fail a request whose deadline passed before it was dispatched; it is skipped, never executed."""
        if request.dispatched or request.future.done():
            return
        waited_ms = (request.future.get_loop().time() - request.enqueued_at) * 1000
        request.future.set_exception(
            DeadlineExpiredError(
                f"the deadline passed after {waited_ms:.1f} ms in the queue of {self._label}; "
                "the request was not executed"
            )
        )
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        """Stop counting a request that left the queue unexecuted, and drop its arrays at once."""
        self._pending.discard(request)
        if request.timer is not None:
            request.timer.cancel()
        if not request.dispatched:
            request.inputs = {}

    def _fail_pending(self, message: str) -> None:
        """Fail every queued request (each with its own exception object)."""
        for request in list(self._pending):
            if not request.future.done():
                request.future.set_exception(ServerUnavailableError(message))
            self._forget(request)

    # -- batch formation -----------------------------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        """Forever: an idle instance, then a batch for it, then hand the batch to a task and go on."""
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            self._dispatch(batch)

    async def _collect(self) -> list[_Request]:
        """Form one batch under a single deadline: first request's arrival + max_queue_delay."""
        first = await self._take(deadline=None)
        assert first is not None  # without a deadline, _take waits for a request
        if not self._settings.enabled:
            return [first]
        builder = BatchBuilder(self._settings.max_batch_size, self._preferred)
        builder.add(first.key, first.rows)
        batch = [first]
        deadline = first.enqueued_at + self._settings.max_queue_delay_s
        while not builder.full:
            if builder.at_preferred_size and self._queue.empty():
                break
            request = await self._take(deadline)
            if request is None:
                break
            if not builder.accepts(request.key, request.rows):
                self._carry = request
                break
            builder.add(request.key, request.rows)
            batch.append(request)
        return batch

    async def _take(self, deadline: float | None) -> _Request | None:
        """The next live request (the carried one first), or None once the batch deadline has passed."""
        if self._carry is not None:
            request, self._carry = self._carry, None
            if self._is_live(request):
                return request
        while True:
            request = await self._get(deadline)
            if request is None or self._is_live(request):
                return request

    async def _get(self, deadline: float | None) -> _Request | None:
        """`queue.get()` bounded by the batch deadline; what is already queued is taken even after it."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        if deadline is None:
            return await self._queue.get()
        if deadline <= asyncio.get_running_loop().time():
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            return None

    def _is_live(self, request: _Request) -> bool:
        """False for requests cancelled, expired or failed while queued (expiring them now if their timer lags)."""
        if request.future.done():
            return False
        if request.deadline is not None and request.deadline <= request.future.get_loop().time():
            self._expire(request)
            return False
        return True

    def _dispatch(self, batch: list[_Request]) -> None:
        """Drop what died during the window, then start executing the rest on the slot the collector holds."""
        live = [request for request in batch if self._is_live(request)]
        if not live:
            self._slots.release()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for request in live:
            request.dispatched = True
            self._forget(request)
        queue_seconds = tuple(now - request.enqueued_at for request in live)
        task = loop.create_task(self._execute(live, queue_seconds))
        self._batch_tasks[task] = live
        task.add_done_callback(self._on_batch_done)

    # -- execution ----------------------------------------------------------------------------------------------

    async def _execute(self, batch: list[_Request], queue_seconds: tuple[float, ...]) -> None:
        """Run one batch and settle every request of it; a failure fails this batch only."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        rows = [request.rows for request in batch]
        total = sum(rows)
        try:
            outputs, compute_seconds = await self._run_in_executor(batch)
            parts = split_outputs(outputs, rows)
        except Exception as exc:
            message = f"{self._label} failed to run a batch of {total} rows ({len(batch)} requests): {_first_line(exc)}"
            logger.warning("%s", message, exc_info=exc)
            for request in batch:
                _settle_error(request.future, ExecutionError(message))
            self._report(BatchStats(total, len(batch), queue_seconds, loop.time() - started, succeeded=False))
        else:
            for request, part, waited in zip(batch, parts, queue_seconds, strict=True):
                if not request.future.done():  # a caller cancelled during execution: its rows are dropped
                    request.future.set_result(BatchOutcome(part, waited, compute_seconds, total, len(batch)))
            self._report(BatchStats(total, len(batch), queue_seconds, compute_seconds, succeeded=True))

    def _on_batch_done(self, task: asyncio.Task[None]) -> None:
        """Give the instance back once the task is gone, so `in_flight_batches` never exceeds `instances`.

        Here rather than in the task: a task that stop cancels (maybe before its first step) still settles its
        callers and frees its slot.
        """
        batch = self._batch_tasks.pop(task)
        self._slots.release()
        if task.cancelled():
            error = f"{self._label} stopped before the batch finished; its results are lost"
        elif task.exception() is not None:
            logger.error("executing a batch of %s failed", self._label, exc_info=task.exception())
            error = f"{self._label} failed to execute the batch after an internal error"
        else:
            return
        for request in batch:
            _settle_error(request.future, ServerUnavailableError(error))

    async def _run_in_executor(self, batch: list[_Request]) -> tuple[dict[str, np.ndarray], float]:
        """Merge, then run on an instance thread; the event loop stays free while the model computes."""
        merged = merge_inputs([request.inputs for request in batch])
        for request in batch:
            request.inputs = {}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _timed_run, self._run, merged)

    def _report(self, stats: BatchStats) -> None:
        """Call the metrics hook; a broken hook is logged and never breaks serving."""
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            # One traceback is enough to fix a broken hook; a log line per batch would drown everything else.
            logger.log(
                logging.DEBUG if self._hook_failed else logging.ERROR,
                "the on_batch hook of %s failed",
                self._label,
                exc_info=True,
            )
            self._hook_failed = True

    def _on_collector_done(self, task: asyncio.Task[None]) -> None:
        """A collector that dies of a bug must not leave callers hanging: fail them and refuse new work."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("the batch collector of %s failed", self._label, exc_info=task.exception())
        self._accepting = False
        self._fail_pending(f"{self._label} cannot batch requests after an internal error")


def _timed_run(run: RunFn, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Run on the executor thread and time it there, so compute time excludes thread hand-off and loop lag."""
    started = time.perf_counter()
    outputs = run(inputs)
    return outputs, time.perf_counter() - started


def _settle_error(future: asyncio.Future[BatchOutcome], error: Exception) -> None:
    """Set an exception unless the caller already went away (cancelled) or was settled."""
    if not future.done():
        future.set_exception(error)


def _first_line(exc: BaseException) -> str:
    """The first line of an error, bounded: native onnxruntime errors carry stack text the client must not get."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 3] + "..."


async def _wait_until(awaitables: Iterable[asyncio.Future[Any]], until: float | None) -> None:
    """Wait for all of them, or until the loop time `until` (None: no bound)."""
    awaitables = list(awaitables)
    if not awaitables:
        return
    timeout = None if until is None else max(0.0, until - asyncio.get_running_loop().time())
    await asyncio.wait(awaitables, timeout=timeout)
