"""deploy/kserve: nnserve as a KServe serving runtime.

The manifests are checked the way KServe's admission and runtime selection would read them (required fields, the
container named kserve-container, protocol versions, one container port, priorities unique per model format among
KServe's own runtimes that claim onnx), and read by the `kserve` package's generated models for their kinds (in its
client environment, tests/kserve_probe.py): required fields, types, and no key the schema lacks. Then the server
is started exactly as the runtime's container would be: its command and args with KServe's `{{.Name}}` filled in,
its environment with the downward-API value resolved, a `/mnt/models` folder in each of the three layouts a
storageUri leaves there, the ports moved to free ones the server reports. It is probed as the kubelet probes it,
answers REST and gRPC, and drains on SIGTERM after the preStop delay. tests/test_rest_kserve.py checks the REST
protocol with the `kserve` package itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from nnserve.builder import build
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server.cli import OPTIONS, add_arguments, settings_from
from tests.client_envs import client_python
from tests.conftest import EXAMPLES, infer_request, output_arrays, read_port_file, wait_until
from tests.rest_requests import post_json, v2_input

REPO = Path(__file__).resolve().parents[1]
KSERVE = REPO / "deploy" / "kserve"
RUNTIMES = {path.name: path for path in sorted(KSERVE.glob("*servingruntime*.yaml"))}
SERVICES = {path.name: path for path in sorted(KSERVE.glob("inferenceservice-*.yaml"))}
# What KServe's own runtimes claim for onnx (config/runtimes in KServe's repository): priorities must stay unique.
KSERVE_PROBE = REPO / "tests" / "kserve_probe.py"
KSERVE_REQUIREMENTS = REPO / "tests" / "kserve_requirements.txt"
KSERVE_ONNX_PRIORITIES = {"kserve-tritonserver": 1, "kserve-openvino": 2}
SOFTMAX_X = np.array([[1.5, -0.5]], dtype=np.float32)
SOFTMAX_Y = np.array([[0.5374, 0.4626]])  # document 001: 0.538, 0.463
TERMINATION_GRACE_S = 30  # the pod default that KServe keeps


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def runtime_container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return container


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_runtimes_have_what_kserve_requires_and_selects_on(name: str) -> None:
    runtime = load(RUNTIMES[name])
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] in ("ClusterServingRuntime", "ServingRuntime")
    spec = runtime["spec"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["onnx"]["version"] == "1"
    container = runtime_container(runtime)
    assert container["command"] == ["nnserve", "serve"]
    assert "--model-repository=/mnt/models" in container["args"]
    assert "--model-name={{.Name}}" in container["args"]
    assert len(container["ports"]) == 1, "Knative allows one container port"
    assert container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    annotations = spec["annotations"]
    assert (annotations["prometheus.kserve.io/port"], annotations["prometheus.kserve.io/path"]) == ("8002", "/metrics")
    parsed = settings_from(_parser().parse_args(filled_args(container, "m")), {})
    assert (parsed.http_port, parsed.grpc_port, parsed.metrics_port) == (8080, 9000, 8002)
    known = {option.env for option in OPTIONS}
    assert all(v["name"] in known for v in container.get("env", []) if v["name"].startswith("NNSERVE_"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + parsed.grace_period_s < TERMINATION_GRACE_S


def test_auto_selected_priorities_are_unique_per_format_beside_kserves_own() -> None:
    seen: dict[tuple[str, str], dict[int, str]] = {}
    for runtime_name, priority in KSERVE_ONNX_PRIORITIES.items():
        seen.setdefault(("ClusterServingRuntime", "onnx"), {})[priority] = runtime_name
    for name in RUNTIMES:
        runtime = load(RUNTIMES[name])
        for model_format in runtime["spec"]["supportedModelFormats"]:
            if not model_format.get("autoSelect"):
                continue
            priority = model_format["priority"]
            taken = seen.setdefault((runtime["kind"], model_format["name"]), {})
            assert priority not in taken, f"{name}: {model_format['name']} priority {priority} is {taken[priority]}'s"
            taken[priority] = runtime["metadata"]["name"]
    onnx = seen[("ClusterServingRuntime", "onnx")]
    assert onnx[max(onnx)] == "kserve-nnserve", "nnserve is KServe's choice for onnx v2 where it is installed"


@pytest.mark.parametrize("name", list(SERVICES))
def test_inference_services_ask_for_v2_and_runtimes_that_exist(name: str) -> None:
    service = load(SERVICES[name])
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] in ("v2", "grpc-v2"), "without it KServe looks for a v1 runtime"
    assert re.fullmatch(r"(gs|s3|pvc|https?)://.+", model["storageUri"])
    runtimes = {load(path)["metadata"]["name"] for path in RUNTIMES.values()}
    assert model.get("runtime", "kserve-nnserve") in runtimes
    if model.get("runtime") == "kserve-nnserve-gpu":
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if model["protocolVersion"] == "grpc-v2" and "RawDeployment" not in str(service["metadata"].get("annotations")):
        assert model["ports"] == [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]
        assert model["readinessProbe"]["grpc"] == {"port": 9000, "service": ""}  # the probe follows the one port
        assert model["livenessProbe"]["grpc"] == {"port": 9000, "service": "liveness"}


# -- KServe's own schema: its generated Kubernetes models (the kserve package, in its client environment) -------

GENERATED_MODELS = {"ClusterServingRuntime": "V1alpha1ClusterServingRuntime",
                    "ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}


@pytest.fixture(scope="module")
def schema_results() -> dict[str, dict[str, Any]]:
    """Every manifest read as kserve 0.21's generated model for its kind (tests/kserve_probe.py, one process)."""
    manifests = {**RUNTIMES, **SERVICES}
    documents = {name: load(path) for name, path in manifests.items()}
    ops = [{"op": "manifest", "kind": GENERATED_MODELS[doc["kind"]], "document": doc} for doc in documents.values()]
    python = client_python("kserve", KSERVE_REQUIREMENTS)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run([str(python), "-I", str(KSERVE_PROBE)],
                          input=json.dumps({"base_url": "http://127.0.0.1:9", "ops": ops}),
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return dict(zip(documents, results, strict=True))


@pytest.mark.parametrize("name", [*RUNTIMES, *SERVICES])
def test_manifest_reads_as_kserves_generated_model_with_no_unknown_field(
    schema_results: dict[str, dict[str, Any]], name: str
) -> None:
    """A required field missing or of the wrong type fails kserve's model; a misspelt key (which the API server
    would prune without a word) is a key its schema does not define."""
    result = schema_results[name]
    assert result["error"] is None, result["error"]
    assert result["unknown"] == [], f"keys KServe's schema does not define: {result['unknown']}"


def test_the_schema_check_would_catch_a_misspelt_or_missing_field() -> None:
    """The probe's check is not vacuous: a typo and a missing required field in a copy of the runtime are found."""
    runtime = load(RUNTIMES["clusterservingruntime.yaml"])
    runtime["spec"]["containers"][0]["readinesProbe"] = runtime["spec"]["containers"][0].pop("readinessProbe")
    broken = load(RUNTIMES["clusterservingruntime.yaml"])
    del broken["spec"]["containers"]
    ops = [{"op": "manifest", "kind": "V1alpha1ClusterServingRuntime", "document": d} for d in (runtime, broken)]
    python = client_python("kserve", KSERVE_REQUIREMENTS)
    proc = subprocess.run([str(python), "-I", str(KSERVE_PROBE)],
                          input=json.dumps({"base_url": "http://127.0.0.1:9", "ops": ops}),
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    typo, missing = json.loads(proc.stdout)
    assert typo["unknown"] == ["$.spec.containers[0].readinesProbe"]
    assert "containers" in missing["error"]


# -- the container, run as KServe would run it ------------------------------------------------------------------


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def filled_args(container: dict[str, Any], isvc_name: str) -> list[str]:
    """The container's args with KServe's template values filled in, as its controller does."""
    return [arg.replace("{{.Name}}", isvc_name) for arg in container["args"]]


def run_as_container(container: dict[str, Any], isvc_name: str, mnt_models: Path, tmp: Path) -> tuple[list[str],
                                                                                                      dict[str, str]]:
    """argv and environment: /mnt/models is the layout folder, every port 0 (reported in a port file)."""
    ports = {"--http-port": "0", "--grpc-port": "0", "--metrics-port": "0", "--host": "127.0.0.1"}
    argv = [sys.executable, "-m", "nnserve", *container["command"][1:]]
    for arg in filled_args(container, isvc_name):
        flag, _, value = arg.partition("=")
        value = ports.get(flag, value).replace("/mnt/models", str(mnt_models))
        argv.append(f"{flag}={value}")
    limits = container["resources"]["limits"]
    env = {"PYTHONUNBUFFERED": "1", "NNSERVE_PORT_FILE": str(tmp / "ports.json")}
    for variable in container.get("env", []):
        field = variable.get("valueFrom", {}).get("resourceFieldRef")
        if field is not None:  # the kubelet's rounding of a resource limit (divisor 1: whole CPUs, rounded up)
            env[variable["name"]] = str(math.ceil(float(str(limits[field["resource"].split(".")[1]]))))
        else:
            env[variable["name"]] = variable["value"]
    return argv, env


def http_probe(port: int, probe: dict[str, Any]) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['httpGet']['path']}",
                                    timeout=probe.get("timeoutSeconds", 1)) as reply:
            return 200 <= reply.status < 400
    except (urllib.error.URLError, OSError):
        return False


