"""What the gRPC side guarantees holds over HTTP too: one batcher for both protocols, deadlines (the v2 `timeout`
parameter, on both protocols) and hang-ups, token scopes, TLS and mutual TLS, drain on SIGTERM, `--workers N`,
and statistics and metrics that count both protocols.

Orderings, not timings: a request is caught queued behind a running batch by watching the executor, and what ran is
read back from the model's statistics.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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
    run_in_threads,
    running_server,
    serve_process,
    slow_model,
    wait_until,
    write_model,
)
from tests.pki import Pki, make_pki, serve_tls
from tests.rest_requests import call, get, post_json, v2_input
from tests.test_workers import worker_pids

WIDTH = 512
BLOCKER = np.random.default_rng(2).standard_normal((64, WIDTH)).astype(np.float32)
X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
INFER_TOKEN = "rest-infer-token-0123456789abcdef"
META_TOKEN = "rest-metadata-token-0123456789abcdef"


def repository(root: Path) -> Path:
    write_model(root, "slow", slow_model(WIDTH, 256), config={"max_batch_size": 64, "instances": 1})
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    # Two rows fill a batch, and a lone request waits up to 5 s for a companion: two requests sent together
    # always share one batch, whichever protocol each came by.
    write_model(root, "pair", dense_model(DENSE_W, DENSE_B), config={
        "max_batch_size": 2, "dynamic_batching": {"delay_mode": "fixed", "max_queue_delay_us": 5_000_000}})
    return root


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(repository(tmp_path_factory.mktemp("rest_ops")), http_port=0, metrics_port=0) as running:
        yield running


def slow_executor(server: RunningServer) -> object:
    return server.app.repository.get("slow").executor


def slow_failures(server: RunningServer) -> dict[str, int]:
    return dict(server.app.repository.get("slow").stats.failures)


def executed_rows(server: RunningServer) -> int:
    stats = server.stub().ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10).model_stats[0]
    return sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)


def block(server: RunningServer) -> object:
    """A 64-row batch executing on the slow model's only instance; what comes next waits in the queue."""
    blocker = server.stub().ModelInfer.future(infer_request("slow", {"input": BLOCKER}), timeout=60)
    wait_until(lambda: slow_executor(server).in_flight_batches == 1, 30, "the blocking batch to run")  # type: ignore[attr-defined]
    return blocker


def test_http_and_grpc_requests_share_one_batch(both: RunningServer) -> None:
    port = both.app.http_port
    assert port
    a, b = np.array([[1.0, 0.0, -1.0]], np.float32), np.array([[0.5, 0.5, 0.5]], np.float32)

    def over_http() -> dict[str, object]:
        return post_json(port, "/v2/models/pair/infer", {"inputs": [v2_input("input", a, "FP32")],
                                                          "parameters": {"nnserve.timing": True}}).json()

    def over_grpc() -> pb.ModelInferResponse:
        request = infer_request("pair", {"input": b})
        request.parameters["nnserve.timing"].bool_param = True
        return both.stub().ModelInfer(request, timeout=60)

    http_future, grpc_future = run_in_threads(over_http, 1)[0], run_in_threads(over_grpc, 1)[0]
    http_reply, grpc_reply = http_future.result(60), grpc_future.result(60)
    np.testing.assert_allclose(http_reply["outputs"][0]["data"], dense_reference(a).ravel(), rtol=1e-6)  # type: ignore[index]
    np.testing.assert_allclose(output_arrays(grpc_reply)["output"], dense_reference(b), rtol=1e-6)
    assert http_reply["parameters"]["nnserve.batch_requests"] == 2  # type: ignore[index]
    assert grpc_reply.parameters["nnserve.batch_requests"].int64_param == 2
    stats = both.stub().ModelStatistics(pb.ModelStatisticsRequest(name="pair"), timeout=10).model_stats[0]
    assert (stats.execution_count, stats.inference_stats.success.count) == (1, 2)


def test_statistics_and_metrics_count_both_protocols(both: RunningServer) -> None:
    def successes() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{both.app.metrics_port}/metrics", timeout=10).read().decode()
        match = re.search(r'^nnserve_requests_total\{model="dense",outcome="success",version="1"\} (\S+)$', text,
                          re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = successes()
    both.stub().ModelInfer(infer_request("dense", {"input": X}), timeout=30)
    assert post_json(both.app.http_port or 0, "/v2/models/dense/infer",
                     {"inputs": [v2_input("input", X, "FP32")]}).status == 200
    assert successes() == before + 2


def test_the_timeout_parameter_drops_a_queued_request_on_both_protocols(both: RunningServer) -> None:
    port = both.app.http_port or 0
    before = executed_rows(both)
    blocker = block(both)
    expired = post_json(port, "/v2/models/slow/infer", {"inputs": [v2_input("input", BLOCKER[:2], "FP32")],
                                                        "parameters": {"timeout": 1000}})  # 1 ms
    assert expired.status == 504, expired.body
    assert "deadline" in expired.json()["error"]
    request = infer_request("slow", {"input": BLOCKER[:3]})
    request.parameters["timeout"].int64_param = 1000
    with pytest.raises(grpc.RpcError) as caught:
        both.stub().ModelInfer(request, timeout=60)  # the call's own deadline is later: the parameter wins
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.result()  # type: ignore[attr-defined]
    wait_until(lambda: slow_executor(both).queue_depth == 0, 30, "the queue to empty")  # type: ignore[attr-defined]
    assert executed_rows(both) - before == 64  # neither expired request ran


def test_a_client_that_hangs_up_takes_its_queued_request_out_of_the_queue(both: RunningServer) -> None:
    port = both.app.http_port or 0
    before, cancelled = executed_rows(both), slow_failures(both).get("cancelled", 0)
    blocker = block(both)
    body = json.dumps({"inputs": [v2_input("input", BLOCKER[:4], "FP32")]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: slow_executor(both).queue_depth == 1, 30, "the request to be queued")  # type: ignore[attr-defined]
    wait_until(lambda: slow_executor(both).queue_depth == 0, 30, "the abandoned request to leave the queue")  # type: ignore[attr-defined]
    blocker.result()  # type: ignore[attr-defined]
    wait_until(lambda: slow_failures(both).get("cancelled", 0) == cancelled + 1, 30, "the hang-up to be counted")
    assert executed_rows(both) - before == 64  # the abandoned rows never ran


def test_tokens_over_http_with_open_health_routes(tmp_path: Path) -> None:
    tokens = f"{INFER_TOKEN} infer app\n{META_TOKEN} metadata dashboards\n"
    with running_server(repository(tmp_path / "repo"), http_port=0, auth_tokens=tokens) as server:
        port = server.app.http_port or 0
        assert get(port, "/v2/health/ready").status == 200  # probes need no token
        assert get(port, "/v2/health/live").status == 200
        anonymous = post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", X, "FP32")]})
        assert anonymous.status == 401
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        assert "needs a token" in anonymous.json()["error"]
        wrong = get(port, "/v2/models/dense", headers={"Authorization": "Bearer not-a-configured-token-at-all"})
        assert wrong.status == 401
        infer_only = {"Authorization": f"Bearer {INFER_TOKEN}"}
        ok = post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", X, "FP32")]}, infer_only)
        assert ok.status == 200
        np.testing.assert_allclose(ok.json()["outputs"][0]["data"], dense_reference(X).ravel(), rtol=1e-6)
        assert get(port, "/v2/models/dense", headers=infer_only).status == 200  # what inference needs
        assert get(port, "/v2/models/dense/config", headers=infer_only).status == 200
        denied = get(port, "/v2/models/dense/stats", headers=infer_only)
        assert denied.status == 403
        assert "'metadata' scope that ModelStatistics needs" in denied.json()["error"]
        metadata_only = {"Authorization": f"Bearer {META_TOKEN}"}
        assert post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", X, "FP32")]},
                         metadata_only).status == 403
        assert get(port, "/v2/models/dense/stats", headers=metadata_only).status == 200
        assert call(port, "POST", "/v2/repository/models/dense/load", headers=metadata_only).status == 403


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("rest_pki"))


def test_https_and_mutual_tls_from_the_same_certificate_flags(pki: Pki, tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    with serve_tls(repo, pki, tmp_path / "tls.log", "--http-port", "0", mutual=False) as server:
        port = int(server.ports["http"])
        reply = post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", X, "FP32")]},
                          context=trusting)
        assert reply.status == 200
        with pytest.raises(ssl.SSLError):
            get(port, "/v2/health/ready", context=ssl.create_default_context())  # system roots: not trusted
        with pytest.raises((ConnectionError, OSError)):
            get(port, "/v2/health/ready")  # plaintext against TLS
        server.terminate()
    with serve_tls(repo, pki, tmp_path / "mtls.log", "--http-port", "0", mutual=True) as server:
        port = int(server.ports["http"])
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            get(port, "/v2/health/ready", context=trusting)  # no client certificate
        mutual = ssl.create_default_context(cafile=str(pki.ca))
        mutual.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert get(port, "/v2/health/ready", context=mutual).status == 200
        server.terminate()


def test_sigterm_drains_http_as_grpc(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--http-port", "0", "--metrics-port", "0",
                       "--grace-period", "30", "--device", "cpu") as server:
        port = server.http_port or 0
        body = {"inputs": [v2_input("input", BLOCKER[:16], "FP32")]}
        accepted = run_in_threads(lambda: post_json(port, "/v2/models/slow/infer", body, timeout=120), 4)
        # A lone request to "pair" waits up to 5 s for a companion: accepted work that keeps the drain open while
        # the checks below run, however fast the slow model's batches are.
        lone = {"inputs": [v2_input("input", X, "FP32")]}
        accepted += run_in_threads(lambda: post_json(port, "/v2/models/pair/infer", lone, timeout=120), 1)

        def inflight() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
            match = re.search(rb"^nnserve_inflight_requests (\S+)$", text, re.MULTILINE)
            return float(match.group(1)) if match else 0.0

        def all_accepted() -> bool:
            finished = sum(f.done() for f in accepted)  # read before the gauge, so none is counted twice
            return finished + inflight() >= len(accepted)

        wait_until(all_accepted, 60, "every HTTP request to be accepted")
        server.terminate()
        wait_until(lambda: get(port, "/v2/health/ready").status == 503, 30, "ready to turn 503 on SIGTERM")
        refused = post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", X, "FP32")]})
        assert refused.status == 503
        assert "shutting down" in refused.json()["error"]
        replies = [f.result(120) for f in accepted]
        assert server.process.wait(timeout=60) == 0
        log = server.log()
    assert all(r.status == 200 for r in replies), [r.body[:200] for r in replies]
    expected = replies[0].json()["outputs"][0]["data"]
    assert all(r.json()["outputs"][0]["data"] == expected for r in replies[:4])
    np.testing.assert_allclose(replies[4].json()["outputs"][0]["data"], dense_reference(X).ravel(), rtol=1e-6)
    assert "still running when the grace period ended" not in log


def test_workers_serve_http_on_the_shared_port(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repo")
    with serve_process(repo, tmp_path / "serve.log", "--http-port", "0", "--workers", "2",
                       "--device", "cpu") as server:
        # Both workers listening first: the health check answers from the first one up.
        wait_until(lambda: len(worker_pids(server.log(), "ready: serving")) == 2, 60, "both workers' ready line")
        port = server.http_port or 0
        seen = []
        for _ in range(16):  # a connection each; stats read on the same connection tell its worker
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                body = json.dumps({"inputs": [v2_input("input", X, "FP32")]}).encode()
                connection.request("POST", "/v2/models/dense/infer", body)
                assert connection.getresponse().read()
                connection.request("GET", "/v2/models/dense/stats")
                stats = json.loads(connection.getresponse().read())
                seen.append(stats["model_stats"][0]["inference_stats"]["success"]["count"])
            finally:
                connection.close()
        server.terminate()
        assert server.process.wait(timeout=60) == 0
    assert max(seen) < 16, f"every connection reached the same worker: {seen}"
