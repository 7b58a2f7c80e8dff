"""Prometheus `/metrics`, ModelStatistics and per-request timing, checked against known workloads.

One server per module (in-process, metrics on a free port) over its own repository: two seed networks, a slow model
with a queue of one request (to overload it and expire deadlines on purpose), a model that fails at run time, and
one that fails to load. Every scrape is a real HTTP request to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve import __version__
from nnserve.builder import build
from nnserve.client import InferenceClient
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.cli import add_arguments, settings_from
from nnserve.server.statistics import DEFAULT_LATENCY_BUCKETS_S, Histogram
from nnserve.server.timing import TIMING_PARAMETER, read_timing
from tests.conftest import (
    EXAMPLES,
    RunningServer,
    gather_model,
    infer_request,
    run_in_threads,
    running_server,
    slow_model,
    wait_until,
    write_model,
)

SOFTMAX = "two_layer_softmax"
LAYER = "layer_4x3"
SLOW = "slow"
SLOW_ROWS = 512  # about 1 s of compute on one core of the development machine; more on a busy one
BUCKETS = (0.0005, 0.005, 0.05, 0.5, 5.0)


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("metrics_repo")
    build(EXAMPLES / "001_two_layer_softmax.json", repository)
    build(EXAMPLES / "000_layer_4x3.json", repository)
    # One onnxruntime thread: the big batch takes long enough on any machine, and leaves the event loop a core.
    write_model(repository, SLOW, slow_model(1024, 64), config={
        "max_batch_size": 512, "instances": 1, "intra_op_threads": 1,
        "dynamic_batching": {"enabled": True, "max_queue_size": 1, "max_queue_delay_us": 0},
    })
    write_model(repository, "gather", gather_model())
    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    with running_server(repository, health_service=SOFTMAX, metrics_port=0, strict_readiness=False,
                        metrics_buckets=BUCKETS) as running:
        yield running


def scrape(server: RunningServer) -> str:
    port = server.app.metrics_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of one sample (labels matched exactly, in any order); 0 when absent."""
    for match in re.finditer(rf"^{re.escape(metric)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    return 0.0


def outcome(text: str, model: str, version: str, result: str) -> float:
    return sample(text, "nnserve_requests_total", model=model, version=version, outcome=result)


def softmax_input(rows: int) -> np.ndarray:
    return np.linspace(-1, 1, rows * 2, dtype=np.float32).reshape(rows, 2)


# -- a known workload ----------------------------------------------------------------------------------------


def test_n_requests_of_k_rows_give_n_successes_nk_inferences_and_histograms_of_n(metrics_server: RunningServer) -> None:
    n, k = 6, 3
    stub = metrics_server.stub()
    key = {"model": SOFTMAX, "version": "1"}
    before = scrape(metrics_server)
    started = time.monotonic()
    for _ in range(n):
        stub.ModelInfer(infer_request(SOFTMAX, {"input": softmax_input(k)}), timeout=10)
    wall = time.monotonic() - started
    after = scrape(metrics_server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("nnserve_requests_total", **key, outcome="success") == n
    assert delta("nnserve_inferences_total", **key) == n * k
    assert 1 <= delta("nnserve_executions_total", **key) <= n  # sequential requests: one batch each, at most
    assert delta("nnserve_request_duration_seconds_count", **key) == n
    assert 0 < delta("nnserve_request_duration_seconds_sum", **key) < wall
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("nnserve_request_stage_duration_seconds_count", **key, stage=stage) == n
        assert 0 <= delta("nnserve_request_stage_duration_seconds_sum", **key, stage=stage) < wall
    assert delta("nnserve_request_stage_duration_seconds_sum", **key, stage="compute_infer") > 0
    executions = delta("nnserve_executions_total", **key)
    assert delta("nnserve_batch_size_rows_count", **key) == executions
    assert delta("nnserve_batch_size_rows_sum", **key) == n * k
    assert delta("nnserve_batch_collection_duration_seconds_count", **key) == executions


def test_histogram_buckets_are_the_configured_ones_cumulative_and_end_in_the_count(
    metrics_server: RunningServer,
) -> None:
    metrics_server.stub().ModelInfer(infer_request(SOFTMAX, {"input": softmax_input(1)}), timeout=10)
    text = scrape(metrics_server)
    pattern = r'^nnserve_request_duration_seconds_bucket\{le="([^"]+)",model="two_layer_softmax",version="1"\} (\S+)$'
    buckets = [(le, float(value)) for le, value in re.findall(pattern, text, re.MULTILINE)]
    assert [le for le, _ in buckets] == [*(str(b) for b in BUCKETS), "+Inf"]
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == sample(text, "nnserve_request_duration_seconds_count", model=SOFTMAX, version="1")
    rows = re.findall(r'^nnserve_batch_size_rows_bucket\{le="([^"]+)",model="two_layer_softmax"', text, re.MULTILINE)
    assert rows[:4] == ["1.0", "2.0", "4.0", "8.0"]


def test_gauges_report_queue_facts_readiness_and_batching_delay(metrics_server: RunningServer) -> None:
    text = scrape(metrics_server)
    key = {"model": SOFTMAX, "version": "1"}
    assert sample(text, "nnserve_queue_depth", **key) == 0
    assert sample(text, "nnserve_queue_capacity", model=SLOW, version="1") == 1
    assert sample(text, "nnserve_inflight_batches", **key) == 0
    assert sample(text, "nnserve_model_ready", **key) == 1
    assert sample(text, "nnserve_model_ready", model="broken", version="1") == 0
    assert sample(text, "nnserve_model_parameters", **key) == 17
    assert sample(text, "nnserve_model_weight_bytes", **key) == 68
    assert sample(text, "nnserve_model_flops_per_sample", **key) == 29
    served = metrics_server.app.repository.get(SOFTMAX)
    provider = served.runner.provider
    assert sample(text, "nnserve_model_execution_provider_info", **key, provider=provider) == 1
    assert sample(text, "nnserve_model_provider_fallback", **key) == (1.0 if served.runner.provider_fallback else 0.0)
    delay = sample(text, "nnserve_batch_delay_seconds", **key)
    assert 0 <= delay <= served.batching.max_queue_delay_s
    assert sample(text, "nnserve_batch_delay_seconds", model=SLOW, version="1") == 0  # max_queue_delay_us 0
    assert sample(text, "nnserve_build_info", name="nnserve", version=__version__) == 1
    assert "process_resident_memory_bytes" in text
    assert "# TYPE nnserve_request_duration_seconds histogram" in text
    assert "# TYPE nnserve_requests_total counter" in text


# -- failures by reason ----------------------------------------------------------------------------------------


def expect_code(call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == code, caught.value.details()


def test_invalid_unknown_and_not_ready_requests_move_their_own_counters(metrics_server: RunningServer) -> None:
    stub = metrics_server.stub()
    before = scrape(metrics_server)
    bad_shape = infer_request(SOFTMAX, {"input": np.ones((2, 3), np.float32)})
    expect_code(lambda: stub.ModelInfer(bad_shape, timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
    for name in ("no_such_model", "another_unknown_name"):  # both land in one bounded series
        request = infer_request(name, {"input": softmax_input(1)})
        expect_code(lambda r=request: stub.ModelInfer(r, timeout=10), grpc.StatusCode.NOT_FOUND)
    wrong_version = infer_request(SOFTMAX, {"input": softmax_input(1)}, version="7")
    expect_code(lambda: stub.ModelInfer(wrong_version, timeout=10), grpc.StatusCode.NOT_FOUND)
    broken = infer_request("broken", {"input": softmax_input(1)})
    expect_code(lambda: stub.ModelInfer(broken, timeout=10), grpc.StatusCode.UNAVAILABLE)
    runtime_failure = infer_request("gather", {"index": np.array([3, 42], dtype=np.int64)})
    expect_code(lambda: stub.ModelInfer(runtime_failure, timeout=10), grpc.StatusCode.INTERNAL)
    after = scrape(metrics_server)

    def delta(model: str, version: str, result: str) -> float:
        return outcome(after, model, version, result) - outcome(before, model, version, result)

    assert delta(SOFTMAX, "1", "invalid") == 1
    assert delta("_unknown", "_unknown", "not_found") == 2
    assert delta(SOFTMAX, "_unknown", "not_found") == 1
    assert delta("broken", "", "not_ready") == 1
    assert delta("gather", "1", "internal") == 1
    assert delta(SOFTMAX, "1", "success") == 0
    assert "no_such_model" not in after  # client-chosen names never become label values


def _queue_of(server: RunningServer, model: str) -> tuple[int, int]:
    executor = server.app.repository.get(model).executor
    return executor.in_flight_batches, executor.queue_depth


def test_overload_deadline_and_cancellation_move_their_own_counters(metrics_server: RunningServer) -> None:
    """A long batch holds the only instance; the queue holds one request; the next is rejected, one with a short
    deadline expires in the queue, and one whose caller cancels is dropped."""
    stub = metrics_server.stub()
    big = infer_request(SLOW, {"input": np.ones((SLOW_ROWS, 1024), np.float32)})
    small = infer_request(SLOW, {"input": np.ones((1, 1024), np.float32)})
    before = scrape(metrics_server)

    (running,) = run_in_threads(lambda: stub.ModelInfer(big, timeout=60), 1)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 0), 30, "the big batch to start")
    (queued,) = run_in_threads(lambda: stub.ModelInfer(small, timeout=60), 1)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 1), 30, "a request to queue")
    expect_code(lambda: stub.ModelInfer(small, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
    running.result(60)
    queued.result(60)

    (running,) = run_in_threads(lambda: stub.ModelInfer(big, timeout=60), 1)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 0), 30, "the big batch to start")
    # 0.3 s: the request reaches the queue in milliseconds, and the big batch runs for a second (more when busy).
    expect_code(lambda: stub.ModelInfer(small, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 0), 30, "the expired request to leave the queue")
    running.result(60)

    # A fresh big batch, so the cancellation below never races the end of the previous one.
    (running,) = run_in_threads(lambda: stub.ModelInfer(big, timeout=60), 1)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 0), 30, "the big batch to start")
    cancelled = stub.ModelInfer.future(small)
    wait_until(lambda: _queue_of(metrics_server, SLOW)[1] == 1, 30, "the request to queue")
    cancelled.cancel()
    running.result(60)

    def delta(result: str) -> float:
        return outcome(scrape(metrics_server), SLOW, "1", result) - outcome(before, SLOW, "1", result)

    wait_until(lambda: delta("cancelled") == 1, 30, "the cancellation to be counted")
    assert delta("rejected") == 1
    assert delta("deadline") == 1
    assert delta("success") == 4


