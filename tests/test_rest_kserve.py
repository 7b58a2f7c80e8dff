"""nnserve's REST protocol judged by KServe's own code: its v2 pydantic data models and its InferenceRESTClient.

nnserve's raw response bodies (fetched here with urllib, so nothing of nnserve's or kserve's client shapes them) go
through `kserve.protocol.rest.v2_datamodels` (ServerMetadataResponse, ServerLiveResponse, ServerReadyResponse,
ModelMetadataResponse, ModelReadyResponse, InferenceResponse), strictly: a field of the wrong JSON type fails even
where pydantic would coerce it. kserve's `InferenceRESTClient` (protocol v2) then checks readiness and runs inference,
and its outputs are compared with independent numpy forward passes. kserve has no data model for the v2 error body;
the error test checks it has the spec's shape (`inference_error_response`: `{"error": message}`, as kserve's own server
writes it) and that kserve's client reads the message out of it.

kserve's InferenceResponse makes `id` required (`id: str`), while its own OpenAPI document
(docs/predict-api/v2/rest_predict_v2.yaml) requires only `model_name` and `outputs`; nnserve, like Triton, leaves `id`
out when the request had none. The `*-infer-without-id` cases show which of the two readings nnserve's body meets.

kserve runs in an environment of its own (tests/client_envs.py, tests/kserve_requirements.txt), made on first use,
through tests/kserve_probe.py; this module computes every expectation and asserts everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnserve
from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from tests.client_envs import PIP_TIMEOUT_S, client_python
from tests.conftest import EXAMPLES, RunningServer, dense_reference, running_server

# The first test waits for the kserve environment to be made (minutes on a cold pip cache; PIP_TIMEOUT_S bounds it).
pytestmark = pytest.mark.timeout(int(PIP_TIMEOUT_S) + 300)

HERE = Path(__file__).resolve().parent
PROBE = HERE / "kserve_probe.py"
REQUIREMENTS = HERE / "kserve_requirements.txt"
PROBE_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 30.0
VERSION = "1"
DATATYPES = {np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
             np.dtype(np.int8): "INT8", np.dtype(np.int64): "INT64"}
NUMPY = {name: dtype for dtype, name in DATATYPES.items()}


# -- the models, their inputs and independent expectations ---------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A model of the standard repository with one batch of inputs and what numpy says its outputs are."""

    name: str
    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    """Per output, in float64 where the model computes in FP32 (so a tolerance applies), else in its own dtype."""
    datatypes: Mapping[str, str]
    """Per output, the datatype the server must answer with."""
    rtol: float = 0.0
    atol: float = 0.0
    binary_inputs: bool = False
    """kserve's client refuses FP16 as JSON ("Sending FP16 data via JSON is not supported"), so FP16 goes as bytes."""
    metadata: Mapping[str, Any] = field(default_factory=dict)


X_SOFTMAX = np.array([[1.5, -0.5], [0.0, 1.0], [-2.0, 3.0]], dtype=np.float32)
A = np.array([[0.5, 1.5, -2.0], [3.25, 0.0, -0.125]], dtype=np.float32)
B = np.array([[1, -2, 100], [-128, 127, 0]], dtype=np.int8)
X_FP16 = np.array([[0.5, -1.25, 3.0, 1024.0], [-0.0, 2.5, -7.75, 0.125]], dtype=np.float16)
X_FP64 = np.array([[0.1, -1e-300, 2.5e200, 7.0], [-3.0, 0.0, 1.0 / 3.0, -0.5]], dtype=np.float64)
X_DENSE = np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def _tensors(inputs: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> list[dict[str, Any]]:
    return [{"name": n, "datatype": DATATYPES[a.dtype], "shape": [-1, *shape]} for n, a in inputs.items()]


MODELS = {
    m.name: m for m in (
        Model("two_layer_softmax", {"input": X_SOFTMAX},
              {"probabilities": forward(load_spec(EXAMPLES / "001_two_layer_softmax.json"), X_SOFTMAX)},
              {"probabilities": "FP32"}, rtol=1e-5, atol=1e-6,
              metadata={"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}],
                        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]}),
        Model("multi_io", {"a": A, "b": B},
              {"sum": A.astype(np.float64) + B.astype(np.float64), "doubled": 2 * B.astype(np.int64)},
              {"sum": "FP32", "doubled": "INT64"},
              metadata={"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "b", "datatype": "INT8", "shape": [-1, 3]}],
                        "outputs": [{"name": "sum", "datatype": "FP32", "shape": [-1, 3]},
                                    {"name": "doubled", "datatype": "INT64", "shape": [-1, 3]}]}),
        Model("fp16", {"x": X_FP16}, {"y": X_FP16 * np.float16(2.0)}, {"y": "FP16"}, binary_inputs=True,
              metadata={"inputs": _tensors({"x": X_FP16}, (4,)), "outputs": _tensors({"y": X_FP16}, (4,))}),
        Model("fp64", {"x": X_FP64}, {"y": X_FP64 * -3.0}, {"y": "FP64"},
              metadata={"inputs": _tensors({"x": X_FP64}, (4,)), "outputs": _tensors({"y": X_FP64}, (4,))}),
        Model("dense", {"input": X_DENSE}, {"output": dense_reference(X_DENSE)}, {"output": "FP32"},
              rtol=1e-5, atol=1e-6),
    )
}
SCHEMA_MODELS = ("two_layer_softmax", "multi_io", "fp16", "fp64")


