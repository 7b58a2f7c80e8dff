"""Bad model files and reloads under load: every fault is reported with its reason, and none stops the server.

Extends tests/test_server_repository.py (which covers a non-ONNX file, a too-new IR version, a bad config, a model
without versions and a failed reload without load) with truncated files, unsupported opsets, empty files, version
directories without a model, a model path that is a directory or a dangling symlink, an unreadable file, symlinks
out of the repository at every level, and a broken new version arriving while requests flow.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
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
    running_server,
    scale_model,
    serve_command,
    start_server_process,
    wait_until,
    write_model,
)

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


def index_rows(stub: object) -> dict[tuple[str, str], tuple[str, str]]:
    models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models  # type: ignore[attr-defined]
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def assert_serves_dense(stub: object, model: str = "good") -> None:
    response = stub.ModelInfer(infer_request(model, {"input": X}), timeout=10)  # type: ignore[attr-defined]
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(X), atol=1e-6)


def test_each_kind_of_bad_model_file_is_reported_with_its_reason_and_none_stops_the_server(tmp_path: Path) -> None:
    good = dense_model(DENSE_W, DENSE_B)
    data = good.SerializeToString()
    write_model(tmp_path, "good", good)
    write_model(tmp_path, "truncated", data[: len(data) // 2])
    write_model(tmp_path, "not_onnx", b"#!/bin/sh\necho this is a shell script\n")
    write_model(tmp_path, "empty", b"")
    future_opset = dense_model(DENSE_W, DENSE_B)
    future_opset.opset_import[0].version = 99
    write_model(tmp_path, "future_opset", future_opset)
    (tmp_path / "no_version_dirs" / "not_a_number").mkdir(parents=True)
    (tmp_path / "empty_version" / "1").mkdir(parents=True)
    (tmp_path / "model_is_a_dir" / "1" / "model.onnx").mkdir(parents=True)
    (tmp_path / "dangling" / "1").mkdir(parents=True)
    (tmp_path / "dangling" / "1" / "model.onnx").symlink_to(tmp_path / "dangling" / "1" / "gone.onnx")
    expected = {
        ("truncated", "1"): "not a valid ONNX model file",
        ("not_onnx", "1"): "not a valid ONNX model file",
        ("empty", "1"): "",  # onnxruntime's own words; only "UNAVAILABLE with some reason" is promised
        ("future_opset", "1"): "opset",
        ("no_version_dirs", ""): "no version directories",
        ("empty_version", "1"): "model.onnx does not exist",
        ("model_is_a_dir", "1"): "model.onnx is a directory, not a file",
        ("dangling", "1"): "model.onnx is a symlink to a file that does not exist",
    }
    with running_server(tmp_path, strict_readiness=False) as server:
        stub = server.stub()
        assert_serves_dense(stub)
        rows = index_rows(stub)
        for key, fragment in expected.items():
            state, reason = rows[key]
            assert state == "UNAVAILABLE", (key, state)
            assert reason, key
            assert fragment.lower() in reason.lower(), (key, reason)
            assert "ONNXRuntimeError" not in reason, reason
            assert "onnxruntime_src" not in reason, reason
            error = _infer_error(stub, key[0])
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (key, error.details())
            assert "is not ready" in error.details()
        assert_serves_dense(stub)  # still serving after every broken model was asked for
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def _infer_error(stub: object, model: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer_request(model, {"input": X}), timeout=10)  # type: ignore[attr-defined]
    return caught.value


def _without_dac_override() -> list[str]:
    """A command prefix under which root obeys file permissions (tests run as root, where chmod 000 blocks nothing).

    Dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set leaves uid 0 subject to the mode bits,
    which is what a non-root server process sees.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable to this process")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_unreadable_model_files_and_directories_are_reported_and_do_not_stop_the_start(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good", dense_model(DENSE_W, DENSE_B))
    locked = write_model(repo, "locked", dense_model(DENSE_W, DENSE_B))
    locked_dir = write_model(repo, "locked_dir", dense_model(DENSE_W, DENSE_B)).parent
    locked_model = write_model(repo, "locked_model", dense_model(DENSE_W, DENSE_B)).parent.parent
    for path in (locked, locked_dir, locked_model):
        path.chmod(0)
    log_path, port_file = tmp_path / "serve.log", tmp_path / "ports.json"
    command = [*_without_dac_override(),
               *serve_command(repo, port_file, "--device", "cpu", "--strict-readiness", "false")]
    try:
        with start_server_process(command, log_path, port_file) as server, \
                grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert_serves_dense(stub)
            rows = index_rows(stub)
    finally:
        locked.chmod(0o644)
        locked_dir.chmod(0o755)
        locked_model.chmod(0o755)
    assert rows[("locked", "1")][0] == "UNAVAILABLE"
    assert "permission denied" in rows[("locked", "1")][1].lower(), rows[("locked", "1")]
    assert rows[("locked_dir", "1")] == ("UNAVAILABLE", "locked_dir/1/model.onnx cannot be read: permission denied")
    assert rows[("locked_model", "")] == ("UNAVAILABLE", "locked_model/config.json cannot be read: Permission denied")


