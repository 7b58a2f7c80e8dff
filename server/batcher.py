"""Dynamic batching of one model: merge concurrent requests along axis 0, run them once, split the rows back.

The batcher knows numpy arrays and a synchronous `run(inputs) -> outputs` (an onnxruntime session's run, which is
thread-safe and releases the GIL); it never imports grpc. The servicer translates protos to arrays and the domain
exceptions raised here to status codes.

How a batch forms (one collector coroutine, read `_collect_loop` top to bottom):

1. Wait for an idle instance (a semaphore of `instances` slots), then for the first live request (an idle batcher
   waits on one future: no timers, no CPU).
2. Add what is queued, in arrival order, while it is compatible (same input names, dtypes and non-batch shapes) and
   fits `max_batch_size` rows. A request that does not fit opens the next batch, so nothing is reordered.
3. When the queue is empty and the batch could take more, ask the delay policy how long to wait for the next
   request (`batch_policy`): `fixed` waits until the first request's *arrival* + `max_queue_delay` (a request that
   already waited for a busy instance is not made to wait again: the next free instance takes what is queued at
   once, which is natural batching under load); `adaptive` waits only while the measured costs and arrivals say the
   wait pays, within the same budget. Close the batch when it is full, when it reaches a preferred size and nothing
   else is queued, or when the wait ends without an arrival.
4. Drop what expired or was cancelled meanwhile (never executed), then run the rest while the collector goes back to
   step 1: on an executor thread, or inline on the event loop when the model's measured compute time for that many
   rows is below `inline_max_compute_us` (for tiny networks the thread hand-off costs more than the model).

A shortcut for the commonest case of a small model: a request that finds the collector parked on an idle instance,
the delay policy granting no wait and the model measured cheap enough to run inline, is executed in its caller's own
step (`_runs_at_once`): the same batch of one it would have become, without the queue, a future and two task
switches, which for a tiny network are most of what the batcher costs (measured: ~36 us -> ~15 us per request).

On the threaded gRPC transport (`frontends/grpc_threads`) a request reaches `submit` on a pool thread of grpc's
server, through the loop bridge (`loop_bridge`: the loop is parked meanwhile). The same shortcut then also takes a
model too slow to run inline: the parked collector's idle instance is lent to the caller's thread, which runs the
model outside the loop (`_run_lent`), as a plain synchronous server would; requests arriving meanwhile queue as
usual and the collector dispatches them once the instance is back.

Waits are exact to tens of microseconds: the window ends on a Linux timerfd watched by the loop (`precise_timer`),
because asyncio's own timers wait in whole milliseconds (epoll) and would turn the default 100 us into ~1.1 ms.

Clock: every time here is `loop.time()`, which asyncio's event loops take from `time.monotonic()` (on Linux both
are CLOCK_MONOTONIC), so a caller's `deadline` is an absolute `time.monotonic()` value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nnserve.server.batch_merge import (
    BatchBuilder,
    BatchKey,
    batch_key,
    merge_inputs,
    own_outputs,
    request_rows,
    row_offsets,
    split_outputs,
)
from nnserve.server.batch_policy import AdaptiveDelay, CostTable
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    QueueFullError,
    ServerUnavailableError,
)
from nnserve.server.loop_bridge import off_loop_runner
from nnserve.server.precise_timer import PreciseTimer

if TYPE_CHECKING:
    from nnserve.server.tracing import BatchTrace, RequestTrace

logger = logging.getLogger(__name__)

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""A synchronous model execution: input name -> batch array, to output name -> batch array."""

