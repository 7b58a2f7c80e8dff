"""Hostile input against the live server: generated ModelInferRequests and raw bytes never crash it, never hang,
never come back INTERNAL or UNKNOWN, and every refusal carries a short, readable message.

Two generators feed the server (the shared in-process one over the standard repository):

* structured: a valid request for a real model, then zero or more mutations (shapes with huge, negative or
  overflowing dimensions, wrong datatypes and byte lengths, odd or megabyte-long names, extra, missing and
  duplicated tensors, typed contents in the wrong field, parameters, requested outputs, ids), or a request built
  from scratch;
* raw: random bytes and corrupted serialisations of valid requests, sent as the body of ModelInfer (and of a
  ModelStreamInfer message) through a generic call that bypasses the client's own serialisation.

The examples are derandomized, so the default suite is repeatable; `NNSERVE_FUZZ_EXAMPLES=5000
NNSERVE_FUZZ_RANDOM=1 pytest tests/test_fuzz_requests.py` explores further. The `gather` model is left out: an
index out of range is an execution failure inside onnxruntime, which is INTERNAL by design (test_server_errors).

The nastiest inputs found are kept in tests/fuzz_corpus/requests.json and replayed as plain tests below.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.server import bytes_tensors
from nnserve.server.limits import MAX_STATUS_MESSAGE_CHARS, RequestLimits
from nnserve.server.tensors import DATATYPES
from tests.conftest import RunningServer, dense_reference, infer_request, output_arrays

pytestmark = pytest.mark.timeout(120)

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus" / "requests.json"
EXAMPLES = int(os.environ.get("NNSERVE_FUZZ_EXAMPLES", "300"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("NNSERVE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
CALL_TIMEOUT_S = 10.0  # a hang shows up as DEADLINE_EXCEEDED, which fails the test
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
X = np.ones((2, 3), dtype=np.float32)


@dataclass(frozen=True)
class ModelInputs:
    name: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[str, ...]


@pytest.fixture(scope="module")
def catalogue(server: RunningServer) -> list[ModelInputs]:
    """Every model of the standard repository but `gather`, with its inputs as the server reports them."""
    stub = server.stub()
    names = sorted({m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models} - {"gather"})
    models = []
    for name in names:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
        models.append(ModelInputs(name, tuple((t.name, t.datatype, tuple(t.shape)) for t in meta.inputs),
                                  tuple(t.name for t in meta.outputs)))
    return models


@pytest.fixture(scope="module")
def fuzz_channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


class _ErrorLogs(logging.Handler):
    """Collects ERROR records from every logger while fuzzing: a traceback per hostile request is itself a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def error_logs() -> Iterator[_ErrorLogs]:
    handler = _ErrorLogs()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


# ---------------------------------------------------------------------------------------------------------------
# Strategies.

ANY_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DIMS = st.one_of(st.integers(-2, 6), st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)]), ANY_INT64)
SHAPES = st.one_of(st.lists(DIMS, max_size=5), st.lists(st.integers(0, 3), min_size=17, max_size=64))
HUGE = st.sampled_from([10_000, 100_000, 1_000_000]).map(lambda n: "n" * n)
NAMES = st.one_of(st.sampled_from(["input", "x", "a", "b", "index", "output", "y", "", " ", "../etc", "inp\x00ut"]),
                  st.text(max_size=12), HUGE)
DATATYPE_NAMES = st.one_of(st.sampled_from([*DATATYPES, "BYTES", "BF16", "fp32", "FP32 ", ""]), st.text(max_size=8),
                           HUGE)
CONTENT_FIELDS = {
    "bool_contents": st.lists(st.booleans(), max_size=16),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=16),
    "int64_contents": st.lists(ANY_INT64, max_size=16),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=16),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=16),
    "fp32_contents": st.lists(st.floats(width=32), max_size=16),
    "fp64_contents": st.lists(st.floats(), max_size=16),
    "bytes_contents": st.lists(st.binary(max_size=16), max_size=4),
}
PARAMETERS = st.dictionaries(
    st.one_of(st.text(max_size=10), HUGE),
    st.one_of(st.booleans().map(lambda v: pb.InferParameter(bool_param=v)),
              ANY_INT64.map(lambda v: pb.InferParameter(int64_param=v)),
              st.text(max_size=20).map(lambda v: pb.InferParameter(string_param=v)),
              st.floats().map(lambda v: pb.InferParameter(double_param=v))),
    max_size=4,
)


