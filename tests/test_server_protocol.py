"""Every RPC of the KServe v2 service, health and reflection, against the real server and real sessions."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nnserve import __version__
from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import model_config_pb2 as mc
from tests.conftest import EXAMPLES, RunningServer, dense_reference, infer_request, output_arrays

# The seed documents' worked numbers (they print 3 decimals; 001's softmax is rounded in the text).
DOCUMENT_CASES = [
    ("layer_4x3", [[1.00, 2.00, 3.00, 2.50], [-0.80, 0.40, 0.10, 1.20], [0.20, 0.90, -0.50, 0.30]],
     [[4.800, 1.210, 2.385], [3.310, 1.662, 1.661], [3.310, 2.001, 0.381]], 5e-4),
    ("perceptron", [[0.5, 1.2, -0.3]], [[0.04]], 1e-6),
    ("layer_2x3", [[1.0, 2.0, -1.0]], [[0.1, 0.0]], 1e-6),
    ("two_layer_softmax", [[1.5, -0.5]], [[0.538, 0.463]], 1e-3),
    ("single_neuron", [[0.5, 0.3, 0.8]], [[0.68]], 1e-6),
    ("exercise1", [[2.0, -1.0, 0.5]], [[1.9]], 1e-6),
    ("exercise2", [[1.0, 0.5]], [[1.09]], 1e-6),
    ("and_gate", [[1, 1], [0, 0], [1, 0], [0, 1]], [[0.9975], [0.00005], [0.12], [0.12]], 5e-3),
]


@pytest.mark.parametrize(("model", "x", "expected", "atol"), DOCUMENT_CASES, ids=[c[0] for c in DOCUMENT_CASES])
def test_seed_network_returns_the_documents_numbers_through_the_server(
    stub: object, model: str, x: list[list[float]], expected: list[list[float]], atol: float
) -> None:
    response = stub.ModelInfer(infer_request(model, {"input": np.asarray(x, dtype=np.float32)}), timeout=10)
    (y,) = output_arrays(response).values()  # 001's softmax network names its output "probabilities"
    np.testing.assert_allclose(y, expected, atol=atol)


def test_three_layer_network_matches_a_numpy_forward_pass(stub: object) -> None:
    x = np.random.default_rng(4).standard_normal((16, 3)).astype(np.float32)
    response = stub.ModelInfer(infer_request("three_layer", {"input": x}), timeout=10)
    expected = forward(load_spec(EXAMPLES / "004_three_layer.json"), x)
    np.testing.assert_allclose(output_arrays(response)["output"], expected, atol=1e-5)


def test_infer_echoes_id_and_reports_model_version_and_output_signature(stub: object) -> None:
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    response = stub.ModelInfer(infer_request("dense", {"input": x}, request_id="req-42"), timeout=10)
    assert response.id == "req-42"
    assert (response.model_name, response.model_version) == ("dense", "1")
    (tensor,) = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("output", "FP32", [5, 2])
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(x), rtol=1e-6, atol=1e-6)


def test_typed_fp32_contents_give_the_same_result_as_raw_contents(stub: object) -> None:
    x = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name="dense",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[2, 3],
                contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()),
            )
        ],
    )
    response = stub.ModelInfer(request, timeout=10)
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(x), atol=1e-6)


def test_several_inputs_and_outputs_of_different_datatypes_round_trip(stub: object) -> None:
    a = np.array([[0.5, 1.5, -2.0], [1.0, 0.0, 4.0]], dtype=np.float32)
    b = np.array([[1, -2, 127], [-128, 0, 3]], dtype=np.int8)
    outputs = output_arrays(stub.ModelInfer(infer_request("multi_io", {"a": a, "b": b}), timeout=10))
    np.testing.assert_array_equal(outputs["sum"], a + b.astype(np.float32))
    assert outputs["doubled"].dtype == np.int64
    np.testing.assert_array_equal(outputs["doubled"], 2 * b.astype(np.int64))


def test_typed_int8_contents_travel_in_int_contents(stub: object) -> None:
    request = pb.ModelInferRequest(
        model_name="multi_io",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="a", datatype="FP32", shape=[1, 3], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3])
            ),
            pb.ModelInferRequest.InferInputTensor(
                name="b", datatype="INT8", shape=[1, 3], contents=pb.InferTensorContents(int_contents=[-5, 0, 100])
            ),
        ],
    )
    outputs = output_arrays(stub.ModelInfer(request, timeout=10))
    np.testing.assert_array_equal(outputs["sum"], [[-4.0, 2.0, 103.0]])


def test_requested_outputs_select_and_order_the_response(stub: object) -> None:
    a = np.ones((1, 3), dtype=np.float32)
    b = np.full((1, 3), 2, dtype=np.int8)
    response = stub.ModelInfer(infer_request("multi_io", {"a": a, "b": b}, outputs=["doubled"]), timeout=10)
    assert [t.name for t in response.outputs] == ["doubled"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(output_arrays(response)["doubled"], [[4, 4, 4]])


@pytest.mark.parametrize(("model", "dtype", "factor"), [("fp16", np.float16, 2.0), ("fp64", np.float64, -3.0)])
def test_fp16_and_fp64_models_take_and_return_their_own_datatype(
    stub: object, model: str, dtype: type, factor: float
) -> None:
    x = np.array([[1.0, 2.5, -0.5, 8.0]], dtype=dtype)
    response = stub.ModelInfer(infer_request(model, {"x": x}), timeout=10)
    y = output_arrays(response)["y"]
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, x * factor)


def test_model_without_batch_dimension_takes_its_full_shape(stub: object) -> None:
    x = np.array([[1.0, -1.0, 2.0], [-3.0, 4.0, 0.0]], dtype=np.float32)
    response = stub.ModelInfer(infer_request("fixed", {"x": x}), timeout=10)
    np.testing.assert_array_equal(output_arrays(response)["y"], np.maximum(x, 0))


def test_version_is_selectable_and_empty_version_means_the_newest(stub: object) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    for version, factor in (("1", 1.0), ("2", 2.0), ("3", 3.0), ("", 3.0)):
        response = stub.ModelInfer(infer_request("versioned", {"x": x}, version=version), timeout=10)
        np.testing.assert_array_equal(output_arrays(response)["y"], x * factor)
        assert response.model_version == (version or "3")


def test_stream_infer_answers_each_request_in_order_and_reports_errors_in_band(stub: object) -> None:
    xs = [np.full((1, 3), i, dtype=np.float32) for i in range(20)]
    requests = [infer_request("dense", {"input": x}, request_id=str(i)) for i, x in enumerate(xs)]
    requests.insert(5, infer_request("no_such_model", {"input": xs[0]}, request_id="bad"))
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=20))
    assert [r.infer_response.id for r in responses] == [r.id for r in requests]
    bad = responses.pop(5)
    assert "unknown model 'no_such_model'" in bad.error_message
    for i, response in enumerate(responses):
        assert response.error_message == ""
        np.testing.assert_allclose(output_arrays(response.infer_response)["output"], dense_reference(xs[i]), atol=1e-5)


def test_server_live_ready_and_metadata(stub: object) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert (metadata.name, metadata.version) == ("nnserve", __version__)
    assert {"model_repository", "model_configuration", "statistics"} <= set(metadata.extensions)


def test_model_ready_is_true_for_served_versions_and_false_otherwise(stub: object) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense"), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="versioned", version="2"), timeout=5).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="versioned", version="9"), timeout=5).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no_such_model"), timeout=5).ready


def test_model_metadata_reports_platform_versions_and_signature_with_dynamic_batch(stub: object) -> None:
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="multi_io"), timeout=5)
    assert (metadata.name, metadata.platform, list(metadata.versions)) == ("multi_io", "onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("a", "FP32", [-1, 3]),
                                                                            ("b", "INT8", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("sum", "FP32", [-1, 3]),
                                                                             ("doubled", "INT64", [-1, 3])]
    versioned = stub.ModelMetadata(pb.ModelMetadataRequest(name="versioned"), timeout=5)
    assert list(versioned.versions) == ["3", "2", "1"]


def test_model_config_excludes_batch_dim_and_reports_provider_and_parameter_count(stub: object) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="layer_4x3"), timeout=5).config
    assert (config.name, config.platform, config.backend) == ("layer_4x3", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", mc.TYPE_FP32, [4])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("output", mc.TYPE_FP32, [3])]
    assert config.HasField("dynamic_batching")
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert config.parameters["parameter_count"].string_value == "15"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.latest.num_versions == 1


def test_model_config_of_unbatched_model_has_full_dims_and_no_dynamic_batching(stub: object) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="fixed"), timeout=5).config
    assert config.max_batch_size == 0
    assert [list(i.dims) for i in config.input] == [[2, 3]]
    assert not config.HasField("dynamic_batching")
    dense = stub.ModelConfig(pb.ModelConfigRequest(name="dense"), timeout=5).config
    assert dense.max_batch_size == 8


def test_model_statistics_count_successes_failures_and_executions(server: RunningServer) -> None:
    stub = server.stub()

    def stats() -> pb.ModelStatistics:
        (entry,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="exercise1"), timeout=5).model_stats
        return entry

    before = stats()
    x = np.ones((3, 3), dtype=np.float32)
    for _ in range(4):
        stub.ModelInfer(infer_request("exercise1", {"input": x}), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("exercise1", {"input": np.ones((3, 2), np.float32)}), timeout=10)
    after = stats()
    assert (after.name, after.version) == ("exercise1", "1")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 4
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 12
    assert 1 <= after.execution_count - before.execution_count <= 4
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.inference_stats.queue.count == after.inference_stats.success.count
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert after.last_inference > 0
    every = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5).model_stats
    assert {("versioned", "1"), ("versioned", "3"), ("dense", "1")} <= {(s.name, s.version) for s in every}


def test_repository_index_lists_every_version_with_its_state(stub: object) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
    rows = {(m.name, m.version): m.state for m in index}
    assert rows[("dense", "1")] == "READY"
    assert {rows[("versioned", v)] for v in ("1", "2", "3")} == {"READY"}
    assert ("perceptron", "1") in rows


def test_health_serves_overall_and_per_model_status(server: RunningServer) -> None:
    health = server.health()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="dense"), timeout=5).status == serving
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_inference_and_health_services(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_requests_and_reports_model_facts(server: RunningServer) -> None:
    port = server.app.metrics_port
    assert port

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(text: str, sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    stub = server.stub()
    success = 'nnserve_requests_total{model="exercise2",outcome="success",version="1"}'
    invalid = 'nnserve_requests_total{model="exercise2",outcome="invalid",version="1"}'
    rows = 'nnserve_inferences_total{model="exercise2",version="1"}'
    before = scrape()
    for _ in range(3):
        stub.ModelInfer(infer_request("exercise2", {"input": np.ones((2, 2), np.float32)}), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("exercise2", {"input": np.ones((2, 3), np.float32)}), timeout=10)
    after = scrape()
    assert value(after, success) - value(before, success) == 3
    assert value(after, invalid) - value(before, invalid) == 1
    assert value(after, rows) - value(before, rows) == 6
    assert value(after, 'nnserve_model_parameters{model="exercise2",version="1"}') == 9
    assert 'nnserve_model_execution_provider_info{model="exercise2",provider="CPUExecutionProvider",version="1"} 1.0' \
        in after
    assert value(after, 'nnserve_model_ready{model="dense",version="1"}') == 1
    assert "process_cpu_seconds_total" in after