_MAX_ERROR_CHARS = 300
_INLINE_MIN_SAMPLES = 16
"""Batches timed on the executor before any may run inline: one fast sample must not put a large model on the loop."""
_INLINE_ALPHA_UP = 0.02
"""How fast the compute-time floor rises: a model that really became slow leaves the loop within ~50 batches."""
_SELECTOR_RESOLUTION_S = 0.001
"""asyncio's selector waits in whole milliseconds; shorter waits without a timerfd yield to the loop instead."""


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
    trace: RequestTrace | None = None


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
        self._delay_s = settings.max_queue_delay_s
        self._inline_limit_s = settings.inline_max_compute_us / 1_000_000
        self._queue: deque[_Request] = deque()
        self._arrival: asyncio.Future[bool] | None = None  # what the collector awaits while the queue is empty
        self._parked = False  # the collector holds an idle instance and waits for a batch's first request
        self._arrival_recorded = False  # _runs_at_once already told the adaptive policy about this arrival
        self._lent = False  # the parked collector's instance runs a request on a caller's thread (_run_lent)
        self._returned: asyncio.Future[None] | None = None  # what the collector awaits until the instance is back
        self._timer: PreciseTimer | None = None
        self._slots = asyncio.Semaphore(settings.instances)
        self._pending: set[_Request] = set()  # accepted, not yet executing: what max_queue_size bounds
        self._executing = 0  # requests in batches that run now
        self._carry: _Request | None = None  # the request that did not fit the last batch; it opens the next one
        self._batch_tasks: dict[asyncio.Task[None], list[_Request]] = {}  # executing, each holding an instance
        self._free_instances = list(range(settings.instances - 1, -1, -1))  # instance numbers, lowest last
        self._task_instances: dict[asyncio.Task[None], int] = {}
        self._batch_traces: dict[int, BatchTrace] = {}  # id(batch) -> its span, for batches with a sampled request
        self._adaptive = (
            AdaptiveDelay(self._delay_s, settings.max_batch_size) if settings.delay_mode == "adaptive" else None
        )
        # Compute time by rows, decides inline execution. A floor: timed on an executor thread, a run also counts the
        # wait for the GIL after onnxruntime returns, which a busy event loop makes long and erratic.
        self._compute = CostTable(settings.max_batch_size, alpha_up=_INLINE_ALPHA_UP, alpha_down=1.0)
        self._compute_samples = 0
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
        """Batches executing now (at most `instances`), a request run on a lent instance included."""
        return len(self._batch_tasks) + self._lent

    @property
    def current_delay_s(self) -> float:
        """The longest a forming batch would now wait for one more request, in seconds (a gauge for metrics).

        `fixed`: `max_queue_delay`. `adaptive`: the window the measurements grant right now, 0 when waiting does not
        pay (a lone client, a tiny model, no measurements yet). 0 when batching is off.
        """
        if not self._settings.enabled:
            return 0.0
        if self._adaptive is None:
            return self._delay_s
        return self._adaptive.current()

    async def start(self) -> None:
        """Create the executor (one thread per instance) and the collector; call once, on the serving loop."""
        if self._collector is not None or self._stopped:
            raise RuntimeError(f"the batcher of {self._label} can be started only once")
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._settings.instances, thread_name_prefix=f"batch-{self._name or 'model'}"
        )
        self._timer = PreciseTimer(loop)
        self._collector = loop.create_task(self._collect_loop(), name=f"batch-collector-{self._name}")
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
        if self._timer is not None:
            self._timer.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None, trace: RequestTrace | None = None
    ) -> BatchOutcome:
        """Queue one request and wait for its rows of the outputs.

        Raises (before queueing) InvalidInputError, DeadlineExpiredError, QueueFullError or ServerUnavailableError;
        later DeadlineExpiredError when `deadline` (an absolute `time.monotonic()` value) passes while it is queued,
        ExecutionError when its batch fails. Cancelling the caller while queued removes the request unexecuted.
        `trace` (a sampled request's span) makes the batch it executes in traced (`nnserve.server.tracing`).
        """
        arrays, rows, now = self._validate(inputs, deadline)
        lend = off_loop_runner()  # set on a thread of the threaded transport, None on the loop
        if self._runs_at_once(rows, now, lend is not None):
            if lend is None or self._runs_inline(rows):
                return self._run_now(arrays, rows, now)
            return self._run_lent(lend, arrays, rows, now)
        request = self._enqueue(arrays, rows, now, deadline)
        request.trace = trace
        try:
            return await request.future
        except asyncio.CancelledError:
            self._forget(request)
            raise

    # -- admission ---------------------------------------------------------------------------------------------

    def _validate(
        self, inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Refuse a bad request before it can share (and fail) a batch: its arrays, rows and arrival time."""
        if not self._accepting:
            raise ServerUnavailableError(f"{self._label} is not serving (not started or shutting down)")
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            raise InvalidInputError(f"inputs must map input names to arrays, got {type(inputs).__name__}")
        arrays: dict[str, np.ndarray] = inputs  # type: ignore[assignment]  # the servicer's own dict of arrays
        if type(inputs) is not dict or any(type(value) is not np.ndarray for value in inputs.values()):
            arrays = {name: np.asarray(value) for name, value in inputs.items()}
        rows = request_rows(arrays)
        if rows > self._settings.max_batch_size:
            raise InvalidInputError(
                f"the request has {rows} rows, more than max_batch_size {self._settings.max_batch_size} of "
                f"{self._label}; split it into several requests"
            )
        now = asyncio.get_running_loop().time()
        if deadline is not None and deadline <= now:
            raise DeadlineExpiredError(f"the deadline had passed before the request reached {self._label}")
        return arrays, rows, now

    def _runs_at_once(self, rows: int, now: float, off_loop: bool = False) -> bool:
        """Whether this request would form a batch of its own and run inline at once: then it skips the queue.

        True only when the collector is parked holding an idle instance (nothing queued, nothing forming), the
        delay policy grants no wait and the model is cheap enough to run on the loop. The request then runs in the
        caller's own step: no queue, no future, no task switch, which for a tiny model is most of the batcher's cost.
        `off_loop`: the caller is a thread that can run the model itself (`_run_lent`), so any model qualifies.
        """
        if not self._parked or self._queue or self._carry is not None or self._lent:
            return False
        if not off_loop and not self._runs_inline(rows):
            return False
        if not self._settings.enabled:
            return True
        if self._adaptive is None:
            return self._delay_s <= 0
        self._adaptive.on_arrival(now, self._executing)
        self._arrival_recorded = True
        return self._adaptive.window(now, self._delay_s) <= 0

    def _enqueue(self, arrays: dict[str, np.ndarray], rows: int, now: float, deadline: float | None) -> _Request:
        """Queue a validated request (bounded by max_queue_size) and wake the collector."""
        recorded, self._arrival_recorded = self._arrival_recorded, False
        if len(self._pending) >= self._settings.max_queue_size:
            raise QueueFullError(
                f"the queue of {self._label} is full (max_queue_size {self._settings.max_queue_size} requests); "
                "retry with backoff"
            )
        loop = asyncio.get_running_loop()
        request = _Request(arrays, rows, batch_key(arrays), loop.create_future(), now, deadline)
        if deadline is not None:
            request.timer = loop.call_at(deadline, self._expire, request)
        if self._adaptive is not None and not recorded:
            self._adaptive.on_arrival(now, len(self._pending) + self._executing)
        self._pending.add(request)
        self._queue.append(request)
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(True)
        return request

    def _run_now(self, arrays: dict[str, np.ndarray], rows: int, arrived: float) -> BatchOutcome:
        """Execute a lone request inline, in the caller's step (see `_runs_at_once`)."""
        self._arrival_recorded = False
        waited = asyncio.get_running_loop().time() - arrived
        return self._run_alone(rows, waited, self._run, arrays)

    def _run_lent(self, run_unlocked: Callable[..., Any], arrays: dict[str, np.ndarray], rows: int,
                  arrived: float) -> BatchOutcome:
        """Execute a lone request on the caller's thread, the loop free meanwhile (see the module docstring).

        The parked collector keeps holding the instance; `_lent` keeps every other request off it (they queue) and
        makes the collector wait for it (`_instance_returned`) before it collects what queued meanwhile.
        """
        self._arrival_recorded = False
        waited = asyncio.get_running_loop().time() - arrived
        self._lent = True
        self._executing += 1
        try:
            return self._run_alone(rows, waited, run_unlocked, self._run, arrays)  # the loop runs meanwhile
        finally:
            self._executing -= 1
            self._lent = False
            returned = self._returned
            if returned is not None and not returned.done():
                returned.set_result(None)

    def _run_alone(self, rows: int, waited: float, call: Callable[..., dict[str, np.ndarray]],
                   *args: Any) -> BatchOutcome:
        """One request as its own batch, `call(*args)` giving the model's outputs: timed, learnt from, reported."""
        started = time.perf_counter()
        try:
            outputs = call(*args)
            compute_seconds = time.perf_counter() - started
            part = own_outputs(outputs, rows)
        except Exception as exc:
            message = f"{self._label} failed to run a batch of {rows} rows (1 request): {_first_line(exc)}"
            # DEBUG: the message can quote request values; the runner logs a data-free ERROR line itself.
            logger.debug("%s", message, exc_info=exc)
            self._report(BatchStats(rows, 1, (waited,), time.perf_counter() - started, succeeded=False))
            raise ExecutionError(message) from None
        self._learn(rows, compute_seconds, compute_seconds)
        self._report(BatchStats(rows, 1, (waited,), compute_seconds, succeeded=True))
        return BatchOutcome(part, waited, compute_seconds, rows, 1)

    async def _instance_returned(self) -> None:
        """Until the instance lent to a caller's thread is back (a lone run: a model's time, not a queue's)."""
        while self._lent:
            self._returned = asyncio.get_running_loop().create_future()
            try:
                await self._returned
            finally:
                self._returned = None

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
        """Forever: an idle instance, then a batch for it, then hand the batch over and go on."""
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            self._dispatch(batch)

    async def _collect(self) -> list[_Request]:
        """Form one batch: what is queued, then what arrives while the delay policy grants a wait."""
        first = await self._take(until=None)
        assert first is not None  # without a bound, _take waits for a request
        # The instance may be lent to a caller's thread (`_run_lent`): wait for it before collecting, so what queues
        # meanwhile joins this batch, as requests queued behind a running batch do.
        await self._instance_returned()
        if not self._settings.enabled:
            return [first]
        builder = BatchBuilder(self._settings.max_batch_size, self._preferred)
        builder.add(first.key, first.rows)
        batch = [first]
        budget_end = first.enqueued_at + self._delay_s
        loop = asyncio.get_running_loop()
        while not builder.full:
            request = self._take_queued()
            if request is None:
                if builder.at_preferred_size:
                    break
                now = loop.time()
                wait = self._window(now, budget_end)
                if wait <= 0:
                    break
                request = await self._take(until=now + wait)
                if request is None:
                    if self._adaptive is not None:
                        self._adaptive.on_window_expired()
                    break
            if not builder.accepts(request.key, request.rows):
                self._carry = request
                break
            builder.add(request.key, request.rows)
            batch.append(request)
        return batch

    def _window(self, now: float, budget_end: float) -> float:
        """How long the forming batch may wait for its next request (0: close it)."""
        budget_left = budget_end - now
        if self._adaptive is None:
            return budget_left
        if budget_left <= 0:
            return 0.0
        return self._adaptive.window(now, budget_left)

    def _take_queued(self) -> _Request | None:
        """The next live request already here (the carried one first), without waiting."""
        if self._carry is not None:
            request, self._carry = self._carry, None
            if self._is_live(request):
                return request
        while self._queue:
            request = self._queue.popleft()
            if self._is_live(request):
                return request
        return None

    async def _take(self, until: float | None) -> _Request | None:
        """The next live request, waiting for one until the loop time `until` (None: no bound); None after it."""
        loop = asyncio.get_running_loop()
        while True:
            request = self._take_queued()
            if request is not None:
                return request
            if until is not None and until <= loop.time():
                return None
            if not await self._wait_for_arrival(until):
                return self._take_queued()

    async def _wait_for_arrival(self, until: float | None) -> bool:
        """Sleep until a request is queued (True) or until `until` (False); never polls while the batcher is idle."""
        loop = asyncio.get_running_loop()
        timer = self._timer
        assert timer is not None  # set by start()
        if until is not None and not timer.precise and until - loop.time() < _SELECTOR_RESOLUTION_S:
            # No timerfd: a selector timer would round this up to 1 ms. Yield one loop iteration instead (network
            # callbacks run and may queue a request); the caller comes back until the window has passed.
            await asyncio.sleep(0)
            return bool(self._queue)
        arrival = loop.create_future()
        self._arrival = arrival
        self._parked = until is None
        if until is not None:
            timer.call_at(until, self._end_wait)
        try:
            return await arrival
        finally:
            self._arrival = None
            self._parked = False
            if until is not None:
                timer.cancel()

    def _end_wait(self) -> None:
        """The wait window has passed without an arrival."""
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(False)

    def _is_live(self, request: _Request) -> bool:
        """False for requests cancelled, expired or failed while queued (expiring them now if their timer lags)."""
        if request.future.done():
            return False
        if request.deadline is not None and request.deadline <= request.future.get_loop().time():
            self._expire(request)
            return False
        return True

    def _dispatch(self, batch: list[_Request]) -> None:
        """Drop what died during the window, then execute the rest on the instance the collector holds."""
        live = [request for request in batch if self._is_live(request)]
        if not live:
            self._slots.release()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        traced: list[RequestTrace] | None = None
        for request in live:
            request.dispatched = True
            self._forget(request)
            if request.trace is not None:
                traced = traced or []
                traced.append(request.trace)
        queue_seconds = tuple(now - request.enqueued_at for request in live)
        rows = sum(request.rows for request in live)
        if self._runs_inline(rows):
            if traced is not None:
                self._trace_batch(live, traced, rows, self._free_instances[-1], inline=True)
            try:
                self._execute_inline(live, queue_seconds, rows)
            finally:
                self._slots.release()
            return
        # Merge and hand the batch to its thread here, not in the task's first step: that step would run only after
        # every callback already queued (responses of the previous batch), leaving the instance idle meanwhile.
        try:
            merged = merge_inputs([request.inputs for request in live])
        except Exception as exc:
            self._slots.release()
            self._fail_batch(live, queue_seconds, 0.0, exc)
            return
        for request in live:
            request.inputs = {}
        instance = self._free_instances.pop()
        if traced is not None:
            self._trace_batch(live, traced, rows, instance, inline=False)
        work = loop.run_in_executor(self._executor, _timed_run, self._run, merged)
        self._executing += len(live)
        task = loop.create_task(self._execute(live, queue_seconds, now, work))
        self._batch_tasks[task] = live
        self._task_instances[task] = instance
        task.add_done_callback(self._on_batch_done)

    def _trace_batch(self, batch: list[_Request], traced: list[RequestTrace], rows: int, instance: int, *,
                     inline: bool) -> None:
        """Start the span of a batch serving sampled requests (it ends when the batch is settled)."""
        try:
            span = traced[0].tracing.start_batch(traced, rows=rows, requests=len(batch), instance=instance,
                                                 inline=inline)
        except Exception:  # tracing must never fail a batch
            logger.debug("starting the span of a batch of %s failed", self._label, exc_info=True)
            return
        self._batch_traces[id(batch)] = span

    def _end_batch_trace(self, batch: list[_Request], seconds: float, error: BaseException | None) -> None:
        span = self._batch_traces.pop(id(batch), None)
        if span is not None:
            try:
                span.end(seconds, error)
            except Exception:
                logger.debug("ending the span of a batch of %s failed", self._label, exc_info=True)

    def _runs_inline(self, rows: int) -> bool:
        """Whether this batch is cheap enough, by the model's measured compute time, to run on the event loop."""
        if self._inline_limit_s <= 0 or self._compute_samples < _INLINE_MIN_SAMPLES:
            return False
        return self._compute.predict(rows) < self._inline_limit_s

    # -- execution ----------------------------------------------------------------------------------------------

    async def _execute(
        self,
        batch: list[_Request],
        queue_seconds: tuple[float, ...],
        dispatched: float,
        work: asyncio.Future[tuple[dict[str, np.ndarray], float]],
    ) -> None:
        """Wait for one batch's thread and settle every request of it; a failure fails this batch only."""
        loop = asyncio.get_running_loop()
        try:
            try:
                outputs, compute_seconds = await work
            except Exception as exc:
                self._free_instance(asyncio.current_task())
                self._fail_batch(batch, queue_seconds, loop.time() - dispatched, exc)
                return
            # Free the instance before answering: the collector's wake-up is then queued ahead of the callers'
            # responses, so the next batch is already computing while this one's responses are encoded and sent.
            self._free_instance(asyncio.current_task())
            self._learn(sum(request.rows for request in batch), compute_seconds, loop.time() - dispatched)
            self._settle(batch, queue_seconds, outputs, compute_seconds)
        finally:
            self._executing -= len(batch)

    def _free_instance(self, task: asyncio.Task[Any] | None) -> None:
        """Give the instance of a batch task back (once): `in_flight_batches` never exceeds `instances`."""
        if task is not None and self._batch_tasks.pop(task, None) is not None:  # type: ignore[arg-type]
            self._free_instances.append(self._task_instances.pop(task))  # type: ignore[arg-type]
            self._slots.release()

    def _execute_inline(self, batch: list[_Request], queue_seconds: tuple[float, ...], rows: int) -> None:
        """Run one batch on the event loop itself (tiny models only, see `_runs_inline`) and settle it."""
        started = time.perf_counter()
        try:
            merged = merge_inputs([request.inputs for request in batch])
            for request in batch:
                request.inputs = {}
            started = time.perf_counter()
            outputs = self._run(merged)
        except Exception as exc:
            self._fail_batch(batch, queue_seconds, time.perf_counter() - started, exc)
            return
        compute_seconds = time.perf_counter() - started
        self._learn(rows, compute_seconds, compute_seconds)
        self._settle(batch, queue_seconds, outputs, compute_seconds)

    def _learn(self, rows: int, compute_seconds: float, occupancy_seconds: float) -> None:
        """Feed the measurements that decide inline execution and the adaptive delay."""
        self._compute.record(rows, compute_seconds)
        self._compute_samples += 1
        if self._adaptive is not None:
            self._adaptive.on_batch(rows, occupancy_seconds)

    def _settle(
        self,
        batch: list[_Request],
        queue_seconds: tuple[float, ...],
        outputs: Mapping[str, np.ndarray],
        compute_seconds: float,
    ) -> None:
        """Split the outputs and give every caller its rows (or the batch's error if the split is refused)."""
        rows = [request.rows for request in batch]
        total = sum(rows)
        try:
            parts = split_outputs(outputs, rows)
        except Exception as exc:
            self._fail_batch(batch, queue_seconds, compute_seconds, exc)
            return
        for request, part, waited in zip(batch, parts, queue_seconds, strict=True):
            if not request.future.done():  # a caller cancelled during execution: its rows are dropped
                request.future.set_result(BatchOutcome(part, waited, compute_seconds, total, len(batch)))
        self._report(BatchStats(total, len(batch), queue_seconds, compute_seconds, succeeded=True))
        if self._batch_traces:
            self._end_batch_trace(batch, compute_seconds, None)

    def _fail_batch(
        self, batch: list[_Request], queue_seconds: tuple[float, ...], seconds: float, exc: Exception
    ) -> None:
        """Fail every request of one batch with the same clear message; other batches are untouched."""
        total = sum(request.rows for request in batch)
        message = f"{self._label} failed to run a batch of {total} rows ({len(batch)} requests): {_first_line(exc)}"
        # DEBUG: the message can quote request values; the runner logs a data-free ERROR line itself.
        logger.debug("%s", message, exc_info=exc)
        for request in batch:
            _settle_error(request.future, ExecutionError(message))
        self._report(BatchStats(total, len(batch), queue_seconds, seconds, succeeded=False))
        if self._batch_traces:
            self._end_batch_trace(batch, seconds, exc)

    def _on_batch_done(self, task: asyncio.Task[None]) -> None:
        """Give the instance back once the task is gone, so `in_flight_batches` never exceeds `instances`.

        Here rather than in the task: a task that stop cancels (maybe before its first step) still settles its
        callers and frees its slot.
        """
        batch = self._batch_tasks.get(task)
        if batch is None:  # the task freed its instance itself and settled its callers
            return
        self._free_instance(task)
        if task.cancelled():
            error = f"{self._label} stopped before the batch finished; its results are lost"
        elif task.exception() is not None:
            logger.error("executing a batch of %s failed", self._label, exc_info=task.exception())
            error = f"{self._label} failed to execute the batch after an internal error"
        else:
            return
        for request in batch:
            _settle_error(request.future, ServerUnavailableError(error))
        if self._batch_traces:
            self._end_batch_trace(batch, 0.0, ServerUnavailableError(error))

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


__all__ = [  # the merge helpers are re-exported: they are part of the batcher's tested surface
    "BatchBuilder",
    "BatchKey",
    "BatchOutcome",
    "BatchStats",
    "DynamicBatcher",
    "RunFn",
    "batch_key",
    "merge_inputs",
    "request_rows",
    "row_offsets",
    "split_outputs",
]
