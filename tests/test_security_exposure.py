"""What the server exposes: it listens only on the configured gRPC and metrics sockets, it does not write request
contents to its log at the default level, and clients cannot fill its log with tracebacks.

Listening sockets are read from /proc (the process's socket inodes matched against /proc/net/{tcp,tcp6,udp,udp6}),
for the process and its worker children.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import struct
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.security import install_log_filters
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    gather_model,
    infer_request,
    serve_process,
    wait_until,
    write_model,
)

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")

TCP_LISTEN = "0A"


def _process_tree(pid: int) -> set[int]:
    """The process and its descendants (the workers of `--workers N`)."""
    found = {pid}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:  # the process has exited meanwhile
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:  # the thread has exited between listing and reading (seen in a run)
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except FileNotFoundError:  # the process has exited meanwhile
            continue
        for fd in descriptors:
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(struct.pack("<I", int(host, 16)))
    else:
        ip = ipaddress.IPv6Address(b"".join(struct.pack("<I", int(host[i:i + 8], 16)) for i in range(0, 32, 8)))
        ip = ip.ipv4_mapped or ip  # gRPC listens on IPv6 sockets with v4-mapped addresses
    return str(ip), int(port, 16)


def listening(pids: set[int]) -> set[tuple[str, str, int]]:
    """(protocol, address, port) of every TCP listener and every bound UDP socket of these processes."""
    inodes = _socket_inodes(pids)
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        table = Path(f"/proc/net/{proto}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (proto.startswith("udp") or state == TCP_LISTEN):
                found.add((proto.removesuffix("6"), *_address(local)))
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_the_server_listens_only_on_the_configured_grpc_and_metrics_addresses(tmp_path: Path, workers: int) -> None:
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B))
    with serve_process(tmp_path / "repo", tmp_path / "serve.log", "--device", "cpu", "--workers", str(workers),
                       "--metrics-port", "0", "--metrics-host", "127.0.0.2") as server:
        metrics_port = server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.2:{metrics_port}/metrics", timeout=10).read()
        assert b"nnserve_" in body
        expected = {("tcp", "127.0.0.1", server.port), ("tcp", "127.0.0.2", metrics_port)}
        if workers > 1:  # wait until every worker listens (and has its SIGTERM handler) before looking
            def all_listening() -> bool:
                children = _process_tree(server.process.pid) - {server.process.pid}
                return sum(bool(listening({child})) for child in children) >= workers

            wait_until(all_listening, 60, "every worker to listen")
        sockets = listening(_process_tree(server.process.pid))
        server.terminate()
        assert server.process.wait(timeout=30) == 0
    assert sockets == expected, sockets


def _log_after(repo: Path, log_path: Path, requests: list[pb.ModelInferRequest]) -> str:
    """The log of a server (default level) that answered these requests, some of them failing."""
    with serve_process(repo, log_path, "--device", "cpu") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for request in requests:
                with contextlib.suppress(grpc.RpcError):
                    stub.ModelInfer(request, timeout=10)
            stub.ModelMetadata(pb.ModelMetadataRequest(name="dense"), timeout=10)
        server.terminate()
        assert server.process.wait(timeout=30) == 0
        return server.log()


def test_request_contents_and_names_never_reach_the_log_at_the_default_level(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B))
    secret_value = 271828.1875  # exactly representable: its text would appear as is
    good = infer_request("dense", {"input": np.full((2, 3), secret_value, np.float32)}, request_id="secret-request-id")
    good.parameters["secret-parameter"].string_param = "secret-parameter-value"
    log = _log_after(tmp_path / "repo", tmp_path / "serve.log", [
        good,
        infer_request("dense", {"secret-input-name": np.ones((1, 3), np.float32)}),
        infer_request("secret-model-name", {"input": np.ones((1, 3), np.float32)}),
        infer_request("dense", {"input": np.ones((1, 3), np.float32)}, outputs=["secret-output-name"]),
        infer_request("dense", {"input": np.ones((1, 3), np.float32)}, datatypes={"input": "secret-datatype"}),
    ])
    assert "stopped; 5 inference requests were accepted" in log
    for secret in ("271828", "secret-request-id", "secret-parameter", "secret-input-name", "secret-model-name",
                   "secret-output-name", "secret-datatype"):
        assert secret not in log, secret


def test_an_execution_failure_does_not_log_the_input_values_that_caused_it(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "dense", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path / "repo", "gather", gather_model(), config={"dynamic_batching": {"enabled": False}})
    log = _log_after(tmp_path / "repo", tmp_path / "serve.log",
                     [infer_request("gather", {"index": np.array([314159265], np.int64)})])
    assert "model 'gather' version 1 failed" in log  # the failure itself is logged ...
    assert "314159265" not in log  # ... but not the value that caused it


def test_grpc_traceback_for_a_client_that_already_left_becomes_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    install_log_filters()
    install_log_filters()  # idempotent
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    assert sum(type(f).__name__ == "_ClientGoneFilter" for f in grpc_log.filters) == 1

    def log_client_gone() -> None:
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [/inference.X/ModelInfer]")

    with caplog.at_level(logging.INFO):
        log_client_gone()
        grpc_log.error("some other grpc error")
    assert [r.getMessage() for r in caplog.records] == ["some other grpc error"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        log_client_gone()
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG
    assert record.exc_info is None
    assert record.getMessage().endswith("(the client had gone; nothing to answer)")
