"""Batching through the real server: gRPC on loopback, onnxruntime, the servicer, the batcher and the statistics.

Every response is checked against a numpy forward pass; batching is proven by ModelStatistics (fewer executions than
requests), never by timing. Whether a lone request waits is read from the windows each model's batcher armed on its
timer (recorded by the timer itself), not from queue times a busy machine stretches; those are benchmark figures
(benchmarks/batch_window.py, benchmarks/run.py). Requests are queued behind others by waiting until the server holds
them, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import batcher as batcher_module
from nnserve.server.precise_timer import PreciseTimer
from tests.conftest import (
    RunningServer,
    chain_model,
    finish_model,
    infer_request,
    output_arrays,
    running_server,
    wait_until,
    write_model,
)

pytestmark = pytest.mark.timeout(120)

RNG = np.random.default_rng(11)
CHAIN_W = (RNG.standard_normal((8, 8)) / np.sqrt(8)).astype(np.float32)


def chain_reference(x: np.ndarray, weights: np.ndarray, depth: int) -> np.ndarray:
    y = x.astype(np.float64)
    for _ in range(depth):
        y = np.tanh(y @ weights.astype(np.float64))
    return y


def any_width_model() -> Any:
    """output = 2 * input for inputs of any width: requests of different widths must never share a batch."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "two"], ["output"])],
        "any_width",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "width"])],
        initializer=[numpy_helper.from_array(np.array([2.0], dtype=np.float32), "two")],
    )
    return finish_model(graph)


SLOW_W = (np.random.default_rng(3).standard_normal((512, 512)) / np.sqrt(512)).astype(np.float32)
MID_W = (np.random.default_rng(4).standard_normal((128, 128)) / np.sqrt(128)).astype(np.float32)


@dataclass(frozen=True)
class Window:
    """One batch window a batcher armed on its timer."""

    armed_at: float
    """Loop time when the batcher armed it."""
    due: float
    """The loop time at which it ends."""
    precise: bool
    """On a timerfd (exact), not asyncio's millisecond timers."""


