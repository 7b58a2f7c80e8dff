"""The client SDK against the real server (real onnxruntime, loopback ports): every method of both clients.

Numpy round trips per datatype (the builder's FP32, FP16 export and FP64 specs, checked against an independent numpy
forward pass; INT8 in / INT64 out through the shared repository's `multi_io` model), each error class, version
selection, load/unload, `infer_many` order and progress, and the codec for every datatype.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from nnserve.builder import build, load_spec
from nnserve.builder.reference import forward
from nnserve.client import (
    AsyncInferenceClient,
    DeadlineExceededError,
    InferenceClient,
    InferenceError,
    InvalidInputError,
    ModelMetadata,
    ModelNotFoundError,
    RetryPolicy,
    ServerOverloadedError,
    ServerUnavailableError,
    StatisticsSnapshot,
    TensorMetadata,
    _codec,
)
from nnserve.client.retry import Attempts
from nnserve.protos import grpc_service_pb2 as pb
from tests.conftest import (
    RunningServer,
    ServeProcess,
    dense_reference,
    held_port,
    running_server,
    serve_process,
    slow_model,
    write_model,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SOFTMAX = "two_layer_softmax"
LAYER = "layer_4x3"
BUILT = (SOFTMAX, LAYER, "softmax_fp16", "layer_fp64")
X = np.array([[1.5, -0.5], [0.0, 1.0], [-2.0, 3.0]], dtype=np.float32)


def built_repository(root: Path) -> Path:
    """Seed networks in every float datatype the builder produces (FP32, FP16 export, FP64 spec)."""
    build(EXAMPLES / "001_two_layer_softmax.json", root)
    build(EXAMPLES / "000_layer_4x3.json", root)
    build(EXAMPLES / "001_two_layer_softmax.json", root, name="softmax_fp16", fp16=True)
    fp64 = json.loads((EXAMPLES / "000_layer_4x3.json").read_text()) | {"name": "layer_fp64", "dtype": "float64"}
    build(fp64, root)
    return root


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`nnserve serve` over the built models, with repository control on so load/unload can be exercised."""
    repository = built_repository(tmp_path_factory.mktemp("built"))
    log = tmp_path_factory.mktemp("logs") / "explicit.log"
    with serve_process(repository, log, "--model-control", "explicit", "--device", "cpu") as running:
        yield running
        running.terminate()


@pytest.fixture
def client(explicit_server: ServeProcess) -> Iterator[InferenceClient]:
    with InferenceClient(explicit_server.address, timeout=10) as c:
        yield c


@pytest.fixture
def shared(server: RunningServer) -> Iterator[InferenceClient]:
    """A client of the session's shared in-process server (standard repository; read-only use)."""
    with InferenceClient(server.address, timeout=10) as c:
        yield c


def expected(example: str, x: np.ndarray) -> np.ndarray:
    return forward(load_spec(EXAMPLES / example), x)


# -- health, metadata, config, statistics, repository ---------------------------------------------------------


