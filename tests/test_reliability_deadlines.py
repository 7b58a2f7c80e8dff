"""Deadlines and cancellation end to end, at every stage of a request: while queued, while its batch executes,
and after completion. Nothing expired or cancelled while queued is executed; nothing completed is lost.

tests/test_batcher.py proves the same rules on the batcher alone; here the deadline travels as a gRPC deadline and
the cancellation as an HTTP/2 RST_STREAM from a real client, through the servicer, into the batcher. What ran is
read back from ModelStatistics: the rows of every executed batch (batch_stats) and the failure reasons.

Nothing is timed: a request is caught queued because it is sent while full batches hold the only instance (a
few hundred milliseconds each on an idle 2-core machine; for the deadline test as many as outlast the deadline six
times over by the server's own measure of one), and the waits are on what the server reports (a batch executing,
the queue's depth), with deadlines of seconds that only a hang reaches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    running_server,
    slow_model,
    wait_until,
    write_model,
)

WIDTH = 1024
BLOCKER = np.random.default_rng(1).standard_normal((64, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One instance of a model that takes a few hundred milliseconds per 64-row batch, so requests can be caught
    queued behind it or inside a running batch."""
    repo = tmp_path_factory.mktemp("deadlines")
    write_model(repo, "slow", slow_model(WIDTH, 384), config={"max_batch_size": 64, "instances": 1})
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    with running_server(repo) as running:
        yield running


def executed_rows(server: RunningServer) -> int:
    """Rows of every batch the model executed so far."""
    stats = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats[0]
    return sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)


def failures(server: RunningServer) -> dict[str, int]:
    recorder = server.app.repository.get("slow").stats
    return dict(recorder.failures)


def executor(server: RunningServer) -> object:
    return server.app.repository.get("slow").executor


def wait_executing(server: RunningServer, batches: int = 1) -> None:
    wait_until(lambda: executor(server).in_flight_batches == batches, 30, "a batch to start executing")  # type: ignore[attr-defined]


def wait_queued(server: RunningServer, depth: int, what: str) -> None:
    wait_until(lambda: executor(server).queue_depth == depth, 30, what)  # type: ignore[attr-defined]


def run_last(server: RunningServer) -> int:
    """One more request, answered only after everything queued before it has run (one instance, arrival order), so
    the statistics then hold every execution there was going to be. Its rows (1)."""
    server.stub().ModelInfer(infer_request("slow", {"input": BLOCKER[:1]}), timeout=60)
    return 1


def expected_output(server: RunningServer, x: np.ndarray) -> np.ndarray:
    return output_arrays(server.stub().ModelInfer(infer_request("slow", {"input": x}), timeout=30))["output"]


def full_batch_seconds(server: RunningServer) -> float:
    """The mean compute time of the model's full (64-row) batches so far, as the server measured it."""
    stats = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats[0]
    (full,) = [b for b in stats.batch_stats if b.batch_size == 64]
    return full.compute_infer.ns / full.compute_infer.count / 1e9


