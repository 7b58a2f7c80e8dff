"""`nnserve serve --workers 2`: two processes on one port, both serving, drained together, never restarted silently.

The kernel spreads connections (not requests) over SO_REUSEPORT listeners, so the tests open many channels, each
with its own connection (a local subchannel pool), and ask each one's worker for its statistics.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.cpu_quota import available_cpus
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    serve_process,
    slow_model,
    wait_until,
    write_model,
)

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 16


def repository(root: Path) -> Path:
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    write_model(root, "slow", slow_model(512, 96), config={"dynamic_batching": {"enabled": False}})
    return root


def connections(address: str) -> list[tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]]:
    """Channels that do not share a connection (each its own subchannel pool), so the kernel can spread them."""
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]
    return [(channel, pb_grpc.GRPCInferenceServiceStub(channel)) for channel in channels]


def worker_pids(log: str, event: str) -> set[int]:
    return {int(pid) for pid in re.findall(rf"\[worker \d+ pid (\d+)\] [\w.]+: {event}", log)}


def test_two_workers_both_serve_the_port_and_sigterm_drains_both(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--workers", "2", "--grace-period", "20") as server:
        links = connections(server.address)
        try:
            rng = np.random.default_rng(5)
            for _channel, stub in links:
                x = rng.standard_normal((3, 3)).astype(np.float32)
                got = output_arrays(stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30))["output"]
                np.testing.assert_allclose(got, dense_reference(x), rtol=1e-5, atol=1e-5)
            seen = [
                stub.ModelStatistics(pb.ModelStatisticsRequest(name="dense"), timeout=10).model_stats[0]
                .inference_stats.success.count
                for _channel, stub in links
            ]
            # One process would have counted all 16 requests on every connection.
            assert max(seen) < CONNECTIONS, f"every connection reached the same process: {seen}"
            # Both answered; the log line of the second may come a moment after its first answer (a busy machine).
            wait_until(lambda: len(worker_pids(server.log(), "ready: serving")) == 2, 30, "both workers' ready line")

            x = rng.standard_normal((64, 512)).astype(np.float32)
            futures = [stub.ModelInfer.future(infer_request("slow", {"input": x}), timeout=60) for _c, stub in links]
            futures[0].result()  # the workers are computing; the others are (almost surely) accepted and queued
            server.terminate()
            answered, refusals = [], []
            for future in futures:
                try:
                    answered.append(output_arrays(future.result())["output"])
                except grpc.RpcError as error:  # sent before SIGTERM but not yet accepted: refused, never lost
                    refusals.append((error.code(), error.details() or ""))
            for result in answered[1:]:
                np.testing.assert_allclose(result, answered[0], atol=1e-5)
            assert server.process.wait(timeout=40) == 0  # 20 s grace + the supervisor's 10 s before it kills
        finally:
            for channel, _stub in links:
                channel.close()
        log = server.log()
    drained = [int(n) for n in re.findall(r"\] [\w.]+: shutting down: draining (\d+) accepted requests", log)]
    assert len(drained) == 2, log
    assert min(drained) >= 1, f"both workers must have had work to drain: {drained}"
    assert len(answered) >= sum(drained), "an accepted request was lost in the drain"
    assert len(answered) + len(refusals) == CONNECTIONS
    assert all(code == grpc.StatusCode.UNAVAILABLE and "shutting down" in text for code, text in refusals)
    assert len(worker_pids(log, "stopped")) == 2, log
    assert "all 2 workers stopped" in log
    assert "did not stop in time" not in log  # both drained within the grace period; none was killed
    assert "still running when the grace period ended" not in log


def test_a_worker_that_dies_is_not_restarted_and_the_supervisor_stops_the_rest_with_status_1(
    tmp_path: Path,
) -> None:
    repo = repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--workers", "2", "--grace-period", "5") as server:
        # The health check answered from one worker; the other may still be loading.
        wait_until(lambda: len(worker_pids(server.log(), "ready: serving")) == 2, 30, "both workers ready")
        victim = min(worker_pids(server.log(), "ready: serving"))
        os.kill(victim, signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1
        log = server.log()
    assert re.search(rf"pid {victim}\) exited on its own \(killed by SIGKILL\)", log), log
    assert len(worker_pids(log, "stopped")) == 1  # the survivor drained and stopped
    assert log.count("ready: serving") == 2  # nothing was restarted


def test_workers_divide_the_available_cpus_among_their_onnxruntime_threads(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--workers", "2") as server:
        server.terminate()
        server.process.wait(timeout=30)
        log = server.log()
    expected = max(1, available_cpus() // 2)
    assert f"2 workers on 127.0.0.1:{server.port}" in log
    assert f"{expected} onnxruntime intra-op threads each" in log


def test_port_held_by_another_listener_fails_the_supervisor_at_once(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    repo = repository(tmp_path / "repo")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "nnserve", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
             "--grpc-port", str(port), "--http-port", "off", "--metrics-port", "off", "--workers", "2"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert "another process is listening there" in done.stderr
