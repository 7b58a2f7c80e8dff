"""config.json parsing, flags/environment precedence, and the model runner on its own."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from nnserve.builder import build
from nnserve.client import InferenceClient
from nnserve.server.cli import add_arguments, settings_from
from nnserve.server.errors import ModelLoadError
from nnserve.server.model_config import ModelConfigError, VersionPolicy, load_model_config, parse_model_config
from nnserve.server.runner import ModelRunner, RunnerOptions
from tests.conftest import (
    EXAMPLES,
    dense_model,
    finish_model,
    fixed_shape_model,
    multi_io_model,
    running_server,
    write_model,
)

W = np.array([[0.5, -1.0], [0.25, 2.0], [-0.75, 0.1]], dtype=np.float32)
B = np.array([0.1, -0.2], dtype=np.float32)


def test_full_model_config_is_parsed() -> None:
    config = parse_model_config({
        "name": "m",
        "max_batch_size": 32,
        "version_policy": {"specific": [3, 1]},
        "device": "cpu",
        "device_id": 1,
        "intra_op_threads": 2,
        "inter_op_threads": 1,
        "graph_optimization_level": "basic",
        "instances": 2,
        "dynamic_batching": {"enabled": True, "max_queue_delay_us": 250, "preferred_batch_sizes": [16, 8],
                             "max_queue_size": 10},
    }, model_name="m")
    assert config.max_batch_size == 32
    assert config.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert (config.device, config.device_id, config.instances) == ("cpu", 1, 2)
    assert config.dynamic_batching.preferred_batch_sizes == (8, 16)
    assert config.dynamic_batching.max_queue_delay_us == 250


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"max_batch_sise": 8}, "unknown key 'max_batch_sise'"),
        ({"dynamic_batching": {"delay": 1}}, "unknown key 'dynamic_batching.delay'"),
        ({"max_batch_size": "8"}, "key 'max_batch_size': expected an integer, found '8'"),
        ({"max_batch_size": True}, "key 'max_batch_size': expected an integer"),
        ({"max_batch_size": -1}, "key 'max_batch_size': expected an integer in [0, 1048576], found -1"),
        ({"device": "gpu"}, "key 'device': expected one of ['auto', 'cuda', 'cpu'], found 'gpu'"),
        ({"version_policy": {"latest": 0}}, "key 'version_policy.latest': expected an integer >= 1"),
        ({"version_policy": {"newest": 1}}, "unknown policy 'newest'"),
        ({"version_policy": {"all": True, "latest": 1}}, "expected exactly one of"),
        ({"instances": 0}, "key 'instances'"),
        ({"name": "other"}, "must equal the model directory name 'm'"),
        ([1, 2], "expected a JSON object at the top level"),
    ],
)
def test_invalid_model_config_names_the_file_and_key(data: object, fragment: str) -> None:
    with pytest.raises(ModelConfigError) as error:
        parse_model_config(data, source="m/config.json", model_name="m")
    assert str(error.value).startswith("m/config.json: ")
    assert fragment in str(error.value)


def test_every_problem_of_a_config_is_reported_in_one_message() -> None:
    data = {"max_batch_sise": 8, "device": "gpu", "instances": 0, "version_policy": {"latest": 0},
            "dynamic_batching": {"delay": 1, "delay_mode": "sometimes"}}
    with pytest.raises(ModelConfigError) as error:
        parse_model_config(data, source="m/config.json", model_name="m")
    assert error.value.problems == (
        "unknown key 'max_batch_sise' (allowed keys: name, description, max_batch_size, version_policy, device, "
        "device_id, intra_op_threads, inter_op_threads, graph_optimization_level, instances, dynamic_batching, warmup)",
        "key 'device': expected one of ['auto', 'cuda', 'cpu'], found 'gpu'",
        "key 'version_policy.latest': expected an integer >= 1, found 0",
        "key 'instances': expected an integer in [1, 64], found 0",
        "unknown key 'dynamic_batching.delay' (allowed keys: enabled, max_queue_delay_us, preferred_batch_sizes, "
        "max_queue_size, delay_mode, inline_max_compute_us)",
        "key 'dynamic_batching.delay_mode': expected one of ['fixed', 'adaptive'], found 'sometimes'",
    )
    message = str(error.value)
    assert message.startswith("m/config.json: 6 problems: (1) unknown key 'max_batch_sise' ")
    assert "; (6) key 'dynamic_batching.delay_mode'" in message
    assert "\n" not in message  # one line: it is the model's UNAVAILABLE reason in ModelReady and the log


def test_a_bad_config_makes_the_model_unavailable_with_every_problem(tmp_path: Path) -> None:
    write_model(tmp_path, "m", dense_model(W, B), config={"device": "gpu", "max_batch_size": "8"})
    build(EXAMPLES / "001_perceptron.json", tmp_path)
    with running_server(tmp_path, health_service="perceptron", strict_readiness=False) as server, InferenceClient(
        server.address
    ) as client:
        (entry,) = [e for e in client.repository_index() if e.name == "m"]
    assert entry.state == "UNAVAILABLE"
    assert "m/config.json: 2 problems: " in entry.reason
    assert "key 'device'" in entry.reason
    assert "key 'max_batch_size'" in entry.reason


def test_config_file_that_is_not_json_reports_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"max_batch_size": 8,\n "instances": }')
    with pytest.raises(ModelConfigError, match=r"m/config.json: not valid JSON: .*line 2"):
        load_model_config(tmp_path / "m")


def test_builder_written_config_is_accepted(tmp_path: Path) -> None:
    result = build(EXAMPLES / "001_perceptron.json", tmp_path)
    config = load_model_config(result.model_path.parent.parent)
    assert config.max_batch_size == 64
    assert config.dynamic_batching.enabled is None  # left to the server's --dynamic-batching


def test_version_policy_selects_newest_first() -> None:
    assert VersionPolicy().select([1, 3, 2]) == [3]
    assert VersionPolicy("latest", latest=2).select([1, 3, 2]) == [3, 2]
    assert VersionPolicy("all").select([2, 1]) == [2, 1]
    assert VersionPolicy("specific", versions=(1, 5)).select([1, 2, 3]) == [1]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_win_over_environment_variables_which_win_over_defaults(tmp_path: Path) -> None:
    env = {"NNSERVE_MODEL_REPOSITORY": str(tmp_path), "NNSERVE_GRPC_PORT": "9001", "NNSERVE_DEVICE": "cpu",
           "NNSERVE_METRICS_PORT": "off", "NNSERVE_GRACE_PERIOD": "3.5", "NNSERVE_STRICT_READINESS": "false",
           "NNSERVE_GIL_SWITCH_INTERVAL_US": "250"}
    settings = settings_from(_parse(["--grpc-port", "9100"]), env)
    assert settings.model_repository == tmp_path
    assert settings.grpc_port == 9100
    assert settings.device == "cpu"
    assert settings.metrics_port is None
    assert settings.grace_period_s == 3.5
    assert settings.strict_readiness is False
    assert settings.host == "0.0.0.0"
    assert settings.gil_switch_interval_us == 250
    defaults = settings_from(_parse(["--model-repository", str(tmp_path)]), {})
    assert defaults.metrics_port == 8002
    assert defaults.gil_switch_interval_us == 500


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        ([], {}, "--model-repository (or NNSERVE_MODEL_REPOSITORY) is required"),
        (["--model-repository", "r"], {"NNSERVE_GRPC_PORT": "http"}, "NNSERVE_GRPC_PORT: invalid value 'http'"),
        (["--model-repository", "r"], {"NNSERVE_DEVICE": "tpu"}, "NNSERVE_DEVICE: expected one of auto, cuda, cpu"),
        (["--model-repository", "r", "--grpc-port", "70000"], {}, "grpc_port must be a port number"),
        (["--model-repository", "r", "--strict-readiness", "maybe"], {}, "--strict-readiness: invalid value"),
        (["--model-repository", "r", "--gil-switch-interval-us", "0"], {},
         "gil_switch_interval_us must be an integer in [1, 1000000], got 0"),
    ],
)
def test_invalid_settings_name_the_flag_or_variable(argv: list[str], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        settings_from(_parse(argv), env)


def _load(path: Path, **options: object) -> ModelRunner:
    return ModelRunner.load("m", 1, path, RunnerOptions(device="cpu", **options))  # type: ignore[arg-type]


def test_io_binding_path_returns_the_same_outputs_as_plain_run(tmp_path: Path) -> None:
    dense = write_model(tmp_path, "dense", dense_model(W, B))
    multi = write_model(tmp_path, "multi", multi_io_model())
    x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    plain, bound = _load(dense, io_binding=False), _load(dense, io_binding=True)
    np.testing.assert_array_equal(bound.run({"input": x})["output"], plain.run({"input": x})["output"])
    feed = {"a": x, "b": np.arange(21, dtype=np.int8).reshape(7, 3)}
    for name, value in _load(multi, io_binding=True).run(feed).items():
        np.testing.assert_array_equal(value, _load(multi, io_binding=False).run(feed)[name])


def test_runner_reads_builder_facts_and_counts_parameters_of_other_models(tmp_path: Path) -> None:
    built = build(EXAMPLES / "001_two_layer_softmax.json", tmp_path)
    facts = _load(built.model_path).facts
    assert (facts.parameter_count, facts.weight_bytes) == (17, 68)
    assert [layer["activation"] for layer in facts.layers] == ["relu", "softmax"]
    assert facts.spec_sha256
    plain = _load(write_model(tmp_path, "plain", dense_model(W, B))).facts
    assert (plain.parameter_count, plain.weight_bytes) == (8, 32)


def test_max_batch_size_on_a_model_without_batch_dimension_is_a_load_error(tmp_path: Path) -> None:
    path = write_model(tmp_path, "fixed", fixed_shape_model())
    with pytest.raises(ModelLoadError, match="without a dynamic first \\(batch\\) dimension; set max_batch_size to 0"):
        _load(path, max_batch_size=8)
    assert _load(path).signature.max_batch_size == 0


def test_bfloat16_tensors_are_refused_at_load_with_the_supported_types(tmp_path: Path) -> None:
    """onnxruntime loads a bfloat16 model, but numpy has no such dtype: refused at load, listing what is served."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "bf16",
        [helper.make_tensor_value_info("s", TensorProto.BFLOAT16, ["batch"])],
        [helper.make_tensor_value_info("t", TensorProto.BFLOAT16, ["batch"])],
    )
    path = write_model(tmp_path, "bf16", finish_model(graph))
    with pytest.raises(ModelLoadError, match=r"input 's' has type tensor\(bfloat16\), which nnserve does not serve "
                                             r"\(supported: BOOL, BYTES, FP16, FP32"):
        _load(path)