def test_health_calls_report_a_loaded_server_and_model(client: InferenceClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(SOFTMAX)
    assert client.is_model_ready(SOFTMAX, 1)
    assert not client.is_model_ready("no_such_model")


def test_server_metadata_names_the_server_and_its_extensions(client: InferenceClient) -> None:
    metadata = client.server_metadata()
    assert metadata.name == "nnserve"
    assert metadata.version
    assert "model_repository" in metadata.extensions


def test_model_metadata_gives_the_tensor_signature(client: InferenceClient) -> None:
    metadata = client.model_metadata(SOFTMAX)
    assert metadata.name == SOFTMAX
    assert "1" in metadata.versions
    assert metadata.inputs == (TensorMetadata("input", "FP32", (-1, 2)),)
    assert metadata.output_names == ("probabilities",)


def test_model_config_carries_batching_provider_and_parameter_count(client: InferenceClient) -> None:
    config = client.model_config(SOFTMAX)
    assert config.name == SOFTMAX
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert config.parameters["parameter_count"].string_value == "17"
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"


def test_model_statistics_count_each_request_and_row(client: InferenceClient) -> None:
    before = client.model_statistics(LAYER)
    everything_before = client.model_statistics()
    client.infer(LAYER, np.ones((3, 4), dtype=np.float32))
    client.infer(LAYER, np.ones((2, 4), dtype=np.float32))
    snapshots = client.model_statistics(LAYER, 1) - before  # snapshots subtract, as the README says
    assert isinstance(snapshots, StatisticsSnapshot)
    (delta,) = snapshots
    assert (delta.name, delta.version) == (LAYER, "1")
    across = (client.model_statistics() - everything_before).get(LAYER)
    assert (across.success.count, across.inference_count) == (2, 5)
    assert (client.model_statistics() - everything_before).get(SOFTMAX).success.count == 0
    assert delta.success.count == 2
    assert delta.inference_count == 5
    assert delta.success.mean_ms is not None
    assert delta.success.mean_ms > 0
    assert {s.name for s in client.model_statistics()} >= set(BUILT)


def test_repository_index_lists_every_model_as_ready(client: InferenceClient) -> None:
    index = {(m.name, m.version): m.state for m in client.repository_index()}
    assert index == {(name, "1"): "READY" for name in BUILT}
    assert len(client.repository_index(ready_only=True)) == 4


def test_unload_makes_a_model_unavailable_and_load_brings_it_back(client: InferenceClient) -> None:
    client.unload_model("layer_fp64")
    try:
        assert not client.is_model_ready("layer_fp64")
        (entry,) = [m for m in client.repository_index() if m.name == "layer_fp64"]
        assert entry.state == "UNAVAILABLE"
        with InferenceClient(client.url, retry=None) as no_retry, pytest.raises(ServerUnavailableError):
            no_retry.infer("layer_fp64", np.ones((1, 4)))
    finally:
        client.load_model("layer_fp64")
    assert client.is_model_ready("layer_fp64")
    np.testing.assert_allclose(
        client.infer("layer_fp64", np.ones((1, 4))), expected("000_layer_4x3.json", np.ones((1, 4)))
    )


# -- inference: datatypes, numpy in and out --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "example", "dtype", "rtol"),
    [
        (SOFTMAX, "001_two_layer_softmax.json", np.float32, 1e-6),
        ("softmax_fp16", "001_two_layer_softmax.json", np.float16, 2e-3),
        ("layer_fp64", "000_layer_4x3.json", np.float64, 1e-12),
        (LAYER, "000_layer_4x3.json", np.float32, 1e-6),
    ],
)
def test_infer_round_trips_each_float_datatype_and_matches_numpy(
    client: InferenceClient, model: str, example: str, dtype: type[np.floating], rtol: float
) -> None:
    width = load_spec(EXAMPLES / example).input_size
    x = np.random.default_rng(7).standard_normal((5, width)).astype(dtype)
    y = client.infer(model, x)
    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype
    assert y.shape == (5, expected(example, x).shape[1])
    np.testing.assert_allclose(y, expected(example, x.astype(np.float64)), rtol=rtol, atol=rtol)