def json_request(model: Model, request_id: str | None, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A v2 JSON infer request, written out by hand (no client library shapes it)."""
    body: dict[str, Any] = {
        "inputs": [{"name": n, "shape": list(a.shape), "datatype": DATATYPES[a.dtype], "data": a.reshape(-1).tolist()}
                   for n, a in model.inputs.items()],
        "outputs": [{"name": n} for n in model.expected],
    }
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = dict(parameters)
    return body


def assert_outputs(model: Model, outputs: Mapping[str, np.ndarray]) -> None:
    assert sorted(outputs) == sorted(model.expected)
    for name, want in model.expected.items():
        got = outputs[name]
        assert got.shape == want.shape, name
        if model.rtol or model.atol:
            np.testing.assert_allclose(got, want, rtol=model.rtol, atol=model.atol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=name)


# -- the server, raw HTTP and the probe --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(standard_repo: Path) -> Iterator[RunningServer]:
    with running_server(standard_repo, http_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(http_server: RunningServer) -> str:
    assert http_server.app.http_port is not None
    return f"http://127.0.0.1:{http_server.app.http_port}"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever *_proxy says


@dataclass(frozen=True)
class Raw:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(base: str, method: str, path: str, body: Mapping[str, Any] | None = None) -> Raw:
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with _DIRECT.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return Raw(response.status, response.headers.get("Content-Type", ""), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Raw(exc.code, exc.headers.get("Content-Type", ""), exc.read())


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    return client_python("kserve", REQUIREMENTS)


def run_probe(python: Path, base: str, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the ops in kserve's environment (isolated: no PYTHONPATH, no user site, no proxies) and read the results."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run([str(python), "-I", str(PROBE)], input=json.dumps({"base_url": base, "ops": ops}),
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False)
    assert proc.returncode == 0, f"kserve_probe.py failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    assert len(results) == len(ops)
    return results


# -- schema cases: every body, validated by kserve's pydantic models ---------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    schema: str
    method: str
    path: str
    body: Mapping[str, Any] | None = None
    status: int = 200


def _cases() -> list[Case]:
    cases = [
        Case("server-metadata", "ServerMetadataResponse", "GET", "/v2"),
        Case("health-live", "ServerLiveResponse", "GET", "/v2/health/live"),
        Case("health-ready", "ServerReadyResponse", "GET", "/v2/health/ready"),
    ]
    for name in SCHEMA_MODELS:
        model = MODELS[name]
        base, versioned = f"/v2/models/{name}", f"/v2/models/{name}/versions/{VERSION}"
        cases += [
            Case(f"{name}-metadata", "ModelMetadataResponse", "GET", base),
            Case(f"{name}-metadata-version", "ModelMetadataResponse", "GET", versioned),
            Case(f"{name}-ready", "ModelReadyResponse", "GET", f"{base}/ready"),
            Case(f"{name}-ready-version", "ModelReadyResponse", "GET", f"{versioned}/ready"),
            Case(f"{name}-infer", "InferenceResponse", "POST", f"{base}/infer", json_request(model, f"raw-{name}")),
            Case(f"{name}-infer-version", "InferenceResponse", "POST", f"{versioned}/infer",
                 json_request(model, f"raw-{name}-v")),
            Case(f"{name}-infer-without-id", "InferenceResponse", "POST", f"{base}/infer", json_request(model, None)),
        ]
    cases.append(Case("multi_io-infer-timing-parameters", "InferenceResponse", "POST", "/v2/models/multi_io/infer",
                      json_request(MODELS["multi_io"], "raw-timing", {"nnserve.timing": True})))
    return cases


CASES = _cases()


@dataclass(frozen=True)
class Validated:
    raw: Raw
    strict_error: str | None
    lax_error: str | None


@pytest.fixture(scope="module")
def validated(kserve_python: Path, base_url: str) -> dict[str, Validated]:
    """Every case's raw body, fetched here, and kserve's verdict on it (one probe run for all of them)."""
    raws = {case.id: fetch(base_url, case.method, case.path, case.body) for case in CASES}
    ops = [{"op": "validate", "schema": case.schema, "body": raws[case.id].body.decode("utf-8", "replace")}
           for case in CASES]
    results = run_probe(kserve_python, base_url, ops)
    return {case.id: Validated(raws[case.id], r["strict_error"], r["lax_error"])
            for case, r in zip(CASES, results, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rest_body_validates_against_kserve_v2_datamodels(case: Case, validated: dict[str, Validated]) -> None:
    result = validated[case.id]
    body = result.raw.body.decode("utf-8", "replace")
    assert result.raw.status == case.status, f"{case.method} {case.path}: {result.raw.status} {body}"
    assert result.raw.content_type.startswith("application/json"), result.raw.content_type
    if result.strict_error is not None:
        pytest.fail(f"{case.method} {case.path}: nnserve's body fails kserve's {case.schema}\nbody: {body}\n"
                    f"pydantic (strict): {result.strict_error}\npydantic (lax, kserve's own server mode): "
                    f"{result.lax_error or 'passes'}", pytrace=False)


def test_raw_server_metadata_and_health_bodies_say_nnserve_live_and_ready(validated: dict[str, Validated]) -> None:
    metadata = validated["server-metadata"].raw.json()
    assert metadata["name"] == "nnserve"
    assert metadata["version"] == nnserve.__version__
    assert "statistics" in metadata["extensions"]
    assert validated["health-live"].raw.json() == {"live": True}
    assert validated["health-ready"].raw.json() == {"ready": True}


@pytest.mark.parametrize("name", SCHEMA_MODELS)
def test_raw_model_metadata_and_ready_bodies_describe_the_served_model(
    name: str, validated: dict[str, Validated],
) -> None:
    model = MODELS[name]
    for suffix in ("metadata", "metadata-version"):
        metadata = validated[f"{name}-{suffix}"].raw.json()
        assert metadata["name"] == name
        assert metadata["versions"] == [VERSION]
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == model.metadata["inputs"]
        assert metadata["outputs"] == model.metadata["outputs"]
    for suffix in ("ready", "ready-version"):
        assert validated[f"{name}-{suffix}"].raw.json() == {"name": name, "ready": True}


@pytest.mark.parametrize("name", SCHEMA_MODELS)
def test_raw_infer_body_echoes_the_id_and_carries_the_reference_outputs(
    name: str, validated: dict[str, Validated],
) -> None:
    model = MODELS[name]
    for suffix, request_id in (("infer", f"raw-{name}"), ("infer-version", f"raw-{name}-v"),
                               ("infer-without-id", "")):  # no id asked for: "" (kserve requires the field)
        document = validated[f"{name}-{suffix}"].raw.json()
        assert document["model_name"] == name
        assert document["model_version"] == VERSION
        assert document.get("id") == request_id
        outputs = {}
        for output in document["outputs"]:
            assert output["datatype"] == model.datatypes[output["name"]]
            outputs[output["name"]] = np.asarray(output["data"], dtype=NUMPY[output["datatype"]]).reshape(
                output["shape"])
        assert_outputs(model, outputs)


def test_raw_timing_parameters_are_flat_scalars(validated: dict[str, Validated]) -> None:
    parameters = validated["multi_io-infer-timing-parameters"].raw.json()["parameters"]
    assert parameters["nnserve.total_us"] >= parameters["nnserve.compute_us"] >= 0
    assert all(isinstance(v, int | float | str | bool) for v in parameters.values()), parameters


# -- kserve's InferenceRESTClient ------------------------------------------------------------------------------------


def infer_op(key: str, model: Model, request_id: str, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "op": "infer", "key": key, "model": model.name, "id": request_id, "parameters": dict(parameters or {}),
        "inputs": [{"name": n, "datatype": DATATYPES[a.dtype], "numpy": str(a.dtype), "shape": list(a.shape),
                    "data": a.tolist(), "binary": model.binary_inputs} for n, a in model.inputs.items()],
        "outputs": list(model.expected),
    }


WRONG = Model("two_layer_softmax", {"input": np.zeros((2, 3), dtype=np.float32)}, {}, {})
"""Three values a row where the model takes two: nnserve answers 400."""
UNKNOWN = Model("no_such_model", {"input": X_SOFTMAX}, {}, {})


def _client_ops() -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = [{"op": "server_live", "key": "live"}, {"op": "server_ready", "key": "ready"}]
    ops += [{"op": "model_ready", "key": f"ready-{name}", "model": name} for name in [*MODELS, "no_such_model"]]
    ops += [infer_op(f"infer-{name}", model, f"kserve-{name}-1") for name, model in MODELS.items()]
    ops.append(infer_op("infer-binary-outputs", MODELS["multi_io"], "kserve-binary", {"binary_data_output": True}))
    ops.append(infer_op("infer-wrong-shape", WRONG, "kserve-wrong-shape"))
    ops.append(infer_op("infer-unknown-model", UNKNOWN, "kserve-unknown"))
    return ops


CLIENT_OPS = _client_ops()


@pytest.fixture(scope="module")
def client_results(kserve_python: Path, base_url: str) -> dict[str, dict[str, Any]]:
    results = run_probe(kserve_python, base_url, CLIENT_OPS)
    return {op["key"]: result for op, result in zip(CLIENT_OPS, results, strict=True)}


def test_kserve_client_sees_the_server_live_and_ready(client_results: dict[str, dict[str, Any]]) -> None:
    assert client_results["live"]["value"] is True
    assert client_results["ready"]["value"] is True


def test_kserve_client_model_ready_is_true_for_served_models_and_false_for_unknown_ones(
    client_results: dict[str, dict[str, Any]],
) -> None:
    assert {name: client_results[f"ready-{name}"]["value"] for name in MODELS} == dict.fromkeys(MODELS, True)
    assert client_results["ready-no_such_model"]["value"] is False


def client_outputs(result: Mapping[str, Any], model: Model) -> dict[str, np.ndarray]:
    assert result["error"] is None, result
    outputs = {}
    for output in result["outputs"]:
        assert output["datatype"] == model.datatypes[output["name"]]
        assert output["shape"] == list(model.expected[output["name"]].shape)
        outputs[output["name"]] = np.asarray(output["data"], dtype=NUMPY[output["datatype"]]).reshape(output["shape"])
    return outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_kserve_client_infer_matches_numpy_and_echoes_the_request_id(
    name: str, client_results: dict[str, dict[str, Any]],
) -> None:
    model = MODELS[name]
    result = client_results[f"infer-{name}"]
    outputs = client_outputs(result, model)
    assert result["id"] == f"kserve-{name}-1"
    assert result["model_name"] == name
    assert result["content_type"].startswith("application/json")
    assert all(not (o["parameters"] or {}).get("binary_data_size") for o in result["outputs"])
    assert_outputs(model, outputs)


def test_kserve_client_reads_binary_outputs_after_the_json_header(client_results: dict[str, dict[str, Any]]) -> None:
    model = MODELS["multi_io"]
    result = client_results["infer-binary-outputs"]
    outputs = client_outputs(result, model)
    assert result["id"] == "kserve-binary"
    assert result["content_type"] == "application/octet-stream"  # binary tails followed the JSON header
    assert_outputs(model, outputs)  # kserve cut the tails at the JSON header's length and binary_data_size


def test_kserve_client_reports_nnserves_error_status_and_message(
    client_results: dict[str, dict[str, Any]], base_url: str,
) -> None:
    """The error body has the shape kserve's own server writes (`{"error": message}`, application/json), so kserve's
    client puts nnserve's message into its HTTPStatusError."""
    wrong = fetch(base_url, "POST", "/v2/models/two_layer_softmax/infer", json_request(WRONG, "raw-wrong-shape"))
    unknown = fetch(base_url, "POST", "/v2/models/no_such_model/infer", json_request(UNKNOWN, "raw-unknown"))
    for raw, key, status in ((wrong, "infer-wrong-shape", 400), (unknown, "infer-unknown-model", 404)):
        assert raw.status == status
        assert raw.content_type == "application/json"
        document = raw.json()
        assert list(document) == ["error"]
        assert isinstance(document["error"], str)
        assert document["error"]
        result = client_results[key]
        assert result["error"] == "HTTPStatusError", result
        assert result["status"] == status
        assert document["error"] in result["message"], result["message"]
