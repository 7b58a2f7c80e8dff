"""Graceful drain under continuous load: SIGTERM while clients keep sending.

tests/test_server_lifecycle.py sends SIGTERM with a fixed set of requests in flight; here clients never stop
sending, before, during and after the signal. Every request either succeeds with its exact result, or is refused
without having been accepted: UNAVAILABLE "shutting down" from the draining server (only after health turned
NOT_SERVING), UNAVAILABLE because nothing listens any more, or CANCELLED by gRPC itself for the few calls it had
received but not yet handed to the servicer when the server stopped (grpc-core cancels its queue of unrequested
calls on shutdown; the SDK retries them). The server logs how many requests it accepted; that number equals the
successes the clients saw, so no accepted request failed. The process exits 0 within the grace period.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve.client import RetryPolicy
from nnserve.client.errors import error_for
from nnserve.client.retry import Attempts
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import infer_request, output_arrays, serve_process, slow_model, wait_until, write_model

pytestmark = pytest.mark.timeout(120)

CLIENTS = 8
GRACE_S = 15.0
ACCEPTED_LOG = re.compile(r"stopped; (\d+) inference requests were accepted since the start")


@dataclass(frozen=True)
class Outcome:
    sent: float
    done: float
    code: grpc.StatusCode
    details: str
    correct: bool


def test_sigterm_under_continuous_load_fails_no_accepted_request_and_exits_within_the_grace_period(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    # 8 clients x 8 rows need two 32-row batches: while the second runs, the clients answered by the first send
    # again, so requests always reach the server during the drain (with one 64-row batch they could all land after
    # the listener closed, which made this test flaky).
    write_model(repo, "slow", slow_model(512, 32), config={"max_batch_size": 32, "instances": 1})
    x = np.random.default_rng(3).standard_normal((8, 512)).astype(np.float32)
    outcomes: list[Outcome] = []
    stop = threading.Event()
    with serve_process(repo, tmp_path / "serve.log", "--device", "cpu", "--grace-period", str(GRACE_S)) as server:
        with grpc.insecure_channel(server.address) as channel:
            expected = output_arrays(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request("slow", {"input": x}), timeout=30))["output"]

        health_after_refusal: list[int] = []

        def client() -> None:
            with grpc.insecure_channel(server.address) as own:
                stub = pb_grpc.GRPCInferenceServiceStub(own)
                health = health_pb2_grpc.HealthStub(own)
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = stub.ModelInfer(infer_request("slow", {"input": x}), timeout=30)
                    except grpc.RpcError as error:
                        outcomes.append(Outcome(sent, time.monotonic(), error.code(), error.details() or "", False))
                        if "shutting down" in (error.details() or ""):
                            # Ordering, not timing: once the server refuses, its health must already say NOT_SERVING
                            # (asked on the same connection; an error means the server has gone since).
                            try:
                                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                            except grpc.RpcError:
                                pass
                            else:
                                health_after_refusal.append(reply.status)
                        time.sleep(0.002)  # a refused client backs off a little, as the SDK would
                    else:
                        correct = bool(np.allclose(output_arrays(response)["output"], expected, atol=1e-5))
                        outcomes.append(Outcome(sent, time.monotonic(), grpc.StatusCode.OK, "", correct))

        not_serving_at: list[float] = []

        def watch_health() -> None:
            with grpc.insecure_channel(server.address) as own:
                try:
                    for reply in health_pb2_grpc.HealthStub(own).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                            not_serving_at.append(time.monotonic())
                            return
                except grpc.RpcError:
                    return

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(o.code == grpc.StatusCode.OK for o in outcomes) >= 50, 30, "load to be flowing")
        signalled = time.monotonic()
        server.terminate()
        exit_code = server.process.wait(timeout=GRACE_S + 10)
        exited = time.monotonic()
        # Clients keep trying against the closed port: wait until each has tried at least once more.
        wait_until(lambda: sum(o.sent > exited for o in outcomes) >= CLIENTS, 30, "clients to try after the exit")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        watcher.join(timeout=10)
        log = server.log()

    assert exit_code == 0, log[-3000:]
    assert "still running when the grace period ended" not in log  # the drain finished, not the grace period
    ok = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    refused = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert all(o.correct for o in ok)
    assert any(o.sent > signalled for o in ok) or any(o.done > signalled for o in ok)  # load spanned the signal
    # Refused calls are UNAVAILABLE ("shutting down", nothing listening, or gRPC's own "Cancelling all calls" for
    # calls it held unrequested while stopping) or CANCELLED (gRPC's unrequested queue): the count below proves
    # that none of them had been accepted.
    assert {o.code for o in refused} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, \
        {(o.code, o.details) for o in refused}
    assert all(o.done > signalled for o in refused if o.code == grpc.StatusCode.CANCELLED)
    accepted = ACCEPTED_LOG.search(log)
    assert accepted, log[-2000:]
    assert int(accepted.group(1)) == len(ok) + 1  # +1: the request that computed `expected`
    draining = [o for o in refused if "shutting down" in o.details]
    assert draining, "no request reached the server while it drained"
    assert not_serving_at, "health never turned NOT_SERVING"
    assert health_after_refusal, "no refused client could ask for health before the server went away"
    assert set(health_after_refusal) == {health_pb2.HealthCheckResponse.NOT_SERVING}  # health flipped first
    assert all(o.done >= signalled for o in refused)  # nothing was refused before the signal
    assert re.search(r"draining \d+ accepted requests", log)


def test_sdk_retries_a_call_that_a_stopping_server_cancelled() -> None:
    attempts = Attempts(RetryPolicy(), timeout_s=10)
    assert attempts.next_delay_s(error_for(grpc.StatusCode.CANCELLED, "CANCELLED")) is not None
    assert attempts.next_delay_s(error_for(grpc.StatusCode.UNAVAILABLE, "shutting down")) is not None
    assert attempts.next_delay_s(error_for(grpc.StatusCode.INVALID_ARGUMENT, "bad")) is None
