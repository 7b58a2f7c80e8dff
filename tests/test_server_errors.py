"""Every malformed request gets the right status code and a message a person can act on; the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    dense_reference,
    infer_request,
    output_arrays,
    running_server,
    write_model,
)

Tensor = pb.ModelInferRequest.InferInputTensor
X = np.ones((2, 3), dtype=np.float32)


def expect_error(stub: object, request: pb.ModelInferRequest, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    details = error.value.details()
    assert error.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    assert "ONNXRuntimeError" not in details
    assert "Traceback" not in details
    return details


@pytest.fixture(autouse=True)
def _server_still_serves_afterwards(stub: object) -> Iterator[None]:
    yield
    response = stub.ModelInfer(infer_request("dense", {"input": X}), timeout=10)
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(X), atol=1e-6)


def test_unknown_model_is_not_found_and_lists_the_models(stub: object) -> None:
    expect_error(stub, infer_request("nope", {"input": X}), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'", "dense")


def test_unknown_version_is_not_found_and_lists_the_versions(stub: object) -> None:
    expect_error(stub, infer_request("dense", {"input": X}, version="7"), grpc.StatusCode.NOT_FOUND,
                 "no version '7'", "[1]")
    expect_error(stub, infer_request("dense", {"input": X}, version="latest"), grpc.StatusCode.NOT_FOUND,
                 "no version 'latest'")


def test_missing_input_is_invalid_argument_naming_it(stub: object) -> None:
    request = infer_request("multi_io", {"a": X})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "missing input 'b'", "['a', 'b']")


def test_extra_input_is_invalid_argument_naming_it(stub: object) -> None:
    request = infer_request("dense", {"input": X, "extra": X})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'extra'", "['input']")


def test_misnamed_input_names_both_the_wrong_and_the_expected_name(stub: object) -> None:
    request = infer_request("dense", {"inputs": X})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'inputs'", "missing input 'input'")


def test_duplicate_input_is_invalid_argument(stub: object) -> None:
    request = infer_request("dense", {"input": X})
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "'input' appears more than once")


def test_wrong_datatype_says_which_datatype_the_model_takes(stub: object) -> None:
    request = infer_request("dense", {"input": X.astype(np.float64)})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "datatype FP32", "says FP64")


def test_wrong_shape_says_which_dimension_and_the_expected_shape(stub: object) -> None:
    request = infer_request("dense", {"input": np.ones((2, 4), np.float32)})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "dimension 1 must be 3", "[-1, 3]", "[2, 4]")


def test_wrong_rank_says_how_many_dimensions_are_expected(stub: object) -> None:
    request = infer_request("dense", {"input": np.ones((2, 3, 1), np.float32)})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "must have 2 dimensions", "got 3")


def test_raw_contents_of_wrong_byte_length_are_rejected(stub: object) -> None:
    request = infer_request("dense", {"input": X})
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "have 20 bytes", "needs 24 bytes")


def test_raw_entries_must_match_the_inputs_one_to_one(stub: object) -> None:
    request = infer_request("dense", {"input": X})
    request.raw_input_contents.append(b"")
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries", "1 inputs")


def test_both_raw_and_typed_contents_are_rejected(stub: object) -> None:
    request = infer_request("dense", {"input": X})
    request.inputs[0].contents.fp32_contents.extend(X.ravel().tolist())
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "both typed `contents` and raw_input_contents")


def test_typed_contents_with_the_wrong_count_or_field_are_rejected(stub: object) -> None:
    short = pb.ModelInferRequest(model_name="dense", inputs=[
        Tensor(name="input", datatype="FP32", shape=[2, 3], contents=pb.InferTensorContents(fp32_contents=[1.0] * 5))
    ])
    expect_error(stub, short, grpc.StatusCode.INVALID_ARGUMENT, "5 values in contents.fp32_contents", "needs 6")
    wrong_field = pb.ModelInferRequest(model_name="dense", inputs=[
        Tensor(name="input", datatype="FP32", shape=[2, 3], contents=pb.InferTensorContents(fp64_contents=[1.0] * 6))
    ])
    expect_error(stub, wrong_field, grpc.StatusCode.INVALID_ARGUMENT, "found in contents.fp64_contents")


def test_int8_typed_values_out_of_range_are_rejected(stub: object) -> None:
    request = pb.ModelInferRequest(model_name="multi_io", inputs=[
        Tensor(name="a", datatype="FP32", shape=[1, 3], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3])),
        Tensor(name="b", datatype="INT8", shape=[1, 3], contents=pb.InferTensorContents(int_contents=[1, 300, 0])),
    ])
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "outside the INT8 range [-128, 127]")


def test_fp16_typed_contents_point_to_raw_contents(stub: object) -> None:
    request = pb.ModelInferRequest(model_name="fp16", inputs=[
        Tensor(name="x", datatype="FP16", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3, 4]))
    ])
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "send it in raw_input_contents")


def test_empty_batch_is_rejected(stub: object) -> None:
    request = infer_request("dense", {"input": np.ones((0, 3), np.float32)})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "empty batch", "at least one row")


def test_batch_over_max_batch_size_is_rejected_with_the_limit(stub: object) -> None:
    request = infer_request("dense", {"input": np.ones((9, 3), np.float32)})
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "9 rows", "max_batch_size 8", "split it")


def test_negative_dimension_is_rejected(stub: object) -> None:
    request = infer_request("dense", {"input": X})
    request.inputs[0].shape[0] = -2
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "negative dimension -2")


def test_overflowing_dimensions_are_rejected_without_allocating(stub: object) -> None:
    # unbatched_cfg serves [-1, 4] with max_batch_size 0: dimension 0 is free, so only the element count limits it.
    request = infer_request("unbatched_cfg", {"x": np.ones((2, 4), np.float32)})
    request.inputs[0].shape[:] = [2**62, 4]
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "too many elements")


def test_unknown_requested_output_lists_the_outputs(stub: object) -> None:
    request = infer_request("dense", {"input": X}, outputs=["logits"])
    expect_error(stub, request, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logits'", "['output']")


def test_onnxruntime_failure_is_internal_with_a_clean_message(stub: object) -> None:
    request = infer_request("gather", {"index": np.array([3, 99], dtype=np.int64)})
    details = expect_error(stub, request, grpc.StatusCode.INTERNAL, "model 'gather'", "failed to execute")
    assert "\n" not in details
    response = stub.ModelInfer(infer_request("gather", {"index": np.array([3, 9], dtype=np.int64)}), timeout=10)
    np.testing.assert_array_equal(output_arrays(response)["value"], [30.0, 90.0])


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("small-limit")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 100_000})
    with running_server(repo, max_message_bytes=64 * 1024) as running:
        yield running


def test_message_over_the_size_limit_is_resource_exhausted(small_limit_server: RunningServer) -> None:
    stub = small_limit_server.stub()
    big = np.ones((10_000, 3), dtype=np.float32)  # 120 kB > 64 KiB
    expect_error(stub, infer_request("dense", {"input": big}), grpc.StatusCode.RESOURCE_EXHAUSTED)
    small = np.ones((1000, 3), dtype=np.float32)
    response = stub.ModelInfer(infer_request("dense", {"input": small}), timeout=10)
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(small), atol=1e-5)
