"""`nnserve serve` as a real process: graceful shutdown under load, device selection, start-up failures."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve.builder import build
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.app import StartupError, create_server
from nnserve.server.providers import cuda_unavailable_reason, gpu_visible
from nnserve.server.settings import ServerSettings
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    held_port,
    infer_request,
    output_arrays,
    run_in_threads,
    running_server,
    serve_command,
    serve_process,
    slow_model,
    wait_for_health,
    wait_until,
    write_model,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NO_CUDA = cuda_unavailable_reason(0)
needs_no_cuda = pytest.mark.skipif(NO_CUDA is None, reason="CUDA works here; this test is about a machine without it")


def _inflight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r"^nnserve_inflight_requests (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits_within_the_grace_period(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    # One instance, no batching: the accepted requests run one after another, so several are in flight at SIGTERM.
    write_model(repo, "slow", slow_model(1024, 96), config={"dynamic_batching": {"enabled": False}, "instances": 1})
    grace = 20.0
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    with serve_process(repo, tmp_path / "serve.log", "--grace-period", str(grace), "--metrics-port", "0") as server:
        metrics_port = server.metrics_port
        assert metrics_port
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        expected = output_arrays(stub.ModelInfer(infer_request("slow", {"input": x}), timeout=30))["output"]
        in_flight = 6
        futures = run_in_threads(lambda: stub.ModelInfer(infer_request("slow", {"input": x}), timeout=60), in_flight)

        def all_accepted() -> bool:
            finished = sum(f.done() for f in futures)  # read before the gauge, so no request is counted twice
            return finished + _inflight(metrics_port) >= in_flight

        wait_until(all_accepted, 20, f"{in_flight} requests accepted")
        assert not all(f.done() for f in futures)

        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.terminate()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request("slow", {"input": x[:1]}), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        for future in futures:
            np.testing.assert_allclose(output_arrays(future.result(timeout=60))["output"], expected, atol=1e-5)
        assert server.process.wait(timeout=grace + 10) == 0
        channel.close()
        log = server.log()
    assert re.search(r"draining [1-6] accepted requests", log), log
    assert "stopped" in log
    assert "still running when the grace period ended" not in log  # the drain ended, not the grace period


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible here; this test is about a machine without one")
def test_device_auto_without_a_gpu_runs_on_cpu_with_one_info_line_no_warning_and_env_settings(
    tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    for name in ("a", "b", "c"):
        write_model(repo, name, dense_model(DENSE_W, DENSE_B))
    with held_port() as port:
        env = {"NNSERVE_DEVICE": "auto", "NNSERVE_MODEL_CONTROL": "explicit", "NNSERVE_GRPC_PORT": str(port)}
        with serve_process(repo, tmp_path / "serve.log", env=env) as server:
            # serve_process passes --grpc-port 0 itself; the env var must lose to the flag.
            assert server.port != port
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for name in ("a", "b", "c"):
                    config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=5).config
                    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a"), timeout=30)  # env: explicit
                assert config.parameters["provider_fallback"].string_value == "false"  # the plan, not a fallback
            server.terminate()
            assert server.process.wait(timeout=30) == 0
            log = server.log()
    notes = [line for line in log.splitlines() if "GPU" in line or "CUDA" in line]
    assert len(notes) == 1, log
    assert " INFO " in notes[0]
    assert "no GPU visible" in notes[0]
    assert "WARNING" not in log, log
    assert "[E:onnxruntime" not in log, log
    assert "[W:onnxruntime" not in log, log
    assert re.search(r"loaded model 'a' version 1 on CPUExecutionProvider: 8 parameters", log), log
    assert f"listening on 127.0.0.1:{server.port}" in log


@needs_no_cuda
def test_device_cuda_without_cuda_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    write_model(tmp_path, "a", dense_model(DENSE_W, DENSE_B))
    port_file = tmp_path / "ports.json"
    proc = subprocess.run(serve_command(tmp_path, port_file, "--device", "cuda"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "--device cuda was requested but CUDA cannot be used" in proc.stderr
    assert "[E:onnxruntime" not in proc.stderr
    assert not port_file.exists()  # fails fast: before it listens, let alone loads a model


@needs_no_cuda
def test_model_configured_for_cuda_is_unavailable_with_the_reason_while_others_serve(tmp_path: Path) -> None:
    write_model(tmp_path, "cpu_model", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path, "gpu_model", dense_model(DENSE_W, DENSE_B), config={"device": "cuda"})
    with running_server(tmp_path, health_service="cpu_model") as server:
        stub = server.stub()
        (row,) = [m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
                  if m.name == "gpu_model"]
        assert row.state == "UNAVAILABLE"
        assert "device 'cuda' was requested but CUDA cannot be used" in row.reason
        assert stub.ModelReady(pb.ModelReadyRequest(name="cpu_model"), timeout=5).ready


def test_invalid_flag_value_exits_2_naming_the_flag(tmp_path: Path) -> None:
    proc = subprocess.run(serve_command(tmp_path, tmp_path / "ports.json", "--grace-period", "soon"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--grace-period: invalid value 'soon'" in proc.stderr


def test_port_already_in_use_is_a_startup_error(tmp_path: Path) -> None:
    write_model(tmp_path, "a", dense_model(DENSE_W, DENSE_B))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(tmp_path, host="127.0.0.1", grpc_port=port, http_port=None, metrics_port=None)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(create_server(settings))


def test_metrics_port_already_in_use_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(tmp_path, host="127.0.0.1", grpc_port=0, http_port=None, metrics_port=port)

        async def start() -> None:
            app, _ = await create_server(settings)
            try:
                await app.start()
            finally:
                await app.stop(grace=0)

        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            asyncio.run(start())


def test_missing_repository_is_a_startup_error(tmp_path: Path) -> None:
    settings = ServerSettings(tmp_path / "nowhere", host="127.0.0.1", grpc_port=0, http_port=None, metrics_port=None)
    with pytest.raises(StartupError, match="does not exist"):
        asyncio.run(create_server(settings))


def test_liveness_health_stays_serving_while_readiness_follows_model_state(tmp_path: Path) -> None:
    """Kubernetes probes liveness on `liveness`: a broken model must fail readiness, never liveness."""
    repository = tmp_path / "repo"
    build(EXAMPLES / "001_perceptron.json", repository)
    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    with serve_process(repository, tmp_path / "serve.log", wait=False) as proc:
        wait_for_health(proc.address, "perceptron")  # start-up loading is over
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(name: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING  # strict readiness: a model is broken
            assert status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING
