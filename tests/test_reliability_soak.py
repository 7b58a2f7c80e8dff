"""Soak: minutes of mixed good and bad traffic against one `nnserve serve` process.

Not in the default suite (marker `soak`); run it with

    .venv/bin/pytest -m soak                                   # 3 minutes
    NNSERVE_SOAK_SECONDS=600 NNSERVE_SOAK_REPORT=soak.json .venv/bin/pytest -m soak

It prints (and with NNSERVE_SOAK_REPORT writes as JSON) the throughput, the answers by kind of request and status,
and the server's RSS over time, then checks that every kind got only its expected statuses, that nothing came back
INTERNAL or UNKNOWN, that memory did not grow after warm-up, and that the server still drains and exits cleanly.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    scale_model,
    serve_process,
    slow_model,
    write_model,
)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]

SECONDS = float(os.environ.get("NNSERVE_SOAK_SECONDS", "180"))
CLIENTS = int(os.environ.get("NNSERVE_SOAK_CLIENTS", "8"))
SAMPLE_EVERY_S = max(1.0, SECONDS / 30)
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
DEADLINE, CANCELLED, UNAVAILABLE = grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, \
    grpc.StatusCode.UNAVAILABLE
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED
# Kind of request -> (share of the traffic, statuses it may get).
MIX: dict[str, tuple[float, set[grpc.StatusCode]]] = {
    "good_batched": (0.45, {OK, BUSY}),
    "good_slow": (0.10, {OK, BUSY}),
    "good_unbatched": (0.10, {OK, BUSY}),
    "stream": (0.05, {OK}),
    "bad_shape": (0.08, {INVALID}),
    "bad_bytes": (0.05, {INVALID}),
    "unknown_model": (0.04, {NOT_FOUND}),
    "broken_model": (0.03, {UNAVAILABLE}),
    "tight_deadline": (0.05, {OK, DEADLINE, BUSY}),
    "cancelled": (0.05, {OK, CANCELLED, BUSY}),
}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _repository(root: Path) -> Path:
    write_model(root, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 16})
    write_model(root, "slow", slow_model(256, 48), config={"max_batch_size": 32, "instances": 2,
                                                           "dynamic_batching": {"max_queue_size": 64}})
    write_model(root, "unbatched", scale_model(np.dtype(np.float32), 3.0),
                config={"max_batch_size": 0, "dynamic_batching": {"enabled": False}})
    write_model(root, "broken", b"not an onnx model")
    return root


def _traffic(address: str, stop: threading.Event, answers: Counter[tuple[str, str]], wrong: list[str],
             seed: int) -> None:
    """One client: draws a kind of request per call, checks the answer's status (and values when it succeeded)."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), [share for share, _ in MIX.values()]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                  response_deserializer=None)
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            rows = rng.randint(1, 8)
            x = np.asarray(np.random.default_rng(rng.randrange(2**32)).standard_normal((rows, 3)), np.float32)
            check: Callable[[pb.ModelInferResponse], bool] = lambda r, x=x: np.allclose(  # noqa: E731
                output_arrays(r)["output"], dense_reference(x), atol=1e-5)
            try:
                if kind == "good_batched":
                    reply = stub.ModelInfer(infer_request("dense", {"input": x}), timeout=30)
                elif kind == "good_slow":
                    reply = stub.ModelInfer(infer_request("slow", {"input": np.ones((rows, 256), np.float32)}),
                                            timeout=30)
                    check = lambda r, n=rows: output_arrays(r)["output"].shape == (n, 256)  # noqa: E731
                elif kind == "good_unbatched":
                    y = np.ones((rows, 4), np.float32)
                    reply = stub.ModelInfer(infer_request("unbatched", {"x": y}), timeout=30)
                    check = lambda r, y=y: np.array_equal(output_arrays(r)["y"], y * 3)  # noqa: E731
                elif kind == "stream":
                    requests = [infer_request("dense", {"input": x}, request_id=str(i)) for i in range(5)]
                    replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
                    if [r.infer_response.id for r in replies] != ["0", "1", "2", "3", "4"] or any(
                            r.error_message for r in replies):
                        wrong.append(f"stream: {[(r.infer_response.id, r.error_message) for r in replies]}")
                    reply, check = replies[0].infer_response, check
                elif kind == "bad_shape":
                    reply = stub.ModelInfer(infer_request("dense", {"input": np.ones((rows, 4), np.float32)}),
                                            timeout=30)
                elif kind == "bad_bytes":
                    # An over-long varint first: never a valid message, whatever random bytes follow.
                    reply = raw(b"\xff" * 11 + bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))), timeout=30)
                elif kind == "unknown_model":
                    reply = stub.ModelInfer(infer_request(f"nope{rows}", {"input": x}), timeout=30)
                elif kind == "broken_model":
                    reply = stub.ModelInfer(infer_request("broken", {"input": x}), timeout=30)
                elif kind == "tight_deadline":
                    reply = stub.ModelInfer(infer_request("slow", {"input": np.ones((rows, 256), np.float32)}),
                                            timeout=0.002)
                    check = lambda r: True  # noqa: E731
                else:  # cancelled
                    future = stub.ModelInfer.future(infer_request("slow", {"input": np.ones((32, 256), np.float32)}),
                                                    timeout=30)
                    time.sleep(rng.random() * 0.005)
                    future.cancel()
                    reply = future.result()
                    check = lambda r: True  # noqa: E731
            except grpc.FutureCancelledError:
                code = CANCELLED
            except grpc.RpcError as error:
                code = error.code()
            else:
                code = OK
                if isinstance(reply, pb.ModelInferResponse) and not check(reply):
                    wrong.append(f"{kind}: wrong values")
            answers[(kind, code.name)] += 1