# -- ModelStatistics ----------------------------------------------------------------------------------------------

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

client = tc.InferenceServerClient(sys.argv[1])
x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
inp = tc.InferInput("input", [4, 4], "FP32")
inp.set_data_from_numpy(x)
timed = client.infer(sys.argv[2], [inp], parameters={"nnserve.timing": True}).get_response(as_json=True)
stats = client.get_inference_statistics(sys.argv[2], "1", as_json=True)
print(json.dumps({"stats": stats, "timed": timed.get("parameters", {})}))
"""


def test_model_statistics_through_the_triton_client_agree_with_prometheus(metrics_server: RunningServer) -> None:
    stub = metrics_server.stub()
    for rows in (1, 2, 5):
        stub.ModelInfer(infer_request(LAYER, {"input": np.ones((rows, 4), np.float32)}), timeout=10)
    expect_code(lambda: stub.ModelInfer(infer_request(LAYER, {"input": np.ones((1, 3), np.float32)}), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT)
    # tritonclient and nnserve.protos register the same protobuf names, so Triton's client runs in its own process.
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, metrics_server.address, LAYER],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    text = scrape(metrics_server)
    (stats,) = out["stats"]["model_stats"]
    infer = stats["inference_stats"]
    key = {"model": LAYER, "version": "1"}

    def ns(part: str) -> int:
        return int(infer[part].get("ns", 0))

    assert (stats["name"], stats["version"]) == (LAYER, "1")
    assert int(infer["success"]["count"]) == sample(text, "nnserve_requests_total", **key, outcome="success") == 4
    assert int(infer["fail"]["count"]) == sample(text, "nnserve_requests_total", **key, outcome="invalid") == 1
    assert int(stats["inference_count"]) == sample(text, "nnserve_inferences_total", **key) == 12
    assert int(stats["execution_count"]) == sample(text, "nnserve_executions_total", **key)
    assert ns("success") * 1e-9 == pytest.approx(sample(text, "nnserve_request_duration_seconds_sum", **key))
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(infer[part]["count"]) == 4
        prometheus = sample(text, "nnserve_request_stage_duration_seconds_sum", **key, stage=part)
        assert ns(part) * 1e-9 == pytest.approx(prometheus, rel=1e-9, abs=1e-9)
    assert ns("compute_infer") > 0
    batches = stats["batch_stats"]
    assert {int(b["batch_size"]) for b in batches} == {1, 2, 4, 5}
    assert sum(int(b["compute_infer"]["count"]) for b in batches) == int(stats["execution_count"])
    assert sum(int(b["compute_input"].get("ns", 0)) for b in batches) == ns("compute_input")
    assert sum(int(b["compute_output"].get("ns", 0)) for b in batches) == ns("compute_output")
    assert int(stats["last_inference"]) > 0
    assert int(stats["memory_usage"][0]["byte_size"]) == 60  # 15 float32 parameters

    timed = out["timed"]  # Triton's client sees the timing response parameters too
    assert int(timed["nnserve.batch_rows"]["int64_param"]) >= 4
    assert timed["nnserve.provider"]["string_param"]


# -- per-request timing -----------------------------------------------------------------------------------------


def test_timing_parameters_are_returned_only_when_asked_and_add_up(metrics_server: RunningServer) -> None:
    with InferenceClient(metrics_server.address) as client:
        plain = client.infer_result(SOFTMAX, softmax_input(2))
        assert not any(key.startswith("nnserve.") for key in plain.parameters)
        for flag in (True, "true", 1):
            timed = client.infer_result(SOFTMAX, softmax_input(2), parameters={TIMING_PARAMETER: flag})
            timing = read_timing(timed.parameters)
            assert set(timing) == {"queue_us", "compute_input_us", "compute_infer_us", "compute_output_us",
                                   "compute_us", "total_us", "batch_rows", "batch_requests", "provider"}
            assert timing["compute_us"] == (timing["compute_input_us"] + timing["compute_infer_us"]  # type: ignore[operator]
                                            + timing["compute_output_us"])
            assert timing["queue_us"] + timing["compute_us"] <= timing["total_us"]  # type: ignore[operator]
            assert timing["total_us"] > 0  # type: ignore[operator]
            assert timing["batch_rows"] >= 2  # type: ignore[operator]
            assert timing["batch_requests"] >= 1  # type: ignore[operator]
            assert timing["provider"] == metrics_server.app.repository.get(SOFTMAX).runner.provider
        off = client.infer_result(SOFTMAX, softmax_input(2), parameters={TIMING_PARAMETER: False})
        assert "nnserve.total_us" not in off.parameters


def test_timing_of_concurrent_requests_reports_the_batch_they_shared(metrics_server: RunningServer) -> None:
    stub = metrics_server.stub()
    big = infer_request(SLOW, {"input": np.ones((SLOW_ROWS, 1024), np.float32)})
    (running,) = run_in_threads(lambda: stub.ModelInfer(big, timeout=60), 1)
    wait_until(lambda: _queue_of(metrics_server, SLOW) == (1, 0), 30, "the big batch to start")
    timed = infer_request(SLOW, {"input": np.ones((3, 1024), np.float32)})
    timed.parameters[TIMING_PARAMETER].bool_param = True
    response = stub.ModelInfer(timed, timeout=60)
    running.result(60)
    timing = read_timing(response.parameters)
    assert (timing["batch_rows"], timing["batch_requests"]) == (3, 1)
    # It waited in the queue while the big batch ran, and the timing says so.
    assert timing["queue_us"] > timing["compute_infer_us"]  # type: ignore[operator]
    assert timing["queue_us"] + timing["compute_us"] <= timing["total_us"]  # type: ignore[operator]


def test_streaming_requests_are_counted_and_timed(metrics_server: RunningServer) -> None:
    stub = metrics_server.stub()
    before = scrape(metrics_server)
    requests = []
    for _ in range(3):
        request = infer_request(SOFTMAX, {"input": softmax_input(1)})
        request.parameters[TIMING_PARAMETER].bool_param = True
        requests.append(request)
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert all(not r.error_message for r in responses)
    assert all("nnserve.total_us" in r.infer_response.parameters for r in responses)
    after = scrape(metrics_server)
    assert outcome(after, SOFTMAX, "1", "success") - outcome(before, SOFTMAX, "1", "success") == 3
    statistics = stub.ModelStatistics(pb.ModelStatisticsRequest(name=SOFTMAX), timeout=5).model_stats[0]
    assert statistics.inference_stats.success.count == outcome(after, SOFTMAX, "1", "success")


def test_metrics_host_binds_the_metrics_listener_separately(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    build(EXAMPLES / "001_perceptron.json", repository)
    with running_server(repository, host="127.0.0.1", metrics_port=0, metrics_host="localhost") as running:
        port = running.app.metrics_port
        assert port
        with urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5) as response:
            assert b"nnserve_model_parameters" in response.read()


def test_bucket_and_host_flags_and_their_environment_variables() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model-repository", "repo"]
    assert settings_from(parser.parse_args(base), {}).metrics_buckets == DEFAULT_LATENCY_BUCKETS_S
    flagged = settings_from(parser.parse_args([*base, "--metrics-buckets", "0.001, 0.01,1"]), {})
    assert flagged.metrics_buckets == (0.001, 0.01, 1.0)
    assert flagged.metrics_host is None  # the same as --host
    from_env = settings_from(parser.parse_args(base), {"NNSERVE_METRICS_BUCKETS": "0.5,5",
                                                       "NNSERVE_METRICS_HOST": "127.0.0.1"})
    assert (from_env.metrics_buckets, from_env.metrics_host) == ((0.5, 5.0), "127.0.0.1")
    bad_buckets = (("1,0.5", "increase strictly"), ("0,1", "positive"), ("inf", "finite"), ("a", "expected increasing"))
    for bad, why in bad_buckets:
        with pytest.raises(ValueError, match=why):
            settings_from(parser.parse_args([*base, "--metrics-buckets", bad]), {})


def test_a_value_on_a_bound_counts_in_that_bucket_as_prometheus_le_says() -> None:
    histogram = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 3.0):
        histogram.observe(value)
    counts, total = histogram.snapshot()
    assert counts == [2, 2, 1]
    assert total == pytest.approx(3.0135)