def test_infer_takes_a_dict_and_returns_a_dict_when_outputs_are_named(client: InferenceClient) -> None:
    y = client.infer(SOFTMAX, {"input": X}, outputs=["probabilities"])
    assert isinstance(y, np.ndarray)  # one output: the array itself
    result = client.infer_result(SOFTMAX, {"input": X}, request_id="req-42", version="1")
    assert result.id == "req-42"
    assert (result.model_name, result.model_version) == (SOFTMAX, "1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected("001_two_layer_softmax.json", X), rtol=1e-6)
    with pytest.raises(KeyError, match="probabilities"):
        result.as_numpy("nope")


def test_several_inputs_and_integer_datatypes_round_trip_as_dicts(shared: InferenceClient) -> None:
    a = np.array([[0.5, 1.0, -2.0], [3.0, 0.0, 1.5]], dtype=np.float32)
    b = np.array([[1, -2, 127], [-128, 0, 5]], dtype=np.int8)
    outputs = shared.infer("multi_io", {"a": a, "b": b})
    assert isinstance(outputs, dict)
    assert list(outputs) == ["sum", "doubled"]
    np.testing.assert_allclose(outputs["sum"], a + b.astype(np.float32))
    assert outputs["doubled"].dtype == np.int64
    np.testing.assert_array_equal(outputs["doubled"], 2 * b.astype(np.int64))
    only = shared.infer("multi_io", {"a": a, "b": b}, outputs=["doubled"])
    assert isinstance(only, np.ndarray)
    np.testing.assert_array_equal(only, 2 * b.astype(np.int64))
    with pytest.raises(InvalidInputError, match="2 inputs"):
        shared.infer("multi_io", a)  # a bare array cannot name one of two inputs


def test_version_selects_the_model_version(shared: InferenceClient) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    for version in (1, "2", 3):
        np.testing.assert_allclose(shared.infer("versioned", x, version=version), x * float(version))
    assert shared.model_metadata("versioned").versions == ("3", "2", "1")
    assert shared.is_model_ready("versioned", 2)
    assert not shared.is_model_ready("versioned", 9)
    with pytest.raises(ModelNotFoundError):
        shared.infer("versioned", x, version=9)


def test_response_arrays_are_read_only_views_of_the_response_bytes(client: InferenceClient) -> None:
    y = client.infer(SOFTMAX, X)
    assert isinstance(y, np.ndarray)
    assert not y.flags.writeable  # np.frombuffer over the message's bytes: no copy was made
    assert y.base is not None


def test_non_contiguous_and_big_endian_inputs_are_sent_correctly(client: InferenceClient) -> None:
    wide = np.asfortranarray(np.repeat(X, 2, axis=1))[:, ::2]  # a strided view
    assert not wide.flags.c_contiguous
    np.testing.assert_allclose(client.infer(SOFTMAX, wide), expected("001_two_layer_softmax.json", X), rtol=1e-6)
    np.testing.assert_allclose(
        client.infer(SOFTMAX, X.astype(">f4")), expected("001_two_layer_softmax.json", X), rtol=1e-6
    )


# -- errors ----------------------------------------------------------------------------------------------------


def test_unknown_model_raises_model_not_found_with_the_servers_message(client: InferenceClient) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        client.infer("no_such_model", X)
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in caught.value.message


def test_wrong_shape_and_wrong_datatype_raise_invalid_input(client: InferenceClient) -> None:
    with pytest.raises(InvalidInputError) as shape:
        client.infer(SOFTMAX, np.ones((1, 3), dtype=np.float32))
    assert shape.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidInputError, match="FP64"):
        client.infer(SOFTMAX, np.ones((1, 2)))  # float64 into an FP32 model: no silent cast
    with pytest.raises(InvalidInputError):
        client.infer(SOFTMAX, {"wrong_name": X})


def test_a_bare_array_for_a_multi_input_model_is_rejected_before_sending() -> None:
    two = ModelMetadata(
        "m", ("1",), "onnx", (TensorMetadata("a", "FP32", (-1,)), TensorMetadata("b", "FP32", (-1,))), ()
    )
    with pytest.raises(InvalidInputError, match="2 inputs"):
        _codec.name_inputs(np.ones(3), two)


def test_an_expired_deadline_raises_deadline_exceeded(tmp_path: Path) -> None:
    # A model that computes for ~100 ms against a 5 ms deadline: the deadline passes whatever the scheduling.
    # (A near-zero timeout is not deterministic: gRPC may still deliver and answer the call in time.)
    write_model(tmp_path, "slow", slow_model(depth=256))
    x = np.ones((64, 256), dtype=np.float32)
    with (
        running_server(tmp_path) as server,
        InferenceClient(server.address, retry=None) as slow_client,
        pytest.raises(DeadlineExceededError) as caught,
    ):
        slow_client.infer("slow", x, timeout=0.005)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_oversized_request_raises_server_overloaded_without_retrying(server: RunningServer) -> None:
    with InferenceClient(server.address, max_message_bytes=512 * 1024 * 1024) as big, \
            pytest.raises(ServerOverloadedError, match="larger than max") as caught:
        big.infer(LAYER, np.zeros((5_000_000, 4), dtype=np.float32))  # 80 MB, over the server's 64 MiB
    assert Attempts(RetryPolicy(), timeout_s=60).next_delay_s(caught.value) is None  # the same request fails again


