"""`nnserve models` against the real server: each version's dtype (the builder's, or the signature's datatypes for
other models) and the batching delay mode, in the table and in `--json`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from nnserve.builder import build
from nnserve.cli import main
from tests.conftest import EXAMPLES, RunningServer, multi_io_model, running_server, scale_model, write_model

SOFTMAX = "two_layer_softmax"


@pytest.fixture(scope="module")
def listing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Builder models in float32 and float16, models from elsewhere (mixed and per-version datatypes), both delay
    modes, and a model that does not load."""
    repository = tmp_path_factory.mktemp("listing")
    build(EXAMPLES / "001_two_layer_softmax.json", repository)
    build(EXAMPLES / "001_two_layer_softmax.json", repository, fp16=True)
    write_model(repository, "multi_io", multi_io_model(), config={"dynamic_batching": {"delay_mode": "fixed"}})
    write_model(repository, "mixed_versions", scale_model(np.dtype(np.float32), 2.0), version=1,
                config={"version_policy": {"all": True}})
    write_model(repository, "mixed_versions", scale_model(np.dtype(np.float16), 2.0), version=2)
    write_model(repository, "unbatched", scale_model(np.dtype(np.float64), 2.0),
                config={"dynamic_batching": {"enabled": False}})
    write_model(repository, "broken", b"this is not an onnx model")
    with running_server(repository, strict_readiness=False, device="cpu") as server:
        yield server


def models(server: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["models", "--url", server.address, *args]) == 0
    return capsys.readouterr().out


def table_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(model, version) -> {column: cell}, cutting each line at the header's column starts."""
    header, _rule, *lines = text.splitlines()
    names = ["MODEL", "VERSION", "STATE", "PROVIDER", "PARAMS", "WEIGHTS", "FLOPS/ROW", "OPSET", "DTYPE",
             "MAX BATCH", "BATCHING", "INSTANCES", "REASON"]
    assert [header.index(name) for name in names] == sorted(header.index(name) for name in names), header
    widths = [len(part) for part in _rule.split("  ")]
    rows = {}
    for line in lines:
        if not line.strip():
            break
        cells, position = [], 0
        for width in widths:
            cells.append(line[position:position + width].strip())
            position += width + 2
        row = dict(zip(names, cells, strict=True))
        rows[(row["MODEL"], row["VERSION"])] = row
    return rows


def test_models_shows_each_versions_dtype_from_the_builder_or_the_signature(
    listing_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = table_rows(models(listing_server, capsys))
    assert rows[(SOFTMAX, "1")]["DTYPE"] == "float32"
    assert rows[(f"{SOFTMAX}_fp16", "1")]["DTYPE"] == "float16"
    assert rows[("multi_io", "1")]["DTYPE"] == "FP32,INT8"  # not builder-made: the input datatypes
    assert (rows[("mixed_versions", "1")]["DTYPE"], rows[("mixed_versions", "2")]["DTYPE"]) == ("FP32", "FP16")
    assert rows[("unbatched", "1")]["DTYPE"] == "FP64"
    assert (rows[("broken", "1")]["STATE"], rows[("broken", "1")]["DTYPE"]) == ("UNAVAILABLE", "-")

    listed = {(row["name"], row["version"]): row for row in json.loads(models(listing_server, capsys, "--json"))}
    assert listed[(SOFTMAX, "1")]["dtype"] == "float32"
    assert listed[(f"{SOFTMAX}_fp16", "1")]["dtype"] == "float16"
    assert listed[("multi_io", "1")]["dtype"] == "FP32,INT8"
    assert [listed[("mixed_versions", v)]["dtype"] for v in ("1", "2")] == ["FP32", "FP16"]
    assert listed[("broken", "1")]["dtype"] is None


def test_models_json_facts_are_those_of_each_version_not_of_the_newest(
    listing_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = {(row["name"], row["version"]): row for row in json.loads(models(listing_server, capsys, "--json"))}
    # scale_model's one initializer: a single weight, whatever the dtype; 4 bytes in FP32, 2 in FP16.
    assert [listed[("mixed_versions", v)]["weight_bytes"] for v in ("1", "2")] == [4, 2]


def test_models_shows_the_batching_delay_mode(
    listing_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = table_rows(models(listing_server, capsys))
    assert rows[("multi_io", "1")]["BATCHING"].startswith("on: delay 100us (fixed)")
    assert rows[(SOFTMAX, "1")]["BATCHING"].startswith("on: delay 100us (adaptive)")  # the server's default mode
    listed = {(row["name"], row["version"]): row for row in json.loads(models(listing_server, capsys, "--json"))}
    assert (listed[("multi_io", "1")]["delay_mode"], listed[(SOFTMAX, "1")]["delay_mode"]) == ("fixed", "adaptive")


def test_models_without_batching_show_off_and_no_delay_mode(
    listing_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = table_rows(models(listing_server, capsys))
    assert rows[("unbatched", "1")]["BATCHING"] == "off"
    listed = {(row["name"], row["version"]): row for row in json.loads(models(listing_server, capsys, "--json"))}
    assert (listed[("unbatched", "1")]["dynamic_batching"], listed[("unbatched", "1")]["delay_mode"]) == (False, None)