def probe_until_ready(port: int, probe: dict[str, Any], deadline_s: float) -> None:
    """The kubelet's readiness probing, without its period: probe until a success, within a deadline."""
    wait_until(lambda: http_probe(port, probe), deadline_s, "the readiness probe to pass")


def repository_layout(root: Path) -> Path:
    build(EXAMPLES / "001_two_layer_softmax.json", root)
    return root


def model_folder_layout(root: Path) -> Path:
    scratch = root.parent / "scratch"
    build(EXAMPLES / "001_two_layer_softmax.json", scratch)
    (scratch / "two_layer_softmax").rename(root)  # <root>/1/model.onnx and <root>/config.json
    return root


def model_file_layout(root: Path) -> Path:
    scratch = root.parent / "scratch"
    build(EXAMPLES / "001_two_layer_softmax.json", scratch)
    root.mkdir()
    (scratch / "two_layer_softmax" / "1" / "model.onnx").rename(root / "softmax.onnx")
    return root


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("layout", "served_as"), [
    (repository_layout, "two_layer_softmax"), (model_folder_layout, "my-isvc"), (model_file_layout, "my-isvc"),
], ids=["repository", "model-folder", "model-file"])
def test_runtime_container_serves_each_storage_layout_and_stops_cleanly(
    tmp_path: Path, layout: Any, served_as: str
) -> None:
    import subprocess

    container = runtime_container(load(RUNTIMES["clusterservingruntime.yaml"]))
    mnt_models = layout(tmp_path / "mnt-models")
    argv, env = run_as_container(container, "my-isvc", mnt_models, tmp_path)
    log = tmp_path / "kserve-container.log"
    with log.open("w") as sink:
        process = subprocess.Popen(argv, env={**_base_env(), **env}, stdout=sink, stderr=subprocess.STDOUT,
                                   text=True)
    try:
        ports = read_port_file(tmp_path / "ports.json", process, log)
        probe_until_ready(ports["http"], container["readinessProbe"], 60)
        assert http_probe(ports["http"], container["livenessProbe"])
        reply = post_json(ports["http"], f"/v2/models/{served_as}/infer",
                          {"inputs": [v2_input("input", SOFTMAX_X, "FP32")]})
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(reply.json()["outputs"][0]["data"], SOFTMAX_Y.ravel(), atol=1e-3)
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(served_as, {"input": SOFTMAX_X}), timeout=30)
        np.testing.assert_allclose(output_arrays(response)["probabilities"], SOFTMAX_Y, atol=1e-3)
        # Pod deletion (after the preStop sleep, which tests/test_deploy_k8s.py plays): the drain, then the exit,
        # well within the pod's termination grace period (tests/test_rest_operations.py drains under load).
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=TERMINATION_GRACE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = log.read_text()
    assert code == 0, text
    assert f"served as model '{served_as}'" in text or served_as == "two_layer_softmax"


def _base_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith("NNSERVE_")}