@st.composite
def valid_request(draw: st.DrawFn, models: list[ModelInputs]) -> pb.ModelInferRequest:
    """A well-formed request for a real model, raw contents drawn as random bytes (NaN, Inf, any bit pattern)."""
    model = draw(st.sampled_from(models))
    rows = draw(st.integers(1, 4))
    request = pb.ModelInferRequest(model_name=model.name, id=draw(st.text(max_size=8)))
    for name, datatype, shape in model.inputs:
        full = tuple(rows if d < 0 else d for d in shape)
        request.inputs.append(Tensor(name=name, datatype=datatype, shape=full))
        if datatype == "BYTES":  # length-prefixed elements: mostly text, sometimes any bytes (not UTF-8: refused)
            count = int(np.prod(full))
            element = st.one_of(st.text(max_size=12).map(str.encode), st.binary(max_size=12))
            elements = draw(st.lists(element, min_size=count, max_size=count))
            request.raw_input_contents.append(b"".join(len(e).to_bytes(4, "little") + e for e in elements))
            continue
        size = int(np.prod(full)) * DATATYPES[datatype].itemsize
        request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    if draw(st.booleans()):
        request.outputs.extend(Output(name=o) for o in draw(st.permutations(model.outputs)))
    return request


def _mutate(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """One random change to a request (in place)."""
    kind = draw(st.sampled_from([
        "shape", "datatype", "name", "raw_length", "drop_input", "extra_input", "duplicate", "raw_count", "contents",
        "parameters", "outputs", "id", "model", "version", "many_inputs",
    ]))
    tensors = request.inputs
    index = draw(st.integers(0, max(len(tensors) - 1, 0)))
    if kind == "shape" and tensors:
        tensors[index].shape[:] = draw(SHAPES)
    elif kind == "datatype" and tensors:
        tensors[index].datatype = draw(DATATYPE_NAMES)
    elif kind == "name" and tensors:
        tensors[index].name = draw(NAMES)
    elif kind == "raw_length" and request.raw_input_contents:
        at = draw(st.integers(0, len(request.raw_input_contents) - 1))
        data = request.raw_input_contents[at]
        cut = draw(st.integers(-8, 8))
        request.raw_input_contents[at] = data[:cut] if cut < 0 else data + bytes(cut)
    elif kind == "drop_input" and tensors:
        del tensors[index]
    elif kind == "extra_input":
        tensors.append(Tensor(name=draw(NAMES), datatype=draw(DATATYPE_NAMES), shape=draw(SHAPES)))
    elif kind == "duplicate" and tensors:
        tensors.append(tensors[index])
        if index < len(request.raw_input_contents):
            request.raw_input_contents.append(request.raw_input_contents[index])
    elif kind == "raw_count":
        if request.raw_input_contents and draw(st.booleans()):
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(draw(st.binary(max_size=32)))
    elif kind == "contents" and tensors:
        field = draw(st.sampled_from(sorted(CONTENT_FIELDS)))
        getattr(tensors[index].contents, field).extend(draw(CONTENT_FIELDS[field]))
        if draw(st.booleans()):
            del request.raw_input_contents[:]
    elif kind == "parameters":
        target = request.parameters if draw(st.booleans()) or not tensors else tensors[index].parameters
        for key, value in draw(PARAMETERS).items():
            target[key].CopyFrom(value)
    elif kind == "outputs":
        request.outputs.extend(Output(name=n) for n in draw(st.lists(NAMES, max_size=3)))
        if draw(st.integers(0, 9)) == 0:
            request.outputs.extend(Output(name="output") for _ in range(draw(st.integers(65, 5000))))
    elif kind == "id":
        request.id = draw(st.one_of(st.text(max_size=30), HUGE))
    elif kind == "model":
        request.model_name = draw(NAMES)
    elif kind == "version":
        request.model_version = draw(st.one_of(st.sampled_from(["1", "2", "0", "-1", "1e3", "9" * 30, " 1"]),
                                               st.text(max_size=6)))
    elif kind == "many_inputs" and tensors:
        # Copies of a small tensor: copies of a megabyte-long name would build a gigabyte request in the test.
        small = Tensor(name=tensors[index].name[:16], datatype=tensors[index].datatype[:8], shape=[1, 3])
        tensors.extend(small for _ in range(draw(st.integers(65, 20_000))))


@st.composite
def hostile_request(draw: st.DrawFn, models: list[ModelInputs]) -> pb.ModelInferRequest:
    if draw(st.integers(0, 9)) == 0:  # from scratch: nothing valid to start from
        request = pb.ModelInferRequest(model_name=draw(st.one_of(st.sampled_from([m.name for m in models]), NAMES)))
        for _ in range(draw(st.integers(0, 3))):
            request.inputs.append(Tensor(name=draw(NAMES), datatype=draw(DATATYPE_NAMES), shape=draw(SHAPES)))
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        return request
    request = draw(valid_request(models))
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, request)
    return request


