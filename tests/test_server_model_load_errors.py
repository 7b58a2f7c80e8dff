"""onnxruntime's load errors as the server reports them: one line, the model's file named by its place in the
repository with every separator intact, and no server folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.errors import ModelLoadError
from nnserve.server.runner import ModelRunner, RunnerOptions
from tests.conftest import running_server


def _empty_model(repository: Path) -> Path:
    path = repository / "empty" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("relative", [True, False])
def test_an_empty_model_file_is_named_with_its_separators_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _empty_model(Path("faultrepo"))
    with pytest.raises(ModelLoadError) as failure:
        ModelRunner.load("empty", 1, path if relative else path.resolve(), RunnerOptions(device="cpu"))
    message = str(failure.value)
    assert "Load model from empty/1/model.onnx failed" in message, message
    assert "faultrepomodel.onnx" not in message
    assert "emptymodel.onnx" not in message
    assert str(tmp_path) not in message  # the server's folders stay private


def test_the_repository_reports_the_reason_with_the_path_to_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _empty_model(Path("faultrepo"))
    with running_server(Path("faultrepo"), health_service="liveness") as server:
        (row,) = server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    assert row.state == "UNAVAILABLE"
    assert "empty/1/model.onnx" in row.reason, row.reason
    assert "faultrepomodel.onnx" not in row.reason
