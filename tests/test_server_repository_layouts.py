"""The three shapes a storage location holds (what KServe's storage initializer leaves at /mnt/models): a
repository, one model's folder of versions, one bare `.onnx` file; the last two served under `--model-name`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.app import StartupError, create_server
from nnserve.server.repository_layout import LayoutKind, detect
from nnserve.server.settings import ServerSettings
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    running_server,
    scale_model,
)

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)


def model_folder(root: Path) -> Path:
    """`<root>/1/model.onnx` and `<root>/2/model.onnx` (x1 and x2 scalers) with a config.json naming another model."""
    for version, factor in ((1, 1.0), (2, 2.0)):
        (root / str(version)).mkdir(parents=True)
        (root / str(version) / "model.onnx").write_bytes(scale_model(np.dtype(np.float32), factor).SerializeToString())
    config = {"name": "what-it-was-called-before", "version_policy": {"all": True}}
    (root / "config.json").write_text(json.dumps(config))
    return root


def model_file(root: Path, name: str = "classifier.onnx") -> Path:
    root.mkdir(parents=True)
    (root / name).write_bytes(dense_model(DENSE_W, DENSE_B).SerializeToString())
    return root


def test_layouts_are_told_apart_by_what_the_root_holds(tmp_path: Path) -> None:
    assert detect(model_folder(tmp_path / "folder")) is LayoutKind.MODEL_FOLDER
    assert detect(model_file(tmp_path / "file")) is LayoutKind.MODEL_FILE
    repository = tmp_path / "repo"
    (repository / "dense" / "1").mkdir(parents=True)
    (repository / "dense" / "1" / "model.onnx").write_bytes(dense_model(DENSE_W, DENSE_B).SerializeToString())
    assert detect(repository) is LayoutKind.REPOSITORY
    assert detect(tmp_path / "empty_does_not_exist") is LayoutKind.REPOSITORY


def test_a_model_folder_is_served_under_the_given_name_with_its_versions(tmp_path: Path) -> None:
    with running_server(model_folder(tmp_path / "mnt-models"), model_name="scaler") as server:
        stub = server.stub()
        index = {(m.name, m.version): m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(),
                                                                             timeout=10).models}
        assert index == {("scaler", "1"): "READY", ("scaler", "2"): "READY"}
        x = np.ones((2, 4), np.float32)
        for version, factor in (("1", 1.0), ("2", 2.0)):
            reply = stub.ModelInfer(infer_request("scaler", {"x": x}, version=version), timeout=10)
            np.testing.assert_array_equal(output_arrays(reply)["y"], x * factor)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_a_bare_onnx_file_is_version_1_of_the_given_name_over_grpc_and_http(tmp_path: Path) -> None:
    from tests.rest_requests import post_json, v2_input

    with running_server(model_file(tmp_path / "mnt-models"), model_name="iris", http_port=0) as server:
        reply = server.stub().ModelInfer(infer_request("iris", {"input": X}), timeout=10)
        np.testing.assert_allclose(output_arrays(reply)["output"], dense_reference(X), rtol=1e-6)
        assert reply.model_version == "1"
        body = post_json(server.app.http_port or 0, "/v2/models/iris/infer",
                         {"inputs": [v2_input("input", X, "FP32")]}).json()
        np.testing.assert_allclose(body["outputs"][0]["data"], dense_reference(X).ravel(), rtol=1e-6)


def test_a_single_model_without_a_name_or_in_the_wrong_shape_stops_the_start(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "folder")
    ports = {"grpc_port": 0, "http_port": None, "metrics_port": None}
    with pytest.raises(StartupError, match="give it a name with --model-name"):
        asyncio.run(create_server(ServerSettings(folder, **ports)))  # type: ignore[arg-type]
    with pytest.raises(StartupError, match="not a valid model name"):
        asyncio.run(create_server(ServerSettings(folder, model_name="../escape", **ports)))  # type: ignore[arg-type]
    two = model_file(tmp_path / "two")
    (two / "other.onnx").write_bytes(b"x")
    with pytest.raises(StartupError, match=r"holds 2 \.onnx files"):
        asyncio.run(create_server(ServerSettings(two, repository_layout="model-file", model_name="m",
                                                 **ports)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repository_layout must be one of"):
        ServerSettings(folder, repository_layout="zip")


def test_a_repository_keeps_its_folder_names_whatever_model_name_says(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    (repository / "dense" / "1").mkdir(parents=True)
    (repository / "dense" / "1" / "model.onnx").write_bytes(dense_model(DENSE_W, DENSE_B).SerializeToString())
    with running_server(repository, model_name="ignored") as server:
        names = {m.name for m in server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
    assert names == {"dense"}


def test_a_broken_single_model_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "mnt-models"
    (root / "1").mkdir(parents=True)
    (root / "1" / "model.onnx").write_bytes(b"not onnx")
    with running_server(root, model_name="broken", health_service="liveness") as server:
        (row,) = server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    assert (row.name, row.version, row.state) == ("broken", "1", "UNAVAILABLE")
    assert "1/model.onnx: not a valid ONNX model file" in row.reason
