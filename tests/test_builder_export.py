"""Export, verification and repository writes: what lands on disk is a checked, servable model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nnserve import __version__
from nnserve.builder import build, load_spec, parse_spec
from nnserve.builder.export import IR_VERSION, OPSET, export_onnx
from nnserve.builder.random_mlp import parse_widths, random_mlp
from nnserve.builder.reference import forward
from nnserve.builder.repository import existing_versions
from nnserve.builder.verify import VerificationError, verify_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ACTIVATIONS = ["linear", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "softmax"]


def small_net(activation: str, dtype: str = "float32") -> dict:
    rng = np.random.default_rng(1)
    return {
        "name": f"net_{activation}",
        "input_size": 5,
        "dtype": dtype,
        "layers": [
            {
                "weights": rng.standard_normal((4, 5)).tolist(),
                "bias": rng.standard_normal(4).tolist(),
                "activation": activation,
            },
            {
                "weights": rng.standard_normal((3, 4)).tolist(),
                "bias": rng.standard_normal(3).tolist(),
                "activation": activation,
            },
        ],
    }


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_exports_and_matches_numpy(activation: str, tmp_path: Path) -> None:
    result = build(small_net(activation), tmp_path)
    x = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32)
    (y,) = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(y, forward(result.spec, x), rtol=1e-5, atol=1e-5)


def test_exported_graph_is_plain_checked_and_pinned(tmp_path: Path) -> None:
    result = build(EXAMPLES / "001_two_layer_softmax.json", tmp_path)
    model = onnx.load(str(result.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Softmax"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 2
    assert model.graph.output[0].name == "probabilities"


def test_metadata_records_parameters_hash_and_builder_version(tmp_path: Path) -> None:
    result = build(EXAMPLES / "000_layer_4x3.json", tmp_path)
    props = {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    assert props["nnserve.parameter_count"] == "15"
    assert props["nnserve.weight_bytes"] == "60"
    assert props["nnserve.builder_version"] == __version__
    assert props["nnserve.spec_sha256"] == load_spec(EXAMPLES / "000_layer_4x3.json").spec_sha256
    assert json.loads(props["nnserve.layers"])[0]["activation"] == "relu"


def test_spec_hash_ignores_formatting_but_not_weights() -> None:
    a = parse_spec(small_net("relu"))
    b = parse_spec(json.loads(json.dumps(small_net("relu"), indent=4)))
    changed = small_net("relu")
    changed["layers"][0]["bias"][0] += 1e-3
    assert a.spec_sha256 == b.spec_sha256
    assert parse_spec(changed).spec_sha256 != a.spec_sha256


def test_fp16_export_stores_half_precision_and_still_verifies(tmp_path: Path) -> None:
    result = build(small_net("gelu"), tmp_path, fp16=True)
    model = onnx.load(str(result.model_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert result.verification is not None
    assert result.verification.max_abs_error <= result.verification.tolerance


def test_float64_spec_exports_double_precision(tmp_path: Path) -> None:
    result = build(small_net("tanh", dtype="float64"), tmp_path)
    x = np.random.default_rng(3).standard_normal((2, 5))
    (y,) = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, forward(result.spec, x), rtol=1e-12)


def test_verification_catches_a_model_that_computes_something_else(tmp_path: Path) -> None:
    spec = parse_spec(small_net("relu"))
    wrong = parse_spec(small_net("sigmoid"))
    path = tmp_path / "model.onnx"
    path.write_bytes(export_onnx(wrong).SerializeToString())
    with pytest.raises(VerificationError, match="differs from the numpy forward pass"):
        verify_model(path, spec, "float32")


def test_versions_count_up_and_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    first = build(small_net("relu"), tmp_path, name="m")
    second = build(small_net("relu"), tmp_path, name="m")
    assert (first.version, second.version) == (1, 2)
    explicit = build(small_net("relu"), tmp_path, name="m", version=7)
    assert explicit.version == 7
    with pytest.raises(Exception, match="already exists"):
        build(small_net("relu"), tmp_path, name="m", version=7)
    assert existing_versions(tmp_path / "m") == [1, 2, 7]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_default_serving_config_is_written_once_and_never_replaced(tmp_path: Path) -> None:
    build(small_net("relu"), tmp_path, name="m")
    config = tmp_path / "m" / "config.json"
    assert json.loads(config.read_text())["max_batch_size"] >= 1
    config.write_text('{"max_batch_size": 3}')
    build(small_net("relu"), tmp_path, name="m")
    assert json.loads(config.read_text()) == {"max_batch_size": 3}


def test_large_models_use_external_data(tmp_path: Path) -> None:
    result = build(small_net("relu"), tmp_path, external_data_threshold=1)
    data = result.model_path.parent / "model.onnx.data"
    assert data.exists()
    model = onnx.load(str(result.model_path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = np.ones((1, 5), dtype=np.float32)
    (y,) = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_allclose(y, forward(result.spec, x), atol=1e-5)


def test_random_mlp_widths_give_the_expected_parameter_count() -> None:
    assert parse_widths("1024x4096x4096x1024") == [1024, 4096, 4096, 1024]
    spec = random_mlp([8, 16, 4], name="r", seed=3)
    assert spec.parameter_count == 8 * 16 + 16 + 16 * 4 + 4
    assert [layer.activation for layer in spec.layers] == ["relu", "linear"]
    assert random_mlp([8, 16, 4], name="r", seed=3).spec_sha256 == spec.spec_sha256
    with pytest.raises(ValueError, match="widths"):
        parse_widths("1024")


def nnserve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )


def test_cli_builds_every_example_and_prints_summaries(tmp_path: Path) -> None:
    specs = sorted(str(p) for p in EXAMPLES.glob("*.json"))
    proc = nnserve("build", *specs, "--model-repository", str(tmp_path / "repo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Total parameters:") == len(specs)
    assert "Total parameters: 17" in proc.stdout  # the 2-3-2 network of document 001
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(load_spec(s).name for s in specs)


def test_cli_broken_spec_prints_layer_and_field_and_writes_nothing(tmp_path: Path) -> None:
    good = str(EXAMPLES / "000_layer_4x3.json")
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps(
            {
                "name": "b",
                "input_size": 2,
                "layers": [{"weights": [[1, 2], [3, 4, 5]], "bias": [0, 0], "activation": "relu"}],
            }
        )
    )
    proc = nnserve("build", good, str(broken), "--model-repository", str(tmp_path / "repo"), cwd=tmp_path)
    assert proc.returncode != 0
    assert "layer 0, field 'weights', row 1" in proc.stderr
    assert str(broken) in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_cli_reports_every_problem_of_every_spec_and_writes_nothing(tmp_path: Path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"name": "a", "layers": [{"weights": [0.4, "a"], "bias": 0.1, "activation": "relu"}]}))
    second.write_text(json.dumps({"name": "b", "input_size": 2, "layers": [
        {"weights": [[1, 2]], "bias": [0, 0], "activation": "swish"}]}))
    good = str(EXAMPLES / "000_layer_4x3.json")
    proc = nnserve("build", good, str(first), str(second), "-r", str(tmp_path / "repo"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {first}: field 'input_size': required but missing: the number of input features (a positive integer)",
        f"error: {first}: layer 0, field 'weights', element 1: expected a number, found a string (\"a\")",
        f"error: {second}: layer 0, field 'activation': expected one of "
        "['linear', 'relu', 'sigmoid', 'tanh', 'gelu', 'gelu_tanh', 'softmax'], found 'swish'",
        f"error: {second}: layer 0, field 'bias': expected 1 value (one per neuron), found shape (2,)",
    ]
    assert not (tmp_path / "repo").exists()


def test_cli_json_output_is_machine_readable(tmp_path: Path) -> None:
    proc = nnserve("build", str(EXAMPLES / "002_exercise2.json"), "--json", "-r", str(tmp_path / "repo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["total_parameters"] == 9
    assert record["version"] == 1
    assert [layer["output_shape"] for layer in record["layers"]] == [[None, 2], [None, 1]]


def test_cli_random_25m_parameter_network_builds(tmp_path: Path) -> None:
    proc = nnserve(
        "build", "--random", "1024x4096x4096x1024", "--seed", "0", "--name", "big", "-r", str(tmp_path), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "Total parameters: 25,175,040" in proc.stdout
    assert (tmp_path / "big" / "1" / "model.onnx").stat().st_size > 25_175_040 * 4


def test_cli_subcommands_all_have_help(tmp_path: Path) -> None:
    for command in ["build", "serve", "infer", "models", "bench"]:
        proc = nnserve(command, "--help", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "usage: nnserve" in proc.stdout


def test_skip_unchanged_writes_no_duplicate_version_but_builds_a_changed_network(tmp_path: Path) -> None:
    first = build(small_net("relu"), tmp_path, name="m", skip_unchanged=True)
    again = build(small_net("relu"), tmp_path, name="m", skip_unchanged=True)
    changed = build(small_net("tanh"), tmp_path, name="m", skip_unchanged=True)
    assert (first.version, first.skipped) == (1, False)
    assert (again.version, again.skipped) == (1, True)
    assert (changed.version, changed.skipped) == (2, False)