def test_soak_mixed_traffic_keeps_serving_with_bounded_memory(tmp_path: Path) -> None:
    repo = _repository(tmp_path / "repo")
    answers: Counter[tuple[str, str]] = Counter()
    wrong: list[str] = []
    samples: list[tuple[float, float, int]] = []  # (seconds since start, RSS MiB, answers so far)
    stop = threading.Event()
    with serve_process(repo, tmp_path / "serve.log", "--device", "cpu", "--strict-readiness", "false") as server:
        pid = server.process.pid
        threads = [threading.Thread(target=_traffic, args=(server.address, stop, answers, wrong, seed), daemon=True)
                   for seed in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < SECONDS:
            samples.append((elapsed, rss_mib(pid), sum(answers.values())))
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, SECONDS - elapsed)))
        samples.append((time.monotonic() - started, rss_mib(pid), sum(answers.values())))
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        with grpc.insecure_channel(server.address) as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
        server.terminate()
        exit_code = server.process.wait(timeout=60)
        log = server.log()

    duration = samples[-1][0]
    total = sum(answers.values())
    report = {
        "seconds": round(duration, 1),
        "clients": CLIENTS,
        "requests": total,
        "requests_per_second": round(total / duration, 1),
        "answers": {f"{kind} {status}": count for (kind, status), count in sorted(answers.items())},
        "rss_mib_over_time": [(round(t, 1), round(rss, 1), n) for t, rss, n in samples],
        "wrong": wrong[:20],
    }
    lines = [f"soak: {total} requests in {duration:.0f} s ({total / duration:.0f}/s) from {CLIENTS} clients",
             *(f"  {kind:15} {status:20} {count}" for (kind, status), count in sorted(answers.items())),
             "  RSS over time (s, MiB, answers): " + ", ".join(f"({t:.0f}, {r:.0f}, {n})" for t, r, n in samples)]
    print("\n" + "\n".join(lines))
    if os.environ.get("NNSERVE_SOAK_REPORT"):
        Path(os.environ["NNSERVE_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")

    assert live
    assert exit_code == 0, log[-3000:]
    assert not wrong, wrong[:5]
    unexpected = {(kind, status): n for (kind, status), n in answers.items()
                  if grpc.StatusCode[status] not in MIX[kind][1]}
    assert not unexpected, unexpected
    assert answers[("good_batched", "OK")] > 0
    assert "Traceback" not in log
    # Memory: after the first third (warm-up: arenas, caches), RSS stays flat.
    warm = [rss for t, rss, _ in samples if t >= duration / 3]
    assert max(warm) - warm[0] < 64, report["rss_mib_over_time"]