# ---------------------------------------------------------------------------------------------------------------
# Checks.


def check_answer(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str, Any]:
    """Send and classify; fail on a forbidden status, a missing, long or native-looking message, or a slow answer."""
    started = time.monotonic()
    try:
        reply = call(*args, timeout=CALL_TIMEOUT_S, **kwargs)
    except grpc.RpcError as error:
        code, details, reply = error.code(), error.details() or "", None
    else:
        code, details = grpc.StatusCode.OK, ""
    elapsed = time.monotonic() - started
    assert code not in NEVER, f"{code}: {details[:500]}"
    assert elapsed < 5.0, f"{code} after {elapsed:.1f} s"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{code} without a message"
        assert len(details) <= MAX_STATUS_MESSAGE_CHARS
        for native in ("Traceback", "ONNXRuntimeError", "Unexpected <class", "onnxruntime_src"):
            assert native not in details, details
    return code, details, reply


def check_response(response: pb.ModelInferResponse) -> None:
    """A successful answer is self-consistent: one raw entry per output, of exactly its shape's size."""
    assert len(response.outputs) == len(response.raw_output_contents)
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        count = int(np.prod(tuple(tensor.shape)))
        if tensor.datatype == "BYTES":
            assert bytes_tensors.decode_raw(tensor.name, raw, tuple(tensor.shape), count, RequestLimits()).size == count
        else:
            assert len(raw) == count * DATATYPES[tensor.datatype].itemsize


