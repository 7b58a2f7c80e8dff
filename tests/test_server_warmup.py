"""Warm-up before READY: every new version runs its batch sizes on zeroed inputs before it is served, outside the
statistics; dynamic dimensions need their sizes from config.json; a failing warm-up makes the version UNAVAILABLE."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import warmup
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    dense_model,
    finish_model,
    gather_model,
    infer_request,
    running_server,
    write_model,
)


def dynamic_width_model() -> bytes:
    """Relu over [batch, width] with both dimensions dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    return finish_model(graph).SerializeToString()


def test_default_sizes_are_powers_of_two_and_preferred_sizes_up_to_the_limit() -> None:
    assert warmup.batch_sizes(64, (), None) == [1, 2, 4, 8, 16, 32, 64]
    assert warmup.batch_sizes(48, (3, 100), None) == [1, 2, 3, 4, 8, 16, 32, 48]
    assert warmup.batch_sizes(64, (), (1, 8, 500)) == [1, 8]
    assert warmup.batch_sizes(0, (), None) == [0]  # no batch dimension: the fixed shape, once


def test_versions_are_warmed_before_ready_and_warmups_stay_out_of_the_statistics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B), config={
        "max_batch_size": 8, "dynamic_batching": {"preferred_batch_sizes": [3]}})
    write_model(tmp_path, "dynamic", dynamic_width_model(), config={"warmup": {"batch_sizes": [1, 4],
                                                                             "dims": {"x": [16]}}})
    write_model(tmp_path, "unwarmed", dense_model(DENSE_W, DENSE_B), config={"warmup": False})
    caplog.set_level(logging.INFO, logger="nnserve")
    with running_server(tmp_path) as server:
        stats = {s.name: s for s in server.stub().ModelStatistics(pb.ModelStatisticsRequest(), timeout=10).model_stats}
        server.stub().ModelInfer(infer_request("dense", {"input": np.ones((1, 3), np.float32)}), timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    warmed = {m.split("'")[1]: m for m in messages if "warmed up at batch sizes" in m}
    assert "batch sizes [1, 2, 3, 4, 8]" in warmed["dense"]
    assert "batch sizes [1, 4]" in warmed["dynamic"]
    assert "unwarmed" not in warmed
    ready = next(i for i, m in enumerate(messages) if m.startswith("ready: serving"))
    assert all(messages.index(m) < ready for m in warmed.values())  # warmed before the server reported ready
    assert all(s.inference_count == 0 and s.execution_count == 0 for s in stats.values())  # warm-ups not counted


def test_dynamic_dimensions_without_sizes_skip_the_warmup_with_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "dynamic", dynamic_width_model())
    caplog.set_level(logging.INFO, logger="nnserve")
    with running_server(tmp_path) as server:
        assert server.stub().ModelReady(pb.ModelReadyRequest(name="dynamic"), timeout=10).ready
    skipped = [r.getMessage() for r in caplog.records if "warm-up skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "input 'x' has dynamic dimensions [-1, -1]: give their sizes in config.json warmup.dims" in skipped[0]


def test_a_failing_warmup_makes_the_version_unavailable_with_the_reason(tmp_path: Path) -> None:
    # Gather of index 0 on zeroed inputs works; a table of 0 rows fails at run time, not at load.
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"])], "empty_table",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch"])],
        initializer=[helper.make_tensor("table", TensorProto.FLOAT, [0], [])],
    )
    write_model(tmp_path, "fails", finish_model(graph))
    write_model(tmp_path, "gather", gather_model())
    with running_server(tmp_path, health_service="liveness") as server:
        rows = {m.name: m for m in server.stub().RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
    assert rows["gather"].state == "READY"
    assert rows["fails"].state == "UNAVAILABLE"
    assert re.search(r"model 'fails' version 1 failed its warm-up at batch size 1", rows["fails"].reason)


def test_the_warmup_budget_skips_what_is_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 8})
    caplog.set_level(logging.INFO, logger="nnserve")
    with running_server(tmp_path, warmup_timeout_s=0.0) as server:
        assert server.stub().ModelReady(pb.ModelReadyRequest(name="dense"), timeout=10).ready
    skipped = [r.getMessage() for r in caplog.records if "warm-up skipped" in r.getMessage()]
    assert "the 0 s warm-up budget ran out before batch sizes [1, 2, 4, 8]" in skipped[0]