class RecordingTimer(PreciseTimer):
    """The batcher's real window timer, recording every window armed on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.windows: list[Window] = []

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        self.windows.append(Window(asyncio.get_running_loop().time(), when, self.precise))
        super().call_at(when, callback)


def windows_of(server: RunningServer, model: str) -> list[Window]:
    """The windows the batcher of `model` has armed so far (a copy; read on the test thread, appended on the loop)."""
    timer = server.app.repository.get(model).executor._timer  # type: ignore[attr-defined]
    assert isinstance(timer, RecordingTimer)
    return list(timer.windows)


@pytest.fixture(scope="module")
def perf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("perf_repository")
    write_model(root, "mid", chain_model(MID_W, 8), config={"max_batch_size": 32})
    write_model(root, "mid_two", chain_model(MID_W, 8), config={"max_batch_size": 32, "instances": 2})
    write_model(root, "tiny_fixed", chain_model(CHAIN_W, 3),
                config={"max_batch_size": 32, "dynamic_batching": {"delay_mode": "fixed", "max_queue_delay_us": 3000}})
    write_model(root, "tiny_default", chain_model(CHAIN_W, 3))
    write_model(root, "tiny_fixed_default", chain_model(CHAIN_W, 3),
                config={"dynamic_batching": {"delay_mode": "fixed"}})
    write_model(root, "tiny_no_delay", chain_model(CHAIN_W, 3),
                config={"max_batch_size": 32, "dynamic_batching": {"delay_mode": "fixed", "max_queue_delay_us": 0}})
    write_model(root, "long", chain_model(SLOW_W, 64), config={"max_batch_size": LONG_ROWS, "instances": 1})
    write_model(root, "slow_small_queue", chain_model(SLOW_W, 64),
                config={"max_batch_size": 16, "dynamic_batching": {"max_queue_size": 2}})
    write_model(root, "any_width", any_width_model(), config={"max_batch_size": 64})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batcher_module, "PreciseTimer", RecordingTimer)
        with running_server(root, device="cpu") as server:
            yield server


def statistics_of(server: RunningServer, model: str) -> pb.ModelStatistics:
    (stats,) = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats
    return stats


def executed_rows(stats: pb.ModelStatistics) -> int:
    """Rows of every batch the model executed (whether or not their callers were still waiting)."""
    return sum(batch.batch_size * batch.compute_infer.count for batch in stats.batch_stats)


def fire(stub: Any, model: str, arrays: list[np.ndarray], timeout: float = 60.0) -> list[Any]:
    """Send every request at once (gRPC futures: all in flight together) and return the futures."""
    return [stub.ModelInfer.future(infer_request(model, {"input": x}), timeout=timeout) for x in arrays]


@pytest.mark.parametrize(("model", "weights", "depth"), [
    ("mid", MID_W, 8), ("mid_two", MID_W, 8), ("tiny_fixed", CHAIN_W, 3),
])
def test_hundreds_of_concurrent_requests_through_the_server_each_get_their_own_rows(
    perf_server: RunningServer, model: str, weights: np.ndarray, depth: int
) -> None:
    stub = perf_server.stub()
    width = weights.shape[0]
    row_counts = [int(n) for n in RNG.integers(1, 7, size=300)]
    arrays = [RNG.standard_normal((rows, width)).astype(np.float32) for rows in row_counts]
    before = statistics_of(perf_server, model)
    futures = fire(stub, model, arrays)
    for x, future in zip(arrays, futures, strict=True):
        got = output_arrays(future.result())["output"]
        assert got.shape == x.shape
        np.testing.assert_allclose(got, chain_reference(x, weights, depth), rtol=1e-4, atol=1e-5)
    after = statistics_of(perf_server, model)
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    executions = after.execution_count - before.execution_count
    assert requests == 300
    assert after.inference_count - before.inference_count == sum(row_counts)
    assert executions < requests, "the server ran every request alone: nothing was batched"


def test_requests_of_different_widths_are_batched_apart_and_each_gets_its_own_result(
    perf_server: RunningServer,
) -> None:
    stub = perf_server.stub()
    arrays = [RNG.standard_normal((1 + i % 3, (2, 3, 5)[i % 3])).astype(np.float32) for i in range(90)]
    for x, future in zip(arrays, fire(stub, "any_width", arrays), strict=True):
        np.testing.assert_array_equal(output_arrays(future.result())["output"], x * 2)


def test_max_queue_delay_zero_runs_lone_requests_at_once_and_still_answers_concurrent_ones(
    perf_server: RunningServer,
) -> None:
    stub = perf_server.stub()
    arrays = [RNG.standard_normal((2, 8)).astype(np.float32) for _ in range(50)]
    for x, future in zip(arrays, fire(stub, "tiny_no_delay", arrays), strict=True):
        np.testing.assert_allclose(output_arrays(future.result())["output"], chain_reference(x, CHAIN_W, 3),
                                   rtol=1e-4, atol=1e-5)
    before = statistics_of(perf_server, "tiny_no_delay")
    armed = windows_of(perf_server, "tiny_no_delay")
    for _ in range(30):
        stub.ModelInfer(infer_request("tiny_no_delay", {"input": arrays[0]}), timeout=10)
    after = statistics_of(perf_server, "tiny_no_delay")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 30
    assert after.execution_count - before.execution_count == 30  # each alone, in its own execution
    assert windows_of(perf_server, "tiny_no_delay") == armed, "a lone request waited with max_queue_delay 0"


@pytest.mark.parametrize("model", ["tiny_default", "tiny_fixed_default"])
def test_lone_request_under_default_delays_is_not_delayed_by_a_millisecond(
    perf_server: RunningServer, model: str
) -> None:
    """Default max_queue_delay (100 us): adaptive never waits for a lone client; fixed waits at most 100 us from
    the request's arrival, on the precise timer, never the ~1.1 ms that a millisecond-resolution timer made of it."""
    stub = perf_server.stub()
    x = RNG.standard_normal((1, 8)).astype(np.float32)
    for _ in range(5):
        stub.ModelInfer(infer_request(model, {"input": x}), timeout=10)
    before = statistics_of(perf_server, model)
    armed = len(windows_of(perf_server, model))
    for _ in range(40):
        stub.ModelInfer(infer_request(model, {"input": x}), timeout=10)
    after = statistics_of(perf_server, model)
    windows = windows_of(perf_server, model)[armed:]
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 40
    assert after.execution_count - before.execution_count == 40
    if model == "tiny_default":
        assert windows == [], f"a lone client waited for companions {len(windows)} times"
    else:
        # One window per request at most (none when its 100 us had passed before the collector woke), each ending
        # at most 100 us after it was armed, which was after the request arrived (at once if that instant passed
        # while the collector armed it).
        assert 0 < len(windows) <= 40
        assert all(window.precise and window.due - window.armed_at <= 0.0001 + 1e-9 for window in windows), windows


