"""Metrics of several worker processes, merged by the supervisor (prometheus_client's multi-process mode).

Workers run with PROMETHEUS_MULTIPROC_DIR set and no metrics port of their own; `serve_aggregated_metrics` serves
the merge. Counters and histograms add up across workers and survive a worker's exit; gauges follow their
multiprocess mode over the live workers; each live worker's process metrics appear with its pid.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.builder import build
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.metrics import (
    GAUGE_MODES,
    MULTIPROC_ENV,
    AggregatedMetricsServer,
    MultiprocessWriter,
    serving_metrics,
)
from tests.conftest import (
    EXAMPLES,
    RunningServer,
    ServeProcess,
    infer_request,
    serve_process,
    wait_for_health,
    wait_until,
)

MODEL = "two_layer_softmax"
# Gauges of work in progress: the shared server may still be finishing another test's request between two reads.
VOLATILE = {
    "nnserve_inflight_requests", "nnserve_inflight_batches", "nnserve_queue_depth", "nnserve_batch_delay_seconds",
}
KEY = f'model="{MODEL}",version="1"'


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    found = {}
    for name, labels, value in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)$", text, re.MULTILINE):
        found[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return found


def value(text: str, name: str, labels: str = "") -> float:
    wanted = frozenset(re.findall(r'(\w+)="([^"]*)"', labels))
    return samples(text).get((name, wanted), 0.0)


def infer(server: ServeProcess, count: int) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(count):
            stub.ModelInfer(infer_request(MODEL, {"input": np.ones((2, 2), np.float32)}), timeout=10)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    build(EXAMPLES / "001_two_layer_softmax.json", root)
    return root


@pytest.fixture
def workers(repository: Path, tmp_path: Path) -> Iterator[tuple[Path, list[ServeProcess]]]:
    """Two `nnserve serve` processes sharing one metrics directory, as `--workers 2` runs them."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {MULTIPROC_ENV: str(directory)}
    with ExitStack() as stack:
        started = [
            stack.enter_context(serve_process(repository, tmp_path / f"worker{i}.log", "--device", "cpu", env=env,
                                              wait=False))
            for i in range(2)
        ]
        for worker in started:
            wait_for_health(worker.address)
        yield directory, started


def test_two_workers_add_up_and_a_stopped_worker_keeps_its_counts(workers: tuple[Path, list[ServeProcess]]) -> None:
    directory, (first, second) = workers
    infer(first, 3)
    infer(second, 5)
    aggregated = AggregatedMetricsServer(str(directory))  # what serve_aggregated_metrics runs for the supervisor
    port = aggregated.start("127.0.0.1", 0)
    try:
        _check_merged_then_one_stopped(port, first, second)
    finally:
        aggregated.stop()


def _check_merged_then_one_stopped(port: int, first: ServeProcess, second: ServeProcess) -> None:
    wait_until(lambda: value(scrape(port), "nnserve_requests_total", f'{KEY},outcome="success"') == 8, 15,
               "both workers' requests in the merged metrics")
    text = scrape(port)
    assert value(text, "nnserve_inferences_total", KEY) == 16
    assert value(text, "nnserve_request_duration_seconds_count", KEY) == 8
    assert value(text, 'nnserve_request_duration_seconds_bucket', f'{KEY},le="+Inf"') == 8
    assert 0 < value(text, "nnserve_request_duration_seconds_sum", KEY) < 8 * 10
    stage = f'{KEY},stage="compute_infer"'
    assert value(text, "nnserve_request_stage_duration_seconds_count", stage) == 8
    assert value(text, "nnserve_workers") == 2
    # Gauges are merged per model and version (no pid label): queues add up, facts take the max, ready the min.
    assert [line for line in text.splitlines() if line.startswith("nnserve_queue_depth{")] == [
        f"nnserve_queue_depth{{{KEY}}} 0.0"]
    assert value(text, "nnserve_queue_capacity", KEY) == 2 * 1024
    assert value(text, "nnserve_model_parameters", KEY) == 17
    assert value(text, "nnserve_model_ready", KEY) == 1
    assert value(text, "nnserve_model_execution_provider_info", f'{KEY},provider="CPUExecutionProvider"') == 1
    pids = {str(first.process.pid), str(second.process.pid)}
    cpu = re.findall(r'^nnserve_worker_process_cpu_seconds_total\{pid="(\d+)"\} \S+$', text, re.MULTILINE)
    assert set(cpu) == pids
    assert "process_resident_memory_bytes" in text  # the supervisor's own

    first.terminate()
    assert first.process.wait(timeout=30) == 0
    text = scrape(port)
    assert value(text, "nnserve_requests_total", f'{KEY},outcome="success"') == 8  # flushed on the way out
    assert value(text, "nnserve_inferences_total", KEY) == 16
    assert value(text, "nnserve_workers") == 1
    assert value(text, "nnserve_queue_capacity", KEY) == 1024  # only live workers' gauges count
    assert value(text, "nnserve_model_ready", KEY) == 1
    cpu = re.findall(r'^nnserve_worker_process_cpu_seconds_total\{pid="(\d+)"\} \S+$', text, re.MULTILINE)
    assert cpu == [str(second.process.pid)]


def test_one_writer_merged_reproduces_the_single_process_metrics(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trip: what a worker writes and the supervisor merges is what /metrics of that one process shows."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    stub = server.stub()
    stub.ModelInfer(infer_request(MODEL, {"input": np.ones((3, 2), np.float32)}), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("no_such_model", {"input": np.ones((3, 2), np.float32)}), timeout=10)
    writer = MultiprocessWriter(server.app.metrics_state)
    server.call(_flush(writer))
    aggregated = AggregatedMetricsServer(str(tmp_path))
    port = aggregated.start("127.0.0.1", 0)
    try:
        merged = samples(scrape(port))
    finally:
        aggregated.stop()
    assert server.app.metrics_port
    single = {key: v for key, v in samples(scrape(server.app.metrics_port)).items()
              if key[0].startswith("nnserve_") and key[0] not in VOLATILE}
    assert len(single) > 100
    assert {key: merged.get(key) for key in single} == single


async def _flush(writer: MultiprocessWriter) -> None:
    writer.flush()  # on the server's loop, which owns the statistics


def test_workers_flag_serves_the_merged_metrics_of_every_worker(repository: Path, tmp_path: Path) -> None:
    """`nnserve serve --workers 2`: one metrics port for the pod, whichever worker answered."""
    usage = subprocess.run([sys.executable, "-m", "nnserve", "serve", "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    if "--workers" not in usage or importlib.util.find_spec("nnserve.server.workers") is None:
        pytest.skip("this build of nnserve serve has no --workers supervisor")
    with serve_process(repository, tmp_path / "serve.log", "--device", "cpu", "--workers", "2",
                       "--metrics-port", "0") as supervisor:
        metrics_port = supervisor.metrics_port
        assert metrics_port, supervisor.ports  # the supervisor reports the merged metrics' port
        for _ in range(4):
            infer(supervisor, 2)  # a new connection each time: the kernel spreads them over the workers
        wait_until(lambda: value(scrape(metrics_port), "nnserve_requests_total", f'{KEY},outcome="success"') == 8,
                   15, "the merged count of every worker")
        text = scrape(metrics_port)
        assert value(text, "nnserve_workers") == 2
        assert value(text, "nnserve_inferences_total", KEY) == 16
        supervisor.terminate()


def test_every_gauge_says_how_it_aggregates_across_workers(server: RunningServer) -> None:
    gauges = {family.name for family in serving_metrics(server.app.metrics_state) if family.type == "gauge"}
    assert gauges == set(GAUGE_MODES)