def test_string_tensors_load_as_bytes(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"])],
    )
    runner = _load(write_model(tmp_path, "strings", finish_model(graph)))
    assert [(t.name, t.datatype) for t in (*runner.signature.inputs, *runner.signature.outputs)] == [
        ("s", "BYTES"), ("t", "BYTES")]



def test_warmup_config_is_validated_and_every_form_accepted(tmp_path: Path) -> None:
    from nnserve.server.model_config import ModelConfigError, parse_model_config

    assert parse_model_config({"warmup": False}).warmup.enabled is False
    config = parse_model_config({"warmup": {"batch_sizes": [8, 1, 8], "dims": {"x": [3, 224]}}})
    assert (config.warmup.enabled, config.warmup.batch_sizes, dict(config.warmup.dims)) == (True, (1, 8),
                                                                                             {"x": (3, 224)})
    with pytest.raises(ModelConfigError) as caught:
        parse_model_config({"warmup": {"batch_sizes": [0], "dims": {"x": [-1]}, "runs": 2}})
    problems = caught.value.problems
    assert any("unknown key 'warmup.runs'" in p for p in problems)
    assert any("warmup.batch_sizes': expected a non-empty list of integers >= 1, found [0]" in p for p in problems)
    assert any("warmup.dims.x': expected a list of integers >= 1" in p for p in problems)
