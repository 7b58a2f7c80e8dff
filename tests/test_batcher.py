"""Behaviour of the dynamic batcher with real asyncio, real threads and real numpy.

The model is a plain numpy function (a dense layer, a row sum and an echo of its input): it is the model here, not a
mock of onnxruntime. Inputs are built so that every row says which request and which row it is, so a row handed to
the wrong caller, reordered or executed when it should not be is visible in the outputs and in what the model saw.

No assertion here depends on how fast the machine is: "at once", "promptly" and "no CPU" are stated as orderings
(the error arrived while the batch ahead of it was still running) and counts (the windows the batcher armed, the
times an idle event loop woke up), so a slow or busy CI machine cannot fail them. How long windows and wake-ups
actually take is a benchmark figure (benchmarks/batch_window.py).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import selectors
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, TypeVar

import numpy as np
import pytest

from nnserve.server import batcher as batcher_module
from nnserve.server import batching_settings
from nnserve.server.batcher import BatchOutcome, BatchStats, DynamicBatcher
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    QueueFullError,
    ServerUnavailableError,
)
from nnserve.server.precise_timer import PreciseTimer
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
FEATURES = 4
WEIGHTS = np.linspace(-1.0, 1.0, FEATURES * 3).reshape(FEATURES, 3)
BIAS = np.array([0.5, -1.0, 2.0])
ROW_TAG = 1000  # x[row, 0] == request * ROW_TAG + row * 10: every row names its request and its position
MS = 1000  # microseconds per millisecond, for max_queue_delay_us


def dense(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model: a dense layer, a second output, and an exact echo that makes row ownership checkable."""
    x = inputs["x"]
    return {"y": x @ WEIGHTS + BIAS, "row_sum": x.sum(axis=1), "echo": x.copy()}


def request_x(request: int, rows: int, dtype: type = np.float64) -> np.ndarray:
    """Rows that name their request and row: x[j] = request * ROW_TAG + j * 10 + [0, 1, 2, 3]."""
    column = request * ROW_TAG + np.arange(rows)[:, None] * 10
    return (column + np.arange(FEATURES)).astype(dtype)