LONG_ROWS = 1024
"""Rows of the request that holds the `long` model's only instance: ~0.5 s of compute on the development machine,
longer on a busy one (load slows it, never speeds it up), so what is sent while it runs waits in the queue."""


def occupy(stub: Any, model: str, batches: int) -> list[Any]:
    """Queue `batches` full 16-row requests on a slow model, so that what comes next waits in its queue."""
    return fire(stub, model, [np.full((16, 512), 0.01, dtype=np.float32) for _ in range(batches)])


def batcher_of(server: RunningServer, model: str) -> Any:
    return server.app.repository.get(model).executor


def hold_instance(server: RunningServer, stub: Any) -> Any:
    """Start the long batch and wait until it executes: the `long` model's only instance is busy for ~1 s."""
    blocker = stub.ModelInfer.future(infer_request("long", {"input": np.full((LONG_ROWS, 512), 0.01, np.float32)}),
                                     timeout=120)
    wait_until(lambda: batcher_of(server, "long").in_flight_batches == 1, 30, "the long batch to start")
    return blocker


def queued_rows(server: RunningServer, model: str) -> list[int]:
    """Rows of each request waiting in the model's queue, read on the server's loop (the batcher's own record)."""

    async def read() -> list[int]:
        return [request.rows for request in batcher_of(server, model)._pending]

    return server.call(read())  # type: ignore[no-any-return]


def run_last(stub: Any, model: str) -> int:
    """One more request, answered after everything queued before it has run (one instance, arrival order): after it,
    the statistics hold every execution there was going to be. Its rows (1)."""
    stub.ModelInfer(infer_request(model, {"input": np.full((1, 512), 0.5, np.float32)}), timeout=60)
    return 1


def test_request_whose_grpc_deadline_passes_while_queued_is_never_executed(perf_server: RunningServer) -> None:
    stub = perf_server.stub()
    before = statistics_of(perf_server, "long")
    blocker = hold_instance(perf_server, stub)
    late = stub.ModelInfer.future(infer_request("long", {"input": np.ones((3, 512), np.float32)}), timeout=0.05)
    with pytest.raises(grpc.RpcError) as error:
        late.result()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.result()
    last = run_last(stub, "long")
    after = statistics_of(perf_server, "long")
    assert executed_rows(after) - executed_rows(before) == LONG_ROWS + last, "the expired request's rows ran"


def test_request_cancelled_by_its_caller_while_queued_is_never_executed(perf_server: RunningServer) -> None:
    stub = perf_server.stub()
    before = statistics_of(perf_server, "long")
    failures = perf_server.app.repository.get("long").stats.failures
    cancelled_before = failures["cancelled"]
    blocker = hold_instance(perf_server, stub)
    cancelled = stub.ModelInfer.future(infer_request("long", {"input": np.ones((5, 512), np.float32)}), timeout=60)
    wait_until(lambda: 5 in queued_rows(perf_server, "long"), 30, "the 5-row request to be queued")
    assert cancelled.cancel()
    wait_until(lambda: failures["cancelled"] == cancelled_before + 1, 30, "the cancellation to reach the server")
    assert 5 not in queued_rows(perf_server, "long")
    assert not blocker.done(), "the long batch ended before the cancellation: the request was never left queued"
    blocker.result()
    last = run_last(stub, "long")
    after = statistics_of(perf_server, "long")
    executed = executed_rows(after) - executed_rows(before)
    assert executed == LONG_ROWS + last, "the cancelled request's 5 rows were executed"


def test_full_queue_rejects_with_resource_exhausted_and_the_accepted_requests_succeed(
    perf_server: RunningServer,
) -> None:
    stub = perf_server.stub()
    futures = occupy(stub, "slow_small_queue", 12)
    outcomes = []
    details = []
    for future in futures:
        try:
            future.result()
            outcomes.append("ok")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)
            details.append(error.details() or "")
    assert "RESOURCE_EXHAUSTED" in outcomes
    assert all("max_queue_size 2" in text for text in details)
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}


def test_model_config_reports_the_delay_mode_budget_of_each_model(perf_server: RunningServer, tmp_path: Path) -> None:
    config = perf_server.stub().ModelConfig(pb.ModelConfigRequest(name="tiny_fixed"), timeout=10).config
    assert config.dynamic_batching.max_queue_delay_microseconds == 3000