def test_symlinks_out_of_the_repository_are_refused_at_every_level(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    outside = tmp_path / "outside"
    secret = write_model(outside, "secret", dense_model(DENSE_W, DENSE_B))
    (outside / "config.json").write_text('{"max_batch_size": 4}')
    write_model(repo, "good", dense_model(DENSE_W, DENSE_B))
    (repo / "version_link" / "1").parent.mkdir(parents=True)
    (repo / "version_link" / "1").symlink_to(secret.parent, target_is_directory=True)
    (repo / "file_link" / "1").mkdir(parents=True)
    (repo / "file_link" / "1" / "model.onnx").symlink_to(secret)
    write_model(repo, "config_link", dense_model(DENSE_W, DENSE_B))
    (repo / "config_link" / "config.json").symlink_to(outside / "config.json")
    # A link inside the repository is fine: versions may share a file.
    write_model(repo, "inner_link", dense_model(DENSE_W, DENSE_B))
    (repo / "inner_link" / "2").mkdir()
    (repo / "inner_link" / "2" / "model.onnx").symlink_to(repo / "inner_link" / "1" / "model.onnx")
    with running_server(repo, strict_readiness=False, model_control="explicit") as server:
        stub = server.stub()
        rows = index_rows(stub)
        assert rows[("version_link", "1")][0] == "UNAVAILABLE"
        assert "leads outside the repository" in rows[("version_link", "1")][1]
        assert "leads outside the repository" in rows[("file_link", "1")][1]
        assert rows[("config_link", "")][0] == "UNAVAILABLE"
        assert "config.json is a symlink that leads outside the model repository" in rows[("config_link", "")][1]
        assert rows[("inner_link", "2")] == ("READY", "")
        for name in ("version_link", "file_link", "config_link"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "outside" in caught.value.details()
        assert_serves_dense(stub)


@pytest.fixture
def flowing_requests() -> Iterator[tuple[threading.Event, list[float], list[BaseException], list[threading.Thread]]]:
    stop = threading.Event()
    seen: list[float] = []
    failures: list[BaseException] = []
    threads: list[threading.Thread] = []
    yield stop, seen, failures, threads
    stop.set()
    for thread in threads:
        thread.join(timeout=30)


def test_broken_new_version_under_load_keeps_the_old_version_serving_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
    flowing_requests: tuple[threading.Event, list[float], list[BaseException], list[threading.Thread]],
) -> None:
    stop, seen, failures, threads = flowing_requests
    write_model(tmp_path, "m", scale_model(np.dtype(np.float32), 2.0), version=1)
    x = np.ones((1, 4), np.float32)
    with running_server(tmp_path, model_control="explicit") as server:

        def client() -> None:
            stub = server.stub()
            while not stop.is_set():
                try:
                    y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"]
                    seen.append(float(y[0, 0]))
                except BaseException as exc:  # collected; the test fails below
                    failures.append(exc)

        threads.extend(threading.Thread(target=client) for _ in range(3))
        for thread in threads:
            thread.start()
        wait_until(lambda: len(seen) >= 3, 10, "requests flowing before the reload")
        stub = server.stub()
        version2 = write_model(tmp_path, "m", b"\x08\x0a\x12\x03truncated", version=2)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "could not be reloaded" in caught.value.details()
        assert "version 2" in caught.value.details()
        assert "not a valid ONNX model file" in caught.value.details()
        count = len(seen)
        y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"]
        np.testing.assert_array_equal(y, x * 2)  # still version 1
        assert stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=5).ready

        version2.write_bytes(scale_model(np.dtype(np.float32), 3.0).SerializeToString())
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
        y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"]
        np.testing.assert_array_equal(y, x * 3)
        wait_until(lambda: len(seen) > count, 10, "requests flowing after the reloads")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:3]
    assert len(seen) > count > 0
    assert set(seen) <= {2.0, 3.0}
    assert "reload failed, keeping the versions already loaded" in caplog.text