def request_ids(x: np.ndarray) -> list[int]:
    """Which request each row of a batch came from."""
    return [int(value) // ROW_TAG for value in x[:, 0]]


def assert_own_rows(outcome: BatchOutcome, x: np.ndarray) -> None:
    """The caller got exactly its rows, in order, and the numbers a numpy forward pass gives."""
    np.testing.assert_array_equal(outcome.outputs["echo"], x)
    # BLAS may sum in another order for a batch than for one request: allow rounding, far below a row's distance.
    np.testing.assert_allclose(outcome.outputs["y"], x @ WEIGHTS + BIAS, rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(outcome.outputs["row_sum"], x.sum(axis=1), rtol=1e-12, atol=1e-6)


class Model:
    """Runs `fn` on the executor thread and records what it saw; optionally blocks until released."""

    def __init__(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = dense, *, gated: bool = False):
        self.fn = fn
        self.batches: list[dict[str, np.ndarray]] = []
        self.started_at: list[float] = []
        self.started = threading.Event()
        self.peak_concurrency = 0
        self._gate = threading.Event()
        self._running = 0
        self._lock = threading.Lock()
        if not gated:
            self._gate.set()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.batches.append({name: array.copy() for name, array in inputs.items()})
            self.started_at.append(time.monotonic())
            self._running += 1
            self.peak_concurrency = max(self.peak_concurrency, self._running)
        self.started.set()
        try:
            if not self._gate.wait(timeout=10):
                raise TimeoutError("test gate never opened")
            return self.fn(inputs)
        finally:
            with self._lock:
                self._running -= 1

    def release(self) -> None:
        """Let blocked and future runs proceed."""
        self._gate.set()

    @property
    def running(self) -> int:
        """Batches inside the model right now."""
        with self._lock:
            return self._running

    async def wait_started(self) -> None:
        """Wait (off the loop) until some batch reached the model."""
        assert await asyncio.to_thread(self.started.wait, 10)

    def seen_ids(self) -> list[int]:
        """Request ids of every row the model executed, in execution order."""
        return [rid for batch in self.batches for rid in request_ids(batch["x"])]


def serve(
    model: Model,
    scenario: Callable[[DynamicBatcher], Awaitable[T]],
    *,
    on_batch: Callable[[BatchStats], None] | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    **settings: Any,
) -> T:
    """Run a scenario against a started batcher on a fresh event loop; always release the model and stop."""

    async def main() -> T:
        batcher = DynamicBatcher(model, BatchingSettings(**settings), name="dense", on_batch=on_batch)
        await batcher.start()
        try:
            return await scenario(batcher)
        finally:
            model.release()
            await batcher.stop(drain=False, timeout=5)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


async def submit_x(batcher: DynamicBatcher, request: int, rows: int, **kwargs: Any) -> BatchOutcome:
    """Submit the tagged rows of one request."""
    return await batcher.submit({"x": request_x(request, rows)}, **kwargs)


def spawn_submit(batcher: DynamicBatcher, request: int, rows: int = 1, **kwargs: Any) -> asyncio.Task[BatchOutcome]:
    """Submit as a task; its request is queued as soon as the loop runs the task's first step."""
    return asyncio.get_running_loop().create_task(submit_x(batcher, request, rows, **kwargs))


@dataclass(frozen=True)
class Window:
    """One batch window a batcher armed on its timer."""

    armed_at: float
    """Loop time when the batcher armed it."""
    due: float
    """The loop time at which it ends."""
    precise: bool
    """On a timerfd (exact), not asyncio's millisecond timers."""


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> list[Window]:
    """Every window the batchers of a test arm, recorded by their own, real timer: a wait the batcher decides on is
    a window here, so "it did not wait" is `windows == []` rather than a guess from a clock."""
    armed: list[Window] = []

    class RecordingTimer(PreciseTimer):
        def call_at(self, when: float, callback: Callable[[], None]) -> None:
            armed.append(Window(asyncio.get_running_loop().time(), when, self.precise))
            super().call_at(when, callback)

    monkeypatch.setattr(batcher_module, "PreciseTimer", RecordingTimer)
    return armed


class RecordingSelector(selectors.DefaultSelector):
    """The event loop's real selector, recording every wait: (timeout the loop asked for, events it returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[float | None, int]] = []

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self.waits.append((timeout, len(ready)))
        return ready


# -- correctness of merge and split under concurrency --------------------------------------------------------------


@pytest.mark.parametrize("instances", [1, 2])
def test_hundreds_of_concurrent_requests_each_get_exactly_their_own_rows(instances: int) -> None:
    rng = np.random.default_rng(7)
    row_counts = [int(n) for n in rng.integers(1, 7, size=300)]
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(submit_x(batcher, i, rows) for i, rows in enumerate(row_counts)))

    outcomes = serve(model, scenario, max_batch_size=32, max_queue_delay_us=2 * MS, instances=instances)

    for i, (rows, outcome) in enumerate(zip(row_counts, outcomes, strict=True)):
        assert_own_rows(outcome, request_x(i, rows))
    assert len(model.batches) < len(row_counts) / 4, "requests were not batched"
    assert sum(len(batch["x"]) for batch in model.batches) == sum(row_counts), "a row ran twice or never"
    assert max(outcome.batch_requests for outcome in outcomes) > 1


def test_batches_form_in_arrival_order_and_rows_keep_their_order() -> None:
    row_counts = [1 + i % 3 for i in range(40)]
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(submit_x(batcher, i, rows) for i, rows in enumerate(row_counts)))

    outcomes = serve(model, scenario, max_batch_size=8, max_queue_delay_us=0)

    expected = [i for i, rows in enumerate(row_counts) for _ in range(rows)]
    assert model.seen_ids() == expected
    for batch in model.batches:
        tags = batch["x"][:, 0]
        assert np.all(np.diff(tags) > 0), "rows of a batch are not in arrival order"
    for i, outcome in enumerate(outcomes):
        assert_own_rows(outcome, request_x(i, row_counts[i]))


def test_requests_with_different_shapes_dtypes_or_names_never_share_a_batch() -> None:
    def twice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {f"{name}_out": array * 2 for name, array in inputs.items()}

    variants: list[Callable[[int, int], dict[str, np.ndarray]]] = [
        lambda i, r: {"x": np.full((r, 4), i, np.float64)},
        lambda i, r: {"x": np.full((r, 4), i, np.float32)},
        lambda i, r: {"x": np.full((r, 3), i, np.float64)},
        lambda i, r: {"x": np.full((r, 2, 2), i, np.float64)},
        lambda i, r: {"x": np.full((r, 4), i, np.float64), "z": np.full((r, 2), i, np.int64)},
    ]
    # Runs of 6 alike requests: a batch closes at the first request that does not fit, which opens the next batch.
    requests = [variants[(i // 6) % len(variants)](i, 1 + i % 4) for i in range(60)]
    model = Model(twice)

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(batcher.submit(inputs) for inputs in requests))

    outcomes = serve(model, scenario, max_batch_size=64, max_queue_delay_us=20 * MS)

    for inputs, outcome in zip(requests, outcomes, strict=True):
        assert outcome.outputs.keys() == {f"{name}_out" for name in inputs}
        for name, array in inputs.items():
            got = outcome.outputs[f"{name}_out"]
            assert got.dtype == array.dtype, "the request was merged with another dtype and upcast"
            np.testing.assert_array_equal(got, array * 2)
    assert len(model.batches) == 10, "each run of 6 alike requests should make one batch"
    assert [int(batch["x"].flat[0]) for batch in model.batches] == list(range(0, 60, 6)), "batches were reordered"


def test_request_larger_than_max_batch_size_is_rejected_before_queueing() -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> None:
        with pytest.raises(InvalidInputError, match=r"9 rows, more than max_batch_size 8"):
            await submit_x(batcher, 0, 9)
        assert batcher.queue_depth == 0
        await submit_x(batcher, 1, 8)

    serve(model, scenario, max_batch_size=8)
    assert model.seen_ids() == [1] * 8


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((2, 4)), "z": np.zeros((3, 4))}, "input 'z' has 3 rows but input 'x' has 2"),
        ({"x": np.zeros((0, 4))}, "0 rows"),
        ({"x": np.float64(1.0)}, "scalar"),
        ({}, "no inputs"),
    ],
    ids=["rows-differ-between-inputs", "zero-rows", "scalar", "no-inputs"],
)
def test_malformed_request_is_rejected_before_queueing(inputs: dict[str, np.ndarray], message: str) -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> None:
        with pytest.raises(InvalidInputError, match=message):
            await batcher.submit(inputs)
        assert batcher.queue_depth == 0

    serve(model, scenario)
    assert model.batches == []


def test_max_batch_size_is_never_exceeded_and_requests_are_never_split() -> None:
    rng = np.random.default_rng(3)
    row_counts = [int(n) for n in rng.integers(1, 9, size=120)]
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(submit_x(batcher, i, rows) for i, rows in enumerate(row_counts)))

    outcomes = serve(model, scenario, max_batch_size=8, max_queue_delay_us=5 * MS)

    batches_of: dict[int, set[int]] = {}
    for index, batch in enumerate(model.batches):
        assert len(batch["x"]) <= 8
        for rid in request_ids(batch["x"]):
            batches_of.setdefault(rid, set()).add(index)
    assert all(len(indexes) == 1 for indexes in batches_of.values()), "a request was split across batches"
    assert max(outcome.batch_rows for outcome in outcomes) <= 8
    for i, outcome in enumerate(outcomes):
        assert_own_rows(outcome, request_x(i, row_counts[i]))


# -- admission: bounded queue, deadlines, cancellation ----------------------------------------------------------------


def test_full_queue_rejects_the_next_request_at_once() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        running = spawn_submit(batcher, 0)
        await model.wait_started()
        queued = [spawn_submit(batcher, i) for i in range(1, 5)]
        await asyncio.sleep(0)  # let the tasks enqueue
        assert (batcher.queue_depth, batcher.in_flight_batches) == (4, 1)
        # "At once": the refusal comes in the caller's first step, before it ever suspends (nothing to wait for).
        refused = batcher.submit({"x": request_x(99, 1)})
        with pytest.raises(QueueFullError, match=r"max_queue_size 4.*retry with backoff"):
            refused.send(None)
        assert (batcher.queue_depth, batcher.in_flight_batches) == (4, 1)
        model.release()
        return await asyncio.gather(running, *queued)

    outcomes = serve(model, scenario, max_queue_size=4, max_queue_delay_us=0)
    assert len(outcomes) == 5
    assert 99 not in model.seen_ids()


def test_request_whose_deadline_passes_while_queued_is_never_executed() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> None:
        running = spawn_submit(batcher, 0)
        await model.wait_started()
        # 0.25 s: the request is queued long before (a stall that long between these two lines would fail the match).
        with pytest.raises(DeadlineExpiredError, match=r"in the queue .* not executed"):
            await submit_x(batcher, 1, 2, deadline=time.monotonic() + 0.25)
        # Promptly: its own timer expired it while the batch ahead still held the only instance (the gate is shut;
        # an expiry that waited for the instance to come free would come only after the gate's 10 s timeout).
        assert not running.done()
        assert model.running == 1
        assert batcher.queue_depth == 0
        model.release()
        await running
        await submit_x(batcher, 2, 1)

    serve(model, scenario, max_queue_delay_us=0)
    assert model.seen_ids() == [0, 2]


def test_request_with_a_deadline_already_passed_is_rejected_without_queueing() -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> None:
        with pytest.raises(DeadlineExpiredError):
            await submit_x(batcher, 0, 1, deadline=time.monotonic() - 0.001)
        assert batcher.queue_depth == 0

    serve(model, scenario)
    assert model.batches == []


def test_request_whose_deadline_passes_during_the_batch_window_is_dropped() -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> BatchOutcome:
        soon = time.monotonic() + 0.02
        late = spawn_submit(batcher, 0, deadline=soon)
        kept = spawn_submit(batcher, 1)
        with pytest.raises(DeadlineExpiredError):
            await late
        return await kept

    outcome = serve(model, scenario, max_queue_delay_us=150 * MS, delay_mode="fixed")
    assert model.seen_ids() == [1]
    assert outcome.batch_requests == 1


def test_cancelled_queued_request_is_never_executed() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> None:
        running = spawn_submit(batcher, 0)
        await model.wait_started()
        abandoned = spawn_submit(batcher, 1)
        await asyncio.sleep(0)
        assert batcher.queue_depth == 1
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert batcher.queue_depth == 0
        model.release()
        await running
        await submit_x(batcher, 2, 1)

    serve(model, scenario, max_queue_delay_us=0)
    assert model.seen_ids() == [0, 2]


def test_caller_cancelled_during_execution_does_not_disturb_its_batch() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> BatchOutcome:
        gone = spawn_submit(batcher, 0)
        stays = spawn_submit(batcher, 1, rows=2)
        await model.wait_started()
        gone.cancel()
        model.release()
        return await stays

    outcome = serve(model, scenario, max_queue_delay_us=0)
    assert_own_rows(outcome, request_x(1, 2))
    assert outcome.batch_requests == 2


# -- failures --------------------------------------------------------------------------------------------------------


def test_failing_batch_fails_only_its_own_requests_and_later_requests_succeed() -> None:
    def fails_on_negative_rows(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom\n  native frame 1\n  native frame 2")
        return dense(inputs)

    model = Model(fails_on_negative_rows)

    async def scenario(batcher: DynamicBatcher) -> list[Any]:
        poisoned = batcher.submit({"x": -request_x(0, 1)})
        neighbour = submit_x(batcher, 1, 2)  # same key, same tick: shares the poisoned batch
        other_batch = batcher.submit({"x": request_x(2, 1, np.float32)})
        first = await asyncio.gather(poisoned, neighbour, other_batch, return_exceptions=True)
        later = await submit_x(batcher, 3, 3)
        return [*first, later]

    poisoned, neighbour, other_batch, later = serve(model, scenario, max_queue_delay_us=20 * MS)

    for failed in (poisoned, neighbour):
        assert isinstance(failed, ExecutionError)
        assert "boom" in str(failed)
        assert "native frame" not in str(failed)
        assert "batch of 3 rows (2 requests)" in str(failed)
    assert isinstance(other_batch, BatchOutcome)
    np.testing.assert_array_equal(other_batch.outputs["echo"], request_x(2, 1, np.float32))
    assert_own_rows(later, request_x(3, 3))


def test_model_returning_the_wrong_row_count_fails_the_batch_with_execution_error() -> None:
    def drops_a_row(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"][1:]}

    async def scenario(batcher: DynamicBatcher) -> list[Any]:
        return await asyncio.gather(submit_x(batcher, 0, 2), submit_x(batcher, 1, 1), return_exceptions=True)

    results = serve(Model(drops_a_row), scenario, max_queue_delay_us=20 * MS)
    for result in results:
        assert isinstance(result, ExecutionError)
        assert "output 'y' has 2 rows for a batch of 3 input rows" in str(result)


# -- timing of batch formation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay_mode", ["fixed", "adaptive"])
def test_zero_queue_delay_runs_a_lone_request_at_once(windows: list[Window], delay_mode: str) -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> BatchOutcome:
        return await submit_x(batcher, 0, 1)

    outcome = serve(model, scenario, max_queue_delay_us=0, delay_mode=delay_mode)
    assert windows == [], "the batcher waited for companions with max_queue_delay 0"
    assert (outcome.batch_requests, len(model.batches)) == (1, 1)
    assert_own_rows(outcome, request_x(0, 1))


def test_zero_queue_delay_still_merges_requests_queued_while_the_instance_is_busy() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        first = spawn_submit(batcher, 0)
        await model.wait_started()
        queued = [spawn_submit(batcher, i) for i in range(1, 11)]
        await asyncio.sleep(0)
        model.release()
        return await asyncio.gather(first, *queued)

    outcomes = serve(model, scenario, max_queue_delay_us=0)
    assert [len(batch["x"]) for batch in model.batches] == [1, 10]
    assert [outcome.batch_requests for outcome in outcomes] == [1] + [10] * 10


def test_fixed_mode_lone_request_waits_max_queue_delay_from_its_arrival_for_companions(windows: list[Window]) -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        lone = spawn_submit(batcher, 0)
        await asyncio.sleep(0)  # the task's first step has run: the request is queued, the collector not yet awake
        queued_by = loop.time()
        await lone
        return before, queued_by

    before, queued_by = serve(model, scenario, max_queue_delay_us=200 * MS, delay_mode="fixed")
    # One window, ending max_queue_delay after the request's arrival (which lies between the two readings): not
    # counted from when the collector woke up, not waited twice.
    (window,) = windows
    assert before + 0.2 <= window.due <= queued_by + 0.2
    assert window.precise
    assert model.started_at[0] >= window.due, "the request ran before max_queue_delay passed"
    assert len(model.batches) == 1


def test_full_batch_runs_without_waiting_for_the_delay(windows: list[Window]) -> None:
    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(submit_x(batcher, i, 1) for i in range(4)))

    outcomes = serve(Model(), scenario, max_batch_size=4, max_queue_delay_us=5_000 * MS, delay_mode="fixed")
    assert windows == [], "a full batch waited for the 5 s window"
    assert {outcome.batch_rows for outcome in outcomes} == {4}


def test_preferred_batch_size_closes_the_batch_when_nothing_else_is_queued(windows: list[Window]) -> None:
    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(submit_x(batcher, 0, 2), submit_x(batcher, 1, 1))

    outcomes = serve(
        Model(), scenario, max_batch_size=64, max_queue_delay_us=5_000 * MS, preferred_batch_sizes=(3,),
        delay_mode="fixed",
    )
    assert windows == [], "a batch of a preferred size waited for the 5 s window"
    assert {outcome.batch_rows for outcome in outcomes} == {3}


def test_request_that_waited_for_a_busy_instance_does_not_wait_the_delay_again(windows: list[Window]) -> None:
    delay = 0.1
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> int:
        first = spawn_submit(batcher, 0)
        await model.wait_started()  # after its own window: a fresh request waits for companions in fixed mode
        armed = len(windows)
        waiting = spawn_submit(batcher, 1)
        await asyncio.sleep(0)
        assert batcher.queue_depth == 1
        # The second request's window passes while the only instance is busy (a sleep never ends early).
        await asyncio.sleep(delay)
        model.release()
        await asyncio.gather(first, waiting)
        return armed

    armed = serve(model, scenario, max_queue_delay_us=int(delay * 1_000_000), delay_mode="fixed")
    assert len(windows) == armed, "the request waited a second max_queue_delay once the instance came free"
    assert model.seen_ids() == [0, 1]


# -- instances --------------------------------------------------------------------------------------------------------


def test_instances_run_batches_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=30)  # a hang detector only: the second batch arrives in microseconds

    def meets_another_batch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        barrier.wait()  # raises BrokenBarrierError (-> ExecutionError) unless two batches run at once
        return dense(inputs)

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(submit_x(batcher, 0, 1), submit_x(batcher, 1, 1))

    outcomes = serve(Model(meets_another_batch), scenario, instances=2, max_batch_size=1)
    assert [outcome.batch_rows for outcome in outcomes] == [1, 1]


@pytest.mark.parametrize("instances", [1, 3])
def test_no_more_batches_execute_at_once_than_instances(instances: int) -> None:
    model = Model(gated=True)
    peaks: list[int] = []

    async def scenario(batcher: DynamicBatcher) -> tuple[int, int]:
        async def one(i: int) -> None:
            await submit_x(batcher, i, 1)
            peaks.append(batcher.in_flight_batches)

        requests = asyncio.gather(*(one(i) for i in range(60)))
        # Every instance takes a batch and blocks in the model; the collector has had all the loop it wants since.
        await asyncio.to_thread(wait_until, lambda: model.running == instances, 30, f"{instances} batches to run")
        await asyncio.sleep(0)
        held = (batcher.in_flight_batches, batcher.queue_depth)
        model.release()
        await requests
        return held

    in_flight, queued = serve(model, scenario, instances=instances, max_batch_size=2, max_queue_delay_us=0)
    assert (in_flight, queued) == (instances, 60 - 2 * instances), "more batches were dispatched than instances"
    assert model.peak_concurrency == instances
    assert max(peaks) <= instances


def test_disabled_batching_runs_each_request_alone() -> None:
    model = Model()

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return await asyncio.gather(*(submit_x(batcher, i, 2) for i in range(20)))

    outcomes = serve(model, scenario, enabled=False, max_queue_delay_us=50 * MS)
    assert len(model.batches) == 20
    assert {outcome.batch_requests for outcome in outcomes} == {1}
    for i, outcome in enumerate(outcomes):
        assert_own_rows(outcome, request_x(i, 2))


# -- lifecycle ---------------------------------------------------------------------------------------------------------


def test_stop_with_drain_finishes_queued_and_running_work() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        tasks = [spawn_submit(batcher, 0)]
        await model.wait_started()
        tasks += [spawn_submit(batcher, i, 2) for i in range(1, 6)]
        await asyncio.sleep(0)
        stopping = asyncio.create_task(batcher.stop(drain=True, timeout=10))
        await asyncio.sleep(0)
        with pytest.raises(ServerUnavailableError):
            await submit_x(batcher, 99, 1)
        model.release()
        await stopping
        return await asyncio.gather(*tasks)

    outcomes = serve(model, scenario, max_queue_delay_us=0)
    for i, outcome in enumerate(outcomes):
        assert_own_rows(outcome, request_x(i, 1 if i == 0 else 2))
    assert 99 not in model.seen_ids()


def test_stop_without_drain_fails_queued_requests_and_finishes_running_ones() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> list[Any]:
        running = spawn_submit(batcher, 0)
        await model.wait_started()
        queued = [spawn_submit(batcher, i) for i in range(1, 4)]
        await asyncio.sleep(0)
        stopping = asyncio.create_task(batcher.stop(drain=False, timeout=10))
        model.release()
        await stopping
        return await asyncio.gather(running, *queued, return_exceptions=True)

    running, *queued = serve(model, scenario, max_queue_delay_us=0)
    assert_own_rows(running, request_x(0, 1))
    assert all(isinstance(result, ServerUnavailableError) for result in queued)
    assert model.seen_ids() == [0]


def test_stop_gives_up_on_a_batch_that_outlives_its_timeout() -> None:
    model = Model(gated=True)

    async def scenario(batcher: DynamicBatcher) -> tuple[int, BaseException | BatchOutcome]:
        stuck = spawn_submit(batcher, 0)
        await model.wait_started()
        await batcher.stop(drain=True, timeout=0.2)
        still_running = model.running  # the gate is shut until the scenario ends (or its own 10 s timeout)
        (result,) = await asyncio.gather(stuck, return_exceptions=True)
        return still_running, result

    still_running, result = serve(model, scenario)
    assert still_running == 1, "stop waited for the stuck batch instead of giving up after its timeout"
    assert isinstance(result, ServerUnavailableError)


def test_submit_before_start_or_after_stop_raises_server_unavailable() -> None:
    async def main() -> None:
        batcher = DynamicBatcher(dense, BatchingSettings(), name="dense")
        with pytest.raises(ServerUnavailableError, match="model 'dense' is not serving"):
            await submit_x(batcher, 0, 1)
        await batcher.start()
        await submit_x(batcher, 0, 1)
        await batcher.stop()
        with pytest.raises(ServerUnavailableError):
            await submit_x(batcher, 1, 1)

    asyncio.run(main())


@pytest.mark.parametrize("delay_mode", ["fixed", "adaptive"])
def test_idle_batcher_uses_no_cpu(windows: list[Window], delay_mode: str) -> None:
    selector = RecordingSelector()

    async def scenario(batcher: DynamicBatcher) -> tuple[int, list[tuple[float | None, int]], float]:
        await submit_x(batcher, 0, 1)  # warm up: executor thread started, collector waiting again
        armed, woke, cpu_before = len(windows), len(selector.waits), time.process_time()
        await asyncio.sleep(0.3)
        return len(windows) - armed, selector.waits[woke:], time.process_time() - cpu_before

    armed, waits, cpu_seconds = serve(
        Model(), scenario, loop_factory=lambda: asyncio.SelectorEventLoop(selector), max_queue_delay_us=1 * MS,
        delay_mode=delay_mode,
    )
    assert armed == 0, "an idle batcher armed a timer"
    # The loop went to sleep once and was woken once, by the test's own 0.3 s timer: no timer, fd or poll of the
    # batcher's woke it (the waits with timeout 0 are the warm-up's last callbacks running before it went to sleep).
    sleeps = [wait for wait in waits if wait[0] != 0]
    assert len(sleeps) == 1, f"the idle loop woke {len(sleeps)} times in 0.3 s: {waits}"
    assert sleeps[0][1] == 0, "an idle loop was woken by a file descriptor"
    # And no thread spins: the process's own CPU time (which a busy machine cannot inflate, only delay).
    assert cpu_seconds < 0.03, f"an idle batcher used {cpu_seconds:.3f} s of CPU in 0.3 s"


# -- statistics --------------------------------------------------------------------------------------------------------


def test_outcome_and_on_batch_hook_report_rows_requests_and_times() -> None:
    def slow(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.02)
        return dense(inputs)

    reported: list[BatchStats] = []

    async def scenario(batcher: DynamicBatcher) -> tuple[list[BatchOutcome], float]:
        started = time.perf_counter()
        outcomes = await asyncio.gather(submit_x(batcher, 0, 2), submit_x(batcher, 1, 3))
        return outcomes, time.perf_counter() - started

    outcomes, wall = serve(Model(slow), scenario, on_batch=reported.append, max_queue_delay_us=10 * MS)

    (stats,) = reported
    assert (stats.rows, stats.requests, stats.succeeded) == (5, 2, True)
    assert len(stats.queue_seconds) == 2
    # Each time lies inside the interval it is part of: a slow machine stretches them all together.
    assert all(0 <= seconds <= wall for seconds in stats.queue_seconds)
    assert 0.02 <= stats.compute_seconds <= wall  # the model sleeps 20 ms, and a sleep never ends early
    assert max(stats.queue_seconds) + stats.compute_seconds <= wall
    for outcome in outcomes:
        assert (outcome.batch_rows, outcome.batch_requests) == (5, 2)
        assert outcome.compute_seconds == stats.compute_seconds
    assert [outcome.queue_seconds for outcome in outcomes] == list(stats.queue_seconds)


def test_broken_on_batch_hook_does_not_break_serving() -> None:
    def broken(stats: BatchStats) -> None:
        raise RuntimeError("metrics backend down")

    async def scenario(batcher: DynamicBatcher) -> list[BatchOutcome]:
        return [await submit_x(batcher, i, 1) for i in range(3)]

    outcomes = serve(Model(), scenario, on_batch=broken, max_queue_delay_us=0)
    for i, outcome in enumerate(outcomes):
        assert_own_rows(outcome, request_x(i, 1))


# -- settings ----------------------------------------------------------------------------------------------------------


def test_default_settings_batch_with_a_short_delay() -> None:
    settings = BatchingSettings()
    assert settings.enabled
    assert (settings.max_batch_size, settings.max_queue_delay_us, settings.max_queue_size) == (64, 100, 1024)
    assert (settings.preferred_batch_sizes, settings.instances) == ((), 1)
    assert settings.max_queue_delay_s == pytest.approx(0.0001)


def test_every_batching_setting_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(batching_settings))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "BatchingSettings"]
    body = cls.body

    def documented(index: int) -> bool:
        following = body[index + 1] if index + 1 < len(body) else None
        return isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)

    fields = [(i, node) for i, node in enumerate(body) if isinstance(node, ast.AnnAssign)]
    assert len(fields) == 8
    assert all(documented(i) for i, _ in fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us must be >= 0"),
        ({"max_queue_size": 0}, "max_queue_size must be >= 1"),
        ({"instances": 0}, "instances must be >= 1"),
        ({"instances": True}, "instances must be an integer"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"preferred_batch_sizes": (4, 128)}, "contains 128, more than max_batch_size 64"),
        ({"preferred_batch_sizes": (0,)}, "preferred_batch_sizes must be >= 1"),
        ({"preferred_batch_sizes": "8"}, "must be a list of row counts"),
    ],
)
def test_invalid_settings_are_rejected_with_the_field_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingSettings(**overrides)


def test_preferred_batch_sizes_are_sorted_and_deduplicated() -> None:
    settings = BatchingSettings(preferred_batch_sizes=[32, 8, 32])  # type: ignore[arg-type]  # as a config file gives
    assert settings.preferred_batch_sizes == (8, 32)


def test_settings_are_frozen() -> None:
    settings = BatchingSettings()
    with pytest.raises(FrozenInstanceError):
        settings.max_batch_size = 8  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every test stops its batcher, so no executor thread outlives it (a stuck one would hang the run at exit)."""
    before = set(threading.enumerate())
    yield
    leaked = [thread for thread in threading.enumerate() if thread not in before and thread.name.startswith("batch-")]
    for thread in leaked:
        thread.join(timeout=5)
    assert not [thread for thread in leaked if thread.is_alive()]