def assert_still_serves(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(infer_request("dense", {"input": X}), timeout=10)
    np.testing.assert_allclose(output_arrays(response)["output"], dense_reference(X), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Property tests.


def test_generated_requests_never_crash_hang_or_fail_internally(
    catalogue: list[ModelInputs], fuzz_channel: grpc.Channel, error_logs: _ErrorLogs
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(fuzz_channel)
    seen: dict[grpc.StatusCode, int] = {}

    @FUZZ_SETTINGS
    @given(request=hostile_request(catalogue))
    def probe(request: pb.ModelInferRequest) -> None:
        code, _details, reply = check_answer(stub.ModelInfer, request)
        seen[code] = seen.get(code, 0) + 1
        if reply is not None:
            check_response(reply)
            assert reply.id == request.id

    probe()
    assert_still_serves(stub)
    assert not error_logs.records, [r.getMessage()[:300] for r in error_logs.records[:3]]
    # The generator reaches both sides of validation, so the property is not vacuous.
    assert seen.get(grpc.StatusCode.OK, 0) > 0, seen
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0, seen


@st.composite
def raw_bodies(draw: st.DrawFn, models: list[ModelInputs]) -> bytes:
    """Random bytes, or a valid request's serialisation truncated or with bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=512))
    data = bytearray(draw(valid_request(models)).SerializeToString())
    if data and draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def test_random_bytes_as_the_request_body_are_refused_cleanly(
    catalogue: list[ModelInputs], fuzz_channel: grpc.Channel, error_logs: _ErrorLogs
) -> None:
    unary = fuzz_channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                     response_deserializer=None)
    metadata = fuzz_channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata", request_serializer=None,
                                        response_deserializer=None)
    stream = fuzz_channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                        response_deserializer=None)
    undecodable = 0

    @FUZZ_SETTINGS
    @given(body=raw_bodies(catalogue))
    def probe(body: bytes) -> None:
        nonlocal undecodable
        code, details, _ = check_answer(unary, body)
        if "not a valid protobuf message" in details:
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            undecodable += 1
        check_answer(metadata, body)
        check_answer(lambda b, **kw: list(stream(iter([b]), **kw)), body)

    probe()
    assert undecodable > 0  # the generator does produce bytes that are not a message
    assert_still_serves(pb_grpc.GRPCInferenceServiceStub(fuzz_channel))
    assert not error_logs.records, [r.getMessage()[:300] for r in error_logs.records[:3]]


# ---------------------------------------------------------------------------------------------------------------
# The regression corpus: the nastiest inputs, replayed as plain tests.


def _corpus() -> list[dict[str, Any]]:
    return json.loads(CORPUS.read_text())["cases"]


def _build(case: dict[str, Any]) -> bytes:
    """A corpus case's request body: `body_hex` as is, or `request` (protobuf JSON) with `huge` fields blown up."""
    if "body_hex" in case:
        return bytes.fromhex(case["body_hex"])
    request = json_format.ParseDict(case["request"], pb.ModelInferRequest())
    for blow_up in case.get("huge", []):
        value: Any = blow_up["char"] * blow_up["length"] if "char" in blow_up else None
        target: Any = request
        *path, last = blow_up["path"].split(".")
        for part in path:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        if "repeat" in blow_up:
            repeated = getattr(target, last)
            item = repeated[0]
            for _ in range(blow_up["repeat"]):
                repeated.append(item) if isinstance(item, bytes | str | int | float) else repeated.add().CopyFrom(item)
        elif last.isdigit():
            target[int(last)] = value
        else:
            setattr(target, last, value)
    for entry in case.get("raw_f32", []):
        request.raw_input_contents.append(np.asarray(entry, dtype=np.float32).tobytes())
    for text in case.get("raw_hex", []):
        request.raw_input_contents.append(bytes.fromhex(text))
    return request.SerializeToString()


@pytest.mark.parametrize("case", _corpus(), ids=lambda case: case["id"])
def test_regression_corpus_case_gets_its_expected_status(fuzz_channel: grpc.Channel, case: dict[str, Any]) -> None:
    body = _build(case)
    method = case.get("method", "ModelInfer")
    if method == "ModelStreamInfer":
        stream = fuzz_channel.stream_stream(f"/inference.GRPCInferenceService/{method}", request_serializer=None,
                                            response_deserializer=pb.ModelStreamInferResponse.FromString)
        code, details, replies = check_answer(lambda b, **kw: list(stream(iter([b]), **kw)), body)
        if replies:
            details = replies[0].error_message
    else:
        unary = fuzz_channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=None,
                                         response_deserializer=pb.ModelInferResponse.FromString)
        code, details, reply = check_answer(unary, body)
        if reply is not None:
            check_response(reply)
    assert code.name == case["expect"], details
    assert case.get("message", "") in details
    assert_still_serves(pb_grpc.GRPCInferenceServiceStub(fuzz_channel))


def test_corpus_file_is_well_formed() -> None:
    cases = _corpus()
    assert len({c["id"] for c in cases}) == len(cases)
    for case in cases:
        assert case["why"]
        assert ("body_hex" in case) != ("request" in case), case["id"]
        assert case["expect"] in grpc.StatusCode.__members__
        base64.b64encode(_build(case))  # builds
