"""Model facts: parameter counts of the documents' networks, FLOPs, layers, opset and the provider each model really
runs on (a silent CPU fallback is flagged), through ModelConfig, /metrics and `nnserve models`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import onnx
import pytest

from nnserve.builder import build
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import model_facts, model_view
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.model_facts import provider_fallback_reason, read_model_header
from nnserve.server.providers import CPU, CUDA, cuda_unavailable_reason
from nnserve.server.runner import ModelRunner, RunnerOptions
from tests.conftest import DENSE_B, DENSE_W, EXAMPLES, RunningServer, dense_model, running_server, write_model

# Parameters of every network of the source documents, counted from their own matrices. Document 001 says its
# 2-3-2 network has "14 parameters"; its matrices hold 6 + 3 + 6 + 2 = 17 (see the README).
SEED_PARAMETERS = {
    "layer_4x3": 15,
    "perceptron": 4,
    "layer_2x3": 8,
    "two_layer_softmax": 17,
    "single_neuron": 4,
    "exercise1": 4,
    "exercise2": 9,
    "and_gate": 3,
}


def config_parameters(server: RunningServer, model: str) -> dict[str, str]:
    config = server.stub().ModelConfig(pb.ModelConfigRequest(name=model), timeout=5).config
    return {key: value.string_value for key, value in config.parameters.items()}


def test_seed_networks_report_the_documents_parameter_counts_everywhere(server: RunningServer) -> None:
    port = server.app.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for model, count in SEED_PARAMETERS.items():
        parameters = config_parameters(server, model)
        assert int(parameters["parameter_count"]) == count, model
        assert int(parameters["weight_bytes"]) == 4 * count, model  # float32
        assert f'nnserve_model_parameters{{model="{model}",version="1"}} {float(count)}' in text


def test_model_config_carries_flops_layers_opset_and_the_provider_in_use(server: RunningServer) -> None:
    parameters = config_parameters(server, "two_layer_softmax")
    assert parameters["flops_per_sample"] == "29"
    assert (parameters["opset"], parameters["ir_version"], parameters["dtype"]) == ("21", "10", "float32")
    layers = json.loads(parameters["layers"])
    assert [(layer["in"], layer["out"], layer["activation"], layer["parameters"]) for layer in layers] == [
        (2, 3, "relu", 9), (3, 2, "softmax", 8)]
    runner = server.app.repository.get("two_layer_softmax").runner
    assert parameters["execution_provider"] == runner.provider
    assert parameters["requested_device"] == "auto"
    assert parameters["provider_fallback"] == ("true" if runner.provider_fallback else "false")
    assert parameters.get("provider_fallback_reason", "") == runner.provider_fallback
    # A model the builder did not make: counted from its initializers, opset from the file.
    dense = config_parameters(server, "dense")
    assert (dense["parameter_count"], dense["opset"]) == ("8", "21")
    assert "layers" not in dense


def test_fallback_is_flagged_only_when_cuda_was_possible_but_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_facts, "gpu_visible", lambda: True)  # the machine shows a GPU
    monkeypatch.setattr(model_facts.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(model_facts, "cuda_unavailable_reason", lambda device_id: "libcublasLt.so.13 is missing")
    assert provider_fallback_reason("auto", CPU, 0) == "libcublasLt.so.13 is missing"
    assert provider_fallback_reason("cuda", CPU, 0) == "libcublasLt.so.13 is missing"
    assert provider_fallback_reason("cpu", CPU, 0) == ""  # asked for CPU, got it
    assert provider_fallback_reason("auto", CUDA, 0) == ""
    monkeypatch.setattr(model_facts, "cuda_unavailable_reason", lambda device_id: None)
    assert "instead of CUDA" in provider_fallback_reason("auto", CPU, 0)  # onnxruntime placed it on CPU anyway
    monkeypatch.setattr(model_facts.ort, "get_available_providers", lambda: [CPU])
    assert provider_fallback_reason("auto", CPU, 0) == ""  # a CPU-only onnxruntime: CPU was the only choice
    monkeypatch.setattr(model_facts.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(model_facts, "cuda_unavailable_reason", lambda device_id: "libcublasLt.so.13 is missing")
    monkeypatch.setattr(model_facts, "gpu_visible", lambda: False)
    assert provider_fallback_reason("auto", CPU, 0) == ""  # no GPU on the machine: CPU was the plan


def test_a_gpu_is_visible_through_nvidia_device_nodes_its_driver_or_wsls_dxg(tmp_path: Path) -> None:
    from nnserve.server.providers import gpu_visible

    (tmp_path / "dev").mkdir()
    assert not gpu_visible(tmp_path)
    for node in ("dev/nvidia3", "dev/nvidiactl", "dev/dxg", "proc/driver/nvidia/version"):
        root = tmp_path / node.replace("/", "_")
        (root / node).parent.mkdir(parents=True)
        (root / node).touch()
        assert gpu_visible(root), node
    (tmp_path / "dev" / "nvidia-caps").mkdir()  # not a GPU node
    assert not gpu_visible(tmp_path)


def test_opset_and_ir_version_are_read_without_parsing_the_graph(tmp_path: Path) -> None:
    build(EXAMPLES / "004_three_layer.json", tmp_path / "repo")
    path = next((tmp_path / "repo").glob("*/1/model.onnx"))
    model = onnx.load(str(path))
    header = read_model_header(path)
    assert header.ir_version == model.ir_version
    assert header.opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    assert read_model_header(garbage).opset is None
    assert read_model_header(tmp_path / "missing.onnx").opset is None


def nnserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "NNSERVE_URL"}
    return subprocess.run([sys.executable, "-m", "nnserve", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_models_command_shows_facts_and_flags_a_cpu_fallback(server: RunningServer) -> None:
    runner = server.app.repository.get("two_layer_softmax").runner
    expected_fallback = provider_fallback_reason("auto", runner.provider, 0)
    assert runner.provider_fallback == expected_fallback  # the shared server runs with --device auto

    table = nnserve("models", "--layers", "--url", server.address)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header[:8] == ["MODEL", "VERSION", "STATE", "PROVIDER", "PARAMS", "WEIGHTS", "FLOPS/ROW", "OPSET"]
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("two_layer_softmax ")]
    assert re.search(r"\b17\s+68 B\s+29\s+21\b", row), row
    assert "two_layer_softmax:1  hidden 2->3 relu (9) | classes 3->2 softmax (8)" in table.stdout
    if expected_fallback:
        assert f"{runner.provider} (fallback!)" in row
        (line,) = [line for line in table.stdout.splitlines() if line.startswith("CPU fallback: ")]
        assert "two_layer_softmax:1, " in line
        assert line.endswith(f"asked for device 'auto' but run on {runner.provider}: {expected_fallback}")
    else:
        assert "fallback" not in table.stdout

    listed = nnserve("models", "--json", "--url", server.address)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    softmax = rows["two_layer_softmax"]
    assert (softmax["parameter_count"], softmax["weight_bytes"], softmax["flops_per_sample"]) == (17, 68, 29)
    assert (softmax["opset"], softmax["dtype"], softmax["requested_device"]) == (21, "float32", "auto")
    assert softmax["provider_fallback"] is bool(expected_fallback)
    assert [layer["activation"] for layer in softmax["layers"]] == ["relu", "softmax"]
    assert {name: rows[name]["parameter_count"] for name in SEED_PARAMETERS} == SEED_PARAMETERS


@pytest.mark.skipif(cuda_unavailable_reason(0) is None, reason="CUDA works here: a cuda model loads on it")
def test_a_model_that_demands_cuda_is_unavailable_with_the_reason_never_silently_on_cpu(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_model(repository, "on_gpu", dense_model(DENSE_W, DENSE_B), config={"device": "cuda"})
    build(EXAMPLES / "001_perceptron.json", repository)
    with running_server(repository, health_service="perceptron", strict_readiness=False, metrics_port=0) as running:
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.app.metrics_port}/metrics", timeout=5).read()
        assert b'nnserve_model_ready{model="on_gpu",version="1"} 0.0' in text
        listed = nnserve("models", "--json", "--url", running.address)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["on_gpu"]["state"] == "UNAVAILABLE"
    assert "CUDA" in rows["on_gpu"]["reason"]
    assert rows["perceptron"]["state"] == "READY"


def test_config_parameters_carry_the_delay_mode_of_a_batching_version(tmp_path: Path) -> None:
    result = build(EXAMPLES / "001_perceptron.json", tmp_path)
    runner = ModelRunner.load("perceptron", 1, result.model_path, RunnerOptions(device="cpu"))
    for mode in ("fixed", "adaptive"):
        assert model_view.config_parameters(runner, "1", BatchingSettings(delay_mode=mode))["delay_mode"] == mode
    assert "delay_mode" not in model_view.config_parameters(runner, "1", BatchingSettings(enabled=False))
    assert "delay_mode" not in model_view.config_parameters(runner, "1")
