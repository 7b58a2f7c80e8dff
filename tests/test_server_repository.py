"""The model repository: broken models beside good ones, version policies, explicit load/unload/reload, names."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from nnserve.protos import grpc_service_pb2 as pb
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    running_server,
    scale_model,
    write_model,
)

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


def rpc_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=10)  # type: ignore[operator]
    return error.value


def index_rows(stub: object) -> dict[tuple[str, str], tuple[str, str]]:
    models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def test_corrupt_and_invalid_models_are_unavailable_with_reasons_while_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path, "corrupt", b"this is not an onnx file")
    too_new = dense_model(DENSE_W, DENSE_B)
    too_new.ir_version = 14
    write_model(tmp_path, "too_new", too_new)
    write_model(tmp_path, "bad_config", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8, "gpus": 1})
    (tmp_path / "no_versions").mkdir()
    caplog.set_level(logging.INFO, logger="nnserve")
    with running_server(tmp_path, strict_readiness=False) as server:
        stub = server.stub()
        np.testing.assert_allclose(
            output_arrays(stub.ModelInfer(infer_request("good", {"input": X}), timeout=10))["output"],
            dense_reference(X), atol=1e-6,
        )
        rows = index_rows(stub)
        assert rows[("good", "1")] == ("READY", "")
        assert rows[("corrupt", "1")] == ("UNAVAILABLE", "corrupt/1/model.onnx: not a valid ONNX model file "
                                                         "(protobuf parsing failed)")
        assert rows[("too_new", "1")][0] == "UNAVAILABLE"
        assert "IR version" in rows[("too_new", "1")][1]
        assert rows[("bad_config", "")][0] == "UNAVAILABLE"
        assert "bad_config/config.json: unknown key 'gpus'" in rows[("bad_config", "")][1]
        assert "no version directories" in rows[("no_versions", "")][1]

        assert not stub.ModelReady(pb.ModelReadyRequest(name="corrupt"), timeout=5).ready
        error = rpc_error(stub.ModelInfer, infer_request("corrupt", {"input": X}))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "not a valid ONNX model file" in error.details()
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready  # strict readiness is off here
        health = server.health()
        status = {name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                  for name in ("good", "corrupt")}
        assert status == {"good": health_pb2.HealthCheckResponse.SERVING,
                          "corrupt": health_pb2.HealthCheckResponse.NOT_SERVING}
    logged = caplog.text
    assert "model 'corrupt' version 1 is UNAVAILABLE: corrupt/1/model.onnx: not a valid ONNX model file" in logged
    assert "loaded model 'good' version 1 on CPUExecutionProvider: 8 parameters" in logged


def test_strict_readiness_reports_not_ready_while_a_model_is_unavailable(tmp_path: Path) -> None:
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path, "corrupt", b"garbage")
    with running_server(tmp_path, health_service="good") as server:
        stub = server.stub()
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        overall = server.health().Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert overall == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stub.ModelReady(pb.ModelReadyRequest(name="good"), timeout=5).ready


def test_version_policy_latest_two_loads_only_the_two_newest(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        write_model(tmp_path, "m", scale_model(np.dtype(np.float32), float(version)), version=version)
    (tmp_path / "m" / "config.json").write_text('{"version_policy": {"latest": 2}}')
    write_model(tmp_path, "s", scale_model(np.dtype(np.float32), 1.0), version=1)
    write_model(tmp_path, "s", scale_model(np.dtype(np.float32), 2.0), version=2)
    (tmp_path / "s" / "config.json").write_text('{"version_policy": {"specific": [1]}}')
    with running_server(tmp_path) as server:
        stub = server.stub()
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=5).versions) == ["3", "2"]
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="s"), timeout=5).versions) == ["1"]
        error = rpc_error(stub.ModelInfer, infer_request("m", {"x": np.ones((1, 4), np.float32)}, version="1"))
        assert error.code() == grpc.StatusCode.NOT_FOUND


def test_repository_rpcs_are_refused_unless_model_control_is_explicit(tmp_path: Path) -> None:
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    with running_server(tmp_path) as server:
        stub = server.stub()
        for call, request in (
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="good")),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="good")),
        ):
            error = rpc_error(call, request)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control explicit" in error.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="good"), timeout=5).ready


@pytest.mark.parametrize(
    "name", ["../outside", "a/b", "..", ".", "", "x" * 129, "name with space", "/etc", "-leading-dash", "sp\x00m"]
)
def test_model_names_that_are_not_plain_names_are_refused(tmp_path_factory: pytest.TempPathFactory,
                                                           name: str) -> None:
    repo = tmp_path_factory.mktemp("names")
    with running_server(repo, model_control="explicit", strict_readiness=False) as server:
        stub = server.stub()
        for call, request in (
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name)),
        ):
            error = rpc_error(call, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "model name" in error.details()


def test_model_directory_symlinked_outside_the_repository_is_not_loaded(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    outside = tmp_path / "outside"
    write_model(outside, "secret", dense_model(DENSE_W, DENSE_B))
    write_model(repo, "good", dense_model(DENSE_W, DENSE_B))
    (repo / "escape").symlink_to(outside / "secret", target_is_directory=True)
    with running_server(repo, strict_readiness=False, model_control="explicit") as server:
        stub = server.stub()
        state, reason = index_rows(stub)[("escape", "")]
        assert state == "UNAVAILABLE"
        assert "outside the model repository" in reason
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="escape"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "outside the model repository" in error.details()


def test_explicit_mode_loads_a_new_model_and_unloads_it(tmp_path: Path) -> None:
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    with running_server(tmp_path, model_control="explicit") as server:
        stub = server.stub()
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="later"))
        assert error.code() == grpc.StatusCode.NOT_FOUND

        write_model(tmp_path, "later", scale_model(np.dtype(np.float32), 5.0))
        assert index_rows(stub)[("later", "")] == ("UNAVAILABLE", "not loaded")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="later"), timeout=30)
        x = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(
            output_arrays(stub.ModelInfer(infer_request("later", {"x": x}), timeout=10))["y"], x * 5
        )
        health = server.health()
        assert health.Check(health_pb2.HealthCheckRequest(service="later"), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING

        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="later"), timeout=30)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="later"), timeout=5).ready
        error = rpc_error(stub.ModelInfer, infer_request("later", {"x": x}))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "unloaded" in error.details()
        assert index_rows(stub)[("later", "1")] == ("UNAVAILABLE", "unloaded")
        assert health.Check(health_pb2.HealthCheckRequest(service="later"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_readiness_counts_the_models_meant_to_be_served_not_the_unloaded_ones(tmp_path: Path) -> None:
    """One rule for ServerReady, health "" and the SDK's wait_until_ready: every model loaded at start or by a load
    request and not unloaded since must be ready; a failed load counts against it, an explicit unload does not."""
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path, "other", scale_model(np.dtype(np.float32), 2.0))
    with running_server(tmp_path, model_control="explicit") as server:
        stub, health = server.stub(), server.health()

        def readiness() -> tuple[bool, int]:
            return (stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready,
                    health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert readiness() == (True, serving)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="other"), timeout=30)
        assert readiness() == (True, serving)  # everything still meant to be served is ready: stay in rotation
        assert not stub.ModelReady(pb.ModelReadyRequest(name="other"), timeout=5).ready

        write_model(tmp_path, "broken", b"not onnx")
        assert rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="broken")).code() == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert readiness() == (False, not_serving)  # asked for and not ready: out of rotation
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"), timeout=30)
        assert readiness() == (True, serving)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="other"), timeout=30)
        assert readiness() == (True, serving)
        assert stub.ModelReady(pb.ModelReadyRequest(name="other"), timeout=5).ready


def test_a_model_that_failed_at_start_keeps_the_server_unready(tmp_path: Path) -> None:
    write_model(tmp_path, "good", dense_model(DENSE_W, DENSE_B))
    write_model(tmp_path, "broken", b"not onnx")
    with running_server(tmp_path, health_service="liveness") as server:
        assert not server.stub().ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert server.health().Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_failed_reload_keeps_serving_the_loaded_version(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", scale_model(np.dtype(np.float32), 2.0))
    with running_server(tmp_path, model_control="explicit") as server:
        stub = server.stub()
        path.write_bytes(b"truncated")
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="m"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "could not be reloaded" in error.details()
        assert "not a valid ONNX model file" in error.details()
        x = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal(output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"],
                                      x * 2)


def test_reload_under_load_swaps_the_model_without_failing_any_request(tmp_path: Path) -> None:
    path = write_model(tmp_path, "m", scale_model(np.dtype(np.float32), 2.0))
    with running_server(tmp_path, model_control="explicit") as server:
        x = np.arange(4, dtype=np.float32).reshape(1, 4) + 1
        stop = threading.Event()
        seen: list[float] = []
        failures: list[BaseException] = []

        def client() -> None:
            stub = server.stub()
            while not stop.is_set():
                try:
                    y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"]
                    seen.append(float(y[0, 0]))
                except BaseException as exc:  # collected, the test fails below
                    failures.append(exc)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        stub = server.stub()
        try:
            for factor in (3.0, 4.0, 5.0):
                path.write_bytes(scale_model(np.dtype(np.float32), factor).SerializeToString())
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
                y = output_arrays(stub.ModelInfer(infer_request("m", {"x": x}), timeout=10))["y"]
                np.testing.assert_array_equal(y, x * factor)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        assert not failures, failures[:3]
        assert len(seen) > 10
        assert set(seen) <= {2.0, 3.0, 4.0, 5.0}