def test_request_whose_deadline_passes_while_queued_is_never_executed(slow_server: RunningServer) -> None:
    stub = slow_server.stub()
    stub.ModelInfer(infer_request("slow", {"input": BLOCKER}), timeout=120)
    # Enough full batches queued ahead of it that they outlast its 0.5 s deadline six times over, however fast this
    # machine runs one (0.4 s on an idle 2-core one, a few ms on a big one): the count comes from the server's own
    # measure of a full batch, so no speed is assumed.
    ahead = max(2, min(200, math.ceil(3.0 / full_batch_seconds(slow_server))))
    before = executed_rows(slow_server)
    reasons_before = failures(slow_server)
    blockers = [stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=600)]
    wait_executing(slow_server)
    blockers += [stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=600)
                 for _ in range(ahead - 1)]
    # Every blocker has reached the server (queued, executing or answered) before the request that must expire.
    batcher = executor(slow_server)
    wait_until(lambda: batcher.queue_depth + batcher.in_flight_batches + sum(b.done() for b in blockers)  # type: ignore[attr-defined]
               >= ahead, 30, "the full batches to reach the server")
    with pytest.raises(grpc.RpcError) as expired:
        stub.ModelInfer(infer_request("slow", {"input": BLOCKER[:3]}), timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for blocker in blockers:
        blocker.result()
    last = run_last(slow_server)
    assert executed_rows(slow_server) - before == 64 * ahead + last  # the 3 expired rows never ran
    reasons = failures(slow_server)
    gone = sum(reasons.get(reason, 0) - reasons_before.get(reason, 0) for reason in ("deadline", "cancelled"))
    assert gone == 1, reasons  # the server had it, and counted it expired (or cancelled by gRPC at its deadline)


def test_request_cancelled_while_queued_is_never_executed(slow_server: RunningServer) -> None:
    stub = slow_server.stub()
    before = executed_rows(slow_server)
    cancelled_before = failures(slow_server).get("cancelled", 0)
    blocker = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=120)
    wait_executing(slow_server)
    doomed = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER[:5]}), timeout=120)
    wait_queued(slow_server, 1, "the request to be queued")
    assert doomed.cancel()
    wait_queued(slow_server, 0, "the cancelled request to leave the queue")
    assert not blocker.done()  # it left the queue while the batch ahead of it was still running
    blocker.result()
    last = run_last(slow_server)
    assert executed_rows(slow_server) - before == 64 + last
    assert failures(slow_server).get("cancelled", 0) == cancelled_before + 1


def test_caller_leaving_during_execution_loses_only_its_own_result(slow_server: RunningServer) -> None:
    stub = slow_server.stub()
    x = BLOCKER[:63] * 0.5  # with the leaver's row a full batch: the longest there is, to cancel within
    wanted = expected_output(slow_server, x)
    before = executed_rows(slow_server)
    blocker = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=120)
    wait_executing(slow_server)
    keeper = stub.ModelInfer.future(infer_request("slow", {"input": x}), timeout=120)
    leaver = stub.ModelInfer.future(infer_request("slow", {"input": BLOCKER[:1]}), timeout=120)
    wait_queued(slow_server, 2, "both requests to be queued")
    blocker.result()
    # The two queued requests now share the next batch, which is executing.
    wait_queued(slow_server, 0, "the next batch to be dispatched")
    wait_executing(slow_server)
    assert leaver.cancel()
    np.testing.assert_allclose(output_arrays(keeper.result())["output"], wanted, atol=1e-5)
    assert executed_rows(slow_server) - before == 64 + 64  # the leaver's row ran (onnxruntime cannot be stopped)
    with pytest.raises(grpc.FutureCancelledError):
        leaver.result()


def test_completed_requests_are_delivered_and_counted_once_even_if_the_caller_cancels_afterwards(
    slow_server: RunningServer,
) -> None:
    stub = slow_server.stub()
    stats = slow_server.app.repository.get("dense").stats
    successes, failed = stats.success.count, sum(stats.failures.values())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    future = stub.ModelInfer.future(infer_request("dense", {"input": x}), timeout=30)
    np.testing.assert_allclose(output_arrays(future.result())["output"], dense_reference(x), atol=1e-6)
    assert not future.cancel()  # too late to cancel: the answer is already here
    assert stats.success.count == successes + 1
    assert sum(stats.failures.values()) == failed


def test_every_response_of_a_stream_arrives_even_when_the_client_stops_sending_at_once(
    slow_server: RunningServer,
) -> None:
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1 + i % 3, 3)).astype(np.float32) for i in range(40)]
    requests = [infer_request("dense", {"input": x}, request_id=f"r{i}") for i, x in enumerate(inputs)]
    responses = list(slow_server.stub().ModelStreamInfer(iter(requests), timeout=30))
    assert [r.infer_response.id for r in responses] == [f"r{i}" for i in range(40)]
    for response, x in zip(responses, inputs, strict=True):
        assert response.error_message == ""
        np.testing.assert_allclose(output_arrays(response.infer_response)["output"], dense_reference(x), atol=1e-6)
