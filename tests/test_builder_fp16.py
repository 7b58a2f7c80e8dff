"""`nnserve build --fp16`: the summary says float16, and the fp16 model gets its own name (`<name>_fp16`) so the
float32 model keeps serving float32 clients; `--name` and `--version` place it explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from nnserve.builder.repository import existing_versions
from nnserve.cli import main
from nnserve.client import InferenceClient
from tests.conftest import EXAMPLES, running_server

SPEC = EXAMPLES / "001_two_layer_softmax.json"
NAME = "two_layer_softmax"


def nnserve_build(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["build", *args])
    out, err = capsys.readouterr()
    return code, out, err


def stored_dtype(path: Path) -> int:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type


def test_fp16_summary_says_float16_in_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16")
    assert code == 0, err
    assert out.startswith(f'Model "{NAME}" (float16, input "input", output "probabilities")')
    assert f"Wrote {tmp_path / (NAME + '_fp16') / '1' / 'model.onnx'} (version 1, float16," in out
    assert stored_dtype(tmp_path / f"{NAME}_fp16" / "1" / "model.onnx") == onnx.TensorProto.FLOAT16

    code, out, err = nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert (record["dtype"], record["stored_dtype"], record["model"], record["version"]) == (
        "float16", "float16", f"{NAME}_fp16", 2)
    code, out, err = nnserve_build(capsys, str(SPEC), "--fp16", "--summary-only", "--json")
    assert (code, json.loads(out)["dtype"]) == (0, "float16")


def test_fp16_build_gets_its_own_model_and_float32_clients_keep_working(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's Building section, in order: the float32 examples, then the same network with --fp16."""
    assert nnserve_build(capsys, str(SPEC), "-r", str(tmp_path))[0] == 0
    assert nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16")[0] == 0
    assert (existing_versions(tmp_path / NAME), existing_versions(tmp_path / f"{NAME}_fp16")) == ([1], [1])
    x = np.array([[1.5, -0.5], [0.0, 1.0]])
    expected = forward(load_spec(SPEC), x)
    with running_server(tmp_path, device="cpu") as server, InferenceClient(server.address) as client:
        np.testing.assert_allclose(client.infer(NAME, x.astype(np.float32)), expected, rtol=1e-5)
        np.testing.assert_allclose(client.infer(NAME, x.astype(np.float32), version=1), expected, rtol=1e-5)
        half = client.infer(f"{NAME}_fp16", x.astype(np.float16))
        assert half.dtype == np.float16
        np.testing.assert_allclose(half.astype(np.float64), expected, atol=2e-3)  # 2e-2 relative, outputs <= 1


def test_fp16_with_name_or_version_goes_exactly_where_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert nnserve_build(capsys, str(SPEC), "-r", str(tmp_path))[0] == 0
    assert nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16", "--name", "half")[0] == 0
    assert stored_dtype(tmp_path / "half" / "1" / "model.onnx") == onnx.TensorProto.FLOAT16
    # --version without --name: a version of the spec's own model, on purpose.
    assert nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16", "--version", "2")[0] == 0
    assert stored_dtype(tmp_path / NAME / "2" / "model.onnx") == onnx.TensorProto.FLOAT16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", NAME]
    code, _out, err = nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--fp16", "--version", "1")
    assert code == 1
    assert "already exists" in err  # never overwrites the float32 version 1


def test_skip_unchanged_compares_with_the_model_the_build_writes_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(*args: str) -> dict:
        code, out, err = nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--skip-unchanged", "--json", *args)
        assert code == 0, err
        return json.loads(out)

    assert (build()["version"], build()["skipped_unchanged"]) == (1, True)
    first = build("--fp16")
    assert (first["model"], first["version"], first["skipped_unchanged"]) == (f"{NAME}_fp16", 1, False)
    again = build("--fp16")
    assert (again["model"], again["version"], again["skipped_unchanged"]) == (f"{NAME}_fp16", 1, True)
    # With --version: the named version is compared; the float32 version 1 does not hold the fp16 network.
    assert build("--version", "1")["skipped_unchanged"] is True
    code, _out, err = nnserve_build(capsys, str(SPEC), "-r", str(tmp_path), "--skip-unchanged", "--fp16",
                                    "--version", "1")
    assert (code, "already exists" in err) == (1, True)
    assert (existing_versions(tmp_path / NAME), existing_versions(tmp_path / f"{NAME}_fp16")) == ([1], [1])