def test_a_full_queue_raises_server_overloaded(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    build(EXAMPLES / "000_layer_4x3.json", repository)
    config = {"max_batch_size": 64, "dynamic_batching": {"enabled": True, "max_queue_size": 1}}
    (repository / LAYER / "config.json").write_text(json.dumps(config))

    async def flood(url: str) -> list[object]:
        async with AsyncInferenceClient(url, retry=None) as aclient:
            x = {"input": np.ones((1, 4), dtype=np.float32)}
            return await asyncio.gather(*(aclient.infer(LAYER, x) for _ in range(300)), return_exceptions=True)

    with serve_process(repository, tmp_path / "serve.log", "--device", "cpu") as tiny_queue:
        outcomes = asyncio.run(flood(tiny_queue.address))
        tiny_queue.terminate()
    rejected = [o for o in outcomes if isinstance(o, ServerOverloadedError)]
    assert rejected, "300 concurrent requests against a queue of 1 were all accepted"
    assert rejected[0].code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(isinstance(o, np.ndarray | ServerOverloadedError) for o in outcomes)


def test_unmapped_status_codes_raise_the_base_class(shared: InferenceClient) -> None:
    with pytest.raises(InferenceError) as caught:
        shared.load_model(LAYER)  # repository control is off on the shared server
    assert type(caught.value) is InferenceError
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "model-control" in caught.value.message
    assert str(caught.value).startswith("FAILED_PRECONDITION: ")


def test_no_server_listening_raises_server_unavailable() -> None:
    with (
        held_port() as port,
        InferenceClient(f"127.0.0.1:{port}", retry=None, timeout=5) as nobody,
        pytest.raises(ServerUnavailableError) as caught,
    ):
        nobody.is_server_live()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


# -- infer_many ------------------------------------------------------------------------------------------------


def test_infer_many_splits_keeps_order_and_reports_progress(
    client: InferenceClient, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(1).standard_normal((1000, 4)).astype(np.float32)
    seen: list[tuple[int, int]] = []
    y = client.infer_many(
        LAYER, x, batch_size=37, concurrency=6, progress=lambda done, total: seen.append((done, total))
    )
    np.testing.assert_allclose(y, expected("000_layer_4x3.json", x), rtol=1e-5, atol=1e-6)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (1000, 1000)
    assert len(seen) == 28
    client.infer_many(LAYER, x[:100], batch_size=10, progress=True)
    assert "100/100 rows" in capsys.readouterr().err


def test_infer_many_raises_the_first_failure_and_ends_the_progress_line(
    shared: InferenceClient, capsys: pytest.CaptureFixture[str]
) -> None:
    with held_port() as port, InferenceClient(f"127.0.0.1:{port}", retry=None) as nobody, \
            pytest.raises(ServerUnavailableError):
        nobody.infer_many(LAYER, {"input": np.ones((10, 4), dtype=np.float32)}, batch_size=2)
    with pytest.raises(InvalidInputError):  # every request fails at the server: float64 for an FP32 input
        shared.infer_many("dense", {"input": np.ones((100, 3))}, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "0/100 rows" in err
    assert err.endswith("\n")


def test_infer_many_keeps_each_request_within_the_models_max_batch_size(
    shared: InferenceClient, server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(4).standard_normal((3000, 3)).astype(np.float32)
    before = shared.model_statistics("dense")
    got = shared.infer_many("dense", x, batch_size=64, progress=True)  # dense serves at most 8 rows per request
    np.testing.assert_allclose(got, dense_reference(x), rtol=1e-5, atol=1e-5)
    assert (shared.model_statistics("dense") - before).get("dense").success.count == 3000 // 8
    assert "3000/3000 rows" in capsys.readouterr().err
    fixed = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)  # no batch dimension: one request
    np.testing.assert_array_equal(shared.infer_many("fixed", fixed, batch_size=1), np.maximum(fixed, 0))


# -- asyncio client --------------------------------------------------------------------------------------------


def test_async_client_offers_every_method_with_the_same_results(explicit_server: ServeProcess) -> None:
    async def scenario() -> None:
        async with AsyncInferenceClient(explicit_server.address, timeout=10) as aclient:
            assert await aclient.is_server_live()
            assert await aclient.is_server_ready()
            assert await aclient.is_model_ready(SOFTMAX)
            assert (await aclient.server_metadata()).name == "nnserve"
            assert (await aclient.model_metadata(SOFTMAX)).input_names == ("input",)
            assert (await aclient.model_config(SOFTMAX)).max_batch_size > 0
            assert (await aclient.model_statistics(SOFTMAX))[0].name == SOFTMAX
            assert len(await aclient.repository_index()) == 4
            await aclient.unload_model("softmax_fp16")
            assert not await aclient.is_model_ready("softmax_fp16")
            await aclient.load_model("softmax_fp16")
            assert await aclient.is_model_ready("softmax_fp16")
            y = await aclient.infer(SOFTMAX, X)
            np.testing.assert_allclose(y, expected("001_two_layer_softmax.json", X), rtol=1e-6)
            result = await aclient.infer_result(SOFTMAX, {"input": X}, request_id="a1")
            assert result.id == "a1"
            with pytest.raises(ModelNotFoundError):
                await aclient.infer("no_such_model", X)
            with pytest.raises(InvalidInputError):
                await aclient.infer(SOFTMAX, np.ones((1, 5), dtype=np.float32))
            big = np.random.default_rng(2).standard_normal((500, 4)).astype(np.float32)
            seen: list[int] = []
            many = await aclient.infer_many(
                LAYER, big, batch_size=16, concurrency=8, progress=lambda d, _t: seen.append(d)
            )
            np.testing.assert_allclose(many, expected("000_layer_4x3.json", big), rtol=1e-5, atol=1e-6)
            assert seen[-1] == 500

    asyncio.run(scenario())


# -- the codec for datatypes the builder does not produce --------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([[True, False]]),
        *(np.arange(6, dtype=t).reshape(2, 3) for t in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")),
        np.array([[0.5, -1.25]], dtype=np.float16),
        np.array([b"ab", b"", "\u00e9".encode()], dtype=object),
    ],
    ids=lambda a: str(a.dtype),
)
def test_every_datatype_survives_encoding_and_raw_decoding(array: np.ndarray) -> None:
    request = _codec.infer("m", {"x": array}, version=None, outputs=None, parameters={"p": 1}, request_id=None).request
    assert isinstance(request, pb.ModelInferRequest)
    tensor = request.inputs[0]
    reply = pb.ModelInferResponse(model_name="m", raw_output_contents=[request.raw_input_contents[0]])
    reply.outputs.add(name="y", datatype=tensor.datatype, shape=tensor.shape)
    decoded = _codec.decode_infer_response(reply).as_numpy("y")
    assert decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()
    assert request.parameters["p"].int64_param == 1


def test_typed_contents_are_decoded_when_a_server_sends_no_raw_bytes() -> None:
    reply = pb.ModelInferResponse()
    out = reply.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    out.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(_codec.decode_infer_response(reply).value, [[1, 2], [3, 4]])
    bad = pb.ModelInferResponse(raw_output_contents=[b"\0" * 12])
    bad.outputs.add(name="y", datatype="FP32", shape=[2, 2])
    with pytest.raises(InferenceError, match="12 raw bytes"):
        _codec.decode_infer_response(bad)
