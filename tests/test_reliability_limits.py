"""Request limits: each one refuses what exceeds it with INVALID_ARGUMENT naming the flag, lets what fits through,
and is set from a flag or its NNSERVE_* variable. (The message size limit is tested in test_server_errors.py, the
per-connection stream limit in test_reliability_overload.py.)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.cli import add_arguments, settings_from
from nnserve.server.limits import MAX_STATUS_MESSAGE_CHARS, client_message
from nnserve.server.settings import ServerSettings
from tests.conftest import (
    DENSE_B,
    DENSE_W,
    RunningServer,
    dense_model,
    dense_reference,
    infer_request,
    multi_io_model,
    output_arrays,
    running_server,
    scale_model,
    write_model,
)

Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("limits")
    write_model(repo, "dense", dense_model(DENSE_W, DENSE_B), config={"max_batch_size": 64})
    write_model(repo, "free", scale_model(np.dtype(np.float32), 2.0), config={"max_batch_size": 0})
    write_model(repo, "multi_io", multi_io_model())
    limits = {"max_request_rows": 16, "max_tensor_dims": 3, "max_tensor_elements": 1000, "max_inputs_per_request": 2}
    with running_server(repo, **limits) as running:  # type: ignore[arg-type]
        yield running


def refusal(server: RunningServer, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def test_rows_over_max_request_rows_are_refused_even_when_the_model_allows_them(limited: RunningServer) -> None:
    fits = np.ones((16, 3), np.float32)
    response = limited.stub().ModelInfer(infer_request("dense", {"input": fits}), timeout=10)
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(fits), atol=1e-6)
    details = refusal(limited, infer_request("dense", {"input": np.ones((17, 3), np.float32)}))
    assert "17 rows" in details
    assert "at most 16 rows per request (--max-request-rows)" in details


def test_shapes_over_max_tensor_dims_are_refused_before_anything_else(limited: RunningServer) -> None:
    request = infer_request("dense", {"input": np.ones((1, 3), np.float32)})
    request.inputs[0].shape[:] = [1, 1, 1, 3]
    assert "4 dimensions; this server accepts at most 3 (--max-tensor-dims)" in refusal(limited, request)
    request.inputs[0].shape[:] = [1] * 100_000  # the message must not echo 100,000 dimensions
    details = refusal(limited, request)
    assert "100000 dimensions" in details
    assert len(details) < 300


def test_elements_over_max_tensor_elements_are_refused_per_tensor_and_per_dimension(limited: RunningServer) -> None:
    fits = np.ones((250, 4), np.float32)  # 1000 elements
    response = limited.stub().ModelInfer(infer_request("free", {"x": fits}), timeout=10)
    np.testing.assert_array_equal(output_arrays(response)["y"], fits * 2)
    assert "too many elements" in refusal(limited, infer_request("free", {"x": np.ones((251, 4), np.float32)}))
    zero_times_huge = infer_request("free", {"x": np.ones((0, 4), np.float32)})
    zero_times_huge.inputs[0].shape[:] = [2**40, 0]  # 0 elements, but a dimension far over the limit
    details = refusal(limited, zero_times_huge)
    assert "dimension 0 is 1099511627776: too many elements" in details
    assert "--max-tensor-elements" in details


def test_more_inputs_raw_entries_or_outputs_than_max_inputs_per_request_are_refused(limited: RunningServer) -> None:
    a, b = np.ones((1, 3), np.float32), np.ones((1, 3), np.int8)
    response = limited.stub().ModelInfer(infer_request("multi_io", {"a": a, "b": b}), timeout=10)
    assert set(output_arrays(response)) == {"sum", "doubled"}
    request = infer_request("multi_io", {"a": a, "b": b})
    request.inputs.append(Tensor(name="c", datatype="FP32", shape=[1, 3]))
    request.raw_input_contents.append(a.tobytes())
    assert "3 inputs; this server accepts at most 2 (--max-inputs-per-request)" in refusal(limited, request)
    raw = infer_request("multi_io", {"a": a, "b": b})
    raw.raw_input_contents.append(b"")
    assert "3 raw_input_contents entries" in refusal(limited, raw)
    outputs = infer_request("multi_io", {"a": a, "b": b}, outputs=["sum", "doubled", "sum"])
    assert "3 requested outputs" in refusal(limited, outputs)


def test_status_messages_are_bounded_so_they_always_reach_the_client() -> None:
    assert client_message("short") == "short"
    long = client_message("x" * 100_000)
    assert len(long) == MAX_STATUS_MESSAGE_CHARS
    assert long.endswith("(message truncated)")


def _settings(argv: list[str], env: dict[str, str]) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(["--model-repository", "/models", *argv]), env)


def test_limits_come_from_flags_or_environment_with_safe_defaults() -> None:
    defaults = _settings([], {})
    assert (defaults.max_request_rows, defaults.max_tensor_dims, defaults.max_tensor_elements,
            defaults.max_inputs_per_request, defaults.max_concurrent_streams, defaults.max_message_bytes) == \
        (65536, 16, 1 << 26, 64, None, None)  # streams and message size: derived from the memory at start
    env = {"NNSERVE_MAX_REQUEST_ROWS": "100", "NNSERVE_MAX_TENSOR_DIMS": "4", "NNSERVE_MAX_TENSOR_ELEMENTS": "5000",
           "NNSERVE_MAX_INPUTS_PER_REQUEST": "8", "NNSERVE_MAX_CONCURRENT_STREAMS": "32"}
    from_env = _settings([], env)
    assert (from_env.max_request_rows, from_env.max_tensor_dims, from_env.max_tensor_elements,
            from_env.max_inputs_per_request, from_env.max_concurrent_streams) == (100, 4, 5000, 8, 32)
    assert _settings(["--max-request-rows", "7"], env).max_request_rows == 7  # the flag wins
    with pytest.raises(ValueError, match="max_tensor_dims must be an integer in"):
        _settings(["--max-tensor-dims", "0"], {})
    with pytest.raises(ValueError, match="NNSERVE_MAX_CONCURRENT_STREAMS: invalid value"):
        _settings([], {"NNSERVE_MAX_CONCURRENT_STREAMS": "many"})


def test_security_settings_come_from_flags_or_environment() -> None:
    settings = _settings(["--tls-cert", "/tls/cert.pem", "--tls-key", "/tls/key.pem"],
                         {"NNSERVE_TLS_CLIENT_CA": "/tls/ca.pem", "NNSERVE_AUTH_TOKENS": "abcdefghijklmnopq infer"})
    assert (str(settings.tls_cert), str(settings.tls_key), str(settings.tls_client_ca)) == \
        ("/tls/cert.pem", "/tls/key.pem", "/tls/ca.pem")
    assert settings.auth_tokens == "abcdefghijklmnopq infer"
    assert "abcdefghijklmnopq" not in repr(settings)
    assert str(_settings([], {"NNSERVE_AUTH_TOKEN_FILE": "/run/secrets/tokens"}).auth_token_file) == \
        "/run/secrets/tokens"
