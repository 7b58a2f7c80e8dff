"""`nnserve infer | models | bench` run as the user runs them (`python -m nnserve` subprocesses) against the real
server: their tables, their JSON, and their exit codes (0 ok, 1 server/request error, 2 usage error).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nnserve.builder import build, load_spec
from nnserve.builder.reference import forward
from tests.conftest import RunningServer, ServeProcess, held_port, serve_process

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOFTMAX = "two_layer_softmax"


def nnserve(*args: str, url: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `nnserve` command; `url` goes through NNSERVE_URL, the way scripts and containers set it."""
    env = {key: value for key, value in os.environ.items() if key != "NNSERVE_URL"}
    if url is not None:
        env["NNSERVE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "nnserve", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def softmax(x: list[list[float]]) -> np.ndarray:
    return forward(load_spec(EXAMPLES / "001_two_layer_softmax.json"), np.asarray(x))


# -- infer -----------------------------------------------------------------------------------------------------


def test_infer_prints_a_table_of_the_outputs(server: RunningServer) -> None:
    done = nnserve("infer", SOFTMAX, "--url", server.address, "--data", "[[1.5, -0.5], [0, 1]]")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("probabilities  FP32  shape [2, 2]")
    assert lines[1].split() == ["row", "[0]", "[1]"]
    want = softmax([[1.5, -0.5], [0, 1]])
    for row, line in zip(want, lines[3:5], strict=True):
        np.testing.assert_allclose([float(v) for v in line.split()[1:]], row, rtol=1e-5)


def test_infer_json_output_takes_the_url_from_the_environment(server: RunningServer) -> None:
    done = nnserve("infer", SOFTMAX, "--data", "[1.5, -0.5]", "--json", "--version", "1", url=server.address)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert (reply["model_name"], reply["model_version"]) == (SOFTMAX, "1")
    output = reply["outputs"]["probabilities"]
    assert (output["datatype"], output["shape"]) == ("FP32", [1, 2])  # one row: the batch dimension was added
    np.testing.assert_allclose(output["data"], softmax([[1.5, -0.5]]), rtol=1e-5)


def test_infer_reads_npy_and_json_files_and_casts_to_the_models_datatypes(
    server: RunningServer, tmp_path: Path
) -> None:
    x = np.array([[1.5, -0.5], [-2.0, 3.0]])  # float64 on disk; the model takes FP32
    np.save(tmp_path / "x.npy", x)
    from_npy = nnserve("infer", SOFTMAX, "--file", str(tmp_path / "x.npy"), "--input", "input", "--json",
                       url=server.address)  # fmt: skip
    assert from_npy.returncode == 0, from_npy.stderr
    np.testing.assert_allclose(json.loads(from_npy.stdout)["outputs"]["probabilities"]["data"], softmax(x), rtol=1e-5)
    (tmp_path / "multi.json").write_text(json.dumps({"a": [[0.5, 1, -2]], "b": [[1, -2, 127]]}))
    multi = nnserve("infer", "multi_io", "--file", str(tmp_path / "multi.json"), "--output", "doubled", "--json",
                    url=server.address)  # fmt: skip
    assert multi.returncode == 0, multi.stderr
    outputs = json.loads(multi.stdout)["outputs"]
    assert list(outputs) == ["doubled"]
    assert outputs["doubled"] == {"datatype": "INT64", "shape": [1, 3], "data": [[2, -4, 254]]}


def test_infer_exit_codes_separate_server_errors_from_usage_errors(server: RunningServer, tmp_path: Path) -> None:
    unknown = nnserve("infer", "no_such_model", "--data", "[[1, 2]]", url=server.address)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    assert "no_such_model" in unknown.stderr
    wrong_shape = nnserve("infer", SOFTMAX, "--data", "[[1, 2, 3]]", url=server.address)
    assert wrong_shape.returncode == 1
    assert "INVALID_ARGUMENT" in wrong_shape.stderr
    with held_port() as port:
        unreachable = nnserve("infer", SOFTMAX, "--data", "[[1, 2]]", "--timeout", "3", url=f"127.0.0.1:{port}")
    assert unreachable.returncode == 1
    assert "UNAVAILABLE" in unreachable.stderr
    bad_json = nnserve("infer", SOFTMAX, "--data", "[[1, 2", url=server.address)
    assert bad_json.returncode == 2
    assert "invalid JSON" in bad_json.stderr
    assert nnserve("infer", SOFTMAX, url=server.address).returncode == 2  # neither --data nor --file
    missing = nnserve("infer", SOFTMAX, "--file", str(tmp_path / "missing.npy"), url=server.address)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
    multi = nnserve("infer", "multi_io", "--data", "[[1, 2, 3]]", url=server.address)
    assert multi.returncode == 2
    assert "--input NAME" in multi.stderr


# -- models ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A server where one model loads and one (a corrupt file) does not, so listings must tolerate both."""
    repository = tmp_path_factory.mktemp("mixed")
    build(EXAMPLES / "001_two_layer_softmax.json", repository)
    broken = repository / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    log = tmp_path_factory.mktemp("logs") / "mixed.log"
    with serve_process(repository, log, "--strict-readiness", "false", "--device", "cpu") as running:
        yield running
        running.terminate()


def test_models_lists_versions_state_provider_size_and_batching(mixed_server: ServeProcess) -> None:
    done = nnserve("models", "--url", mixed_server.address)
    assert done.returncode == 0, done.stderr
    header, _rule, *rows = done.stdout.splitlines()
    assert header.split()[:5] == ["MODEL", "VERSION", "STATE", "PROVIDER", "PARAMS"]
    by_name = {row.split()[0]: row for row in rows}
    assert by_name.keys() == {"broken", SOFTMAX}
    assert by_name[SOFTMAX].split()[1:5] == ["1", "READY", "CPUExecutionProvider", "17"]
    assert "on: delay" in by_name[SOFTMAX]
    assert "UNAVAILABLE" in by_name["broken"]


def test_models_json_has_one_entry_per_version_with_missing_fields_as_null(mixed_server: ServeProcess) -> None:
    done = nnserve("models", "--json", url=mixed_server.address)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    ready = rows[SOFTMAX]
    assert (ready["version"], ready["state"], ready["parameter_count"]) == ("1", "READY", 17)
    assert ready["provider"] == "CPUExecutionProvider"
    assert ready["dynamic_batching"] is True
    assert ready["max_batch_size"] > 0
    broken = rows["broken"]
    assert broken["state"] == "UNAVAILABLE"
    assert broken["reason"]
    assert broken["provider"] is None
    assert broken["parameter_count"] is None


def test_models_against_no_server_exits_1() -> None:
    with held_port() as port:
        done = nnserve("models", "--timeout", "3", url=f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


# -- bench -----------------------------------------------------------------------------------------------------


def test_bench_json_reports_each_level_with_the_server_side_split(server: RunningServer) -> None:
    done = nnserve(
        "bench", SOFTMAX, "--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.1", "--batch-rows", "2",
        "--json", url=server.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["model"], report["batch_rows"]) == (SOFTMAX, 2)
    assert [level["concurrency"] for level in report["levels"]] == [1, 4]
    for level in report["levels"]:
        assert level["requests"] > 0
        assert level["errors"] == {}
        assert level["rows"] == 2 * level["requests"]
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] <= level["max_ms"]
        server_side = level["server"]
        assert server_side["requests"] == level["requests"]  # the statistics delta saw exactly our requests
        assert 0 < server_side["compute_infer_ms"] <= server_side["request_ms"]
        assert server_side["queue_ms"] >= 0
    assert "concurrency 4:" in done.stderr


def test_bench_stops_at_max_requests_and_prints_a_table(server: RunningServer) -> None:
    done = nnserve(
        "bench", SOFTMAX, "--concurrency", "1,8", "--duration", "30", "--warmup", "0", "--max-requests", "5",
        url=server.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header, _rule, one, eight = done.stdout.splitlines()
    assert header.split()[:4] == ["CONC", "REQ/S", "ROWS/S", "P50"]
    assert "P99 MS" in header
    assert "QUEUE MS" in header
    assert one.split()[0] == "1"
    assert eight.split()[0] == "8"
    assert "concurrency 1: 5 requests" in done.stderr
    assert "concurrency 8: 5 requests" in done.stderr


def test_bench_plot_needs_matplotlib_or_writes_the_figure(server: RunningServer, tmp_path: Path) -> None:
    figure = tmp_path / "bench.png"
    done = nnserve(
        "bench", SOFTMAX, "--concurrency", "1,2", "--duration", "0.2", "--warmup", "0", "--plot", str(figure),
        url=server.address,
    )  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        assert done.returncode == 2
        assert "matplotlib" in done.stderr
        assert not figure.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert figure.read_bytes().startswith(b"\x89PNG")


def test_bench_exit_codes(server: RunningServer) -> None:
    unknown = nnserve("bench", "no_such_model", "--duration", "0.1", "--warmup", "0", url=server.address)
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    assert nnserve("bench", SOFTMAX, "--concurrency", "0", url=server.address).returncode == 2
    assert nnserve("bench", SOFTMAX, "--concurrency", "1,x", url=server.address).returncode == 2
