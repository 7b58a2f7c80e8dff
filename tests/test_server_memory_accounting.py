"""The pieces under the in-flight byte budget, alone: the budget's arithmetic, the container's memory limit read from
prepared cgroup files, the derived defaults, and the ModelInfer codecs that keep a large request's tensor in one copy.

The codecs are checked against protobuf itself: whatever the field order, a request parsed with its raw inputs as
views reads exactly as protobuf parses it, and a response written from its arrays parses back to the message
protobuf would have built.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from nnserve.client import retry
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server.errors import OverBudgetError, QueueFullError, RequestTooLargeError
from nnserve.server.frontends.grpc_payload import (
    ZERO_COPY_MIN_BYTES,
    ParsedInferRequest,
    RawInferResponse,
    parse_infer_request,
    serialize_infer_response,
)
from nnserve.server.inflight_budget import (
    FLOOR_BYTES,
    TOO_LARGE_FOR_BUDGET,
    InflightBudget,
    default_limit,
    format_bytes,
    transport_limits,
)
from nnserve.server.memory_limit import cgroup_memory_limit, container_memory, host_memory

MiB = 1 << 20
GiB = 1 << 30


# -- the budget --------------------------------------------------------------------------------------------------


def test_a_reservation_that_does_not_fit_is_refused_and_takes_nothing() -> None:
    budget = InflightBudget(100 * MiB)
    budget.reserve(60 * MiB)
    with pytest.raises(OverBudgetError, match=r"60.0 MiB of 100.0 MiB held .*needs 50.0 MiB: retry") as refused:
        budget.reserve(50 * MiB)
    assert isinstance(refused.value, QueueFullError)  # the frontends' full-queue path: retry hint, 429
    assert budget.used == 60 * MiB
    budget.reserve(40 * MiB)  # exactly full is allowed
    budget.release(100 * MiB)
    assert (budget.used, budget.peak) == (0, 100 * MiB)


def test_a_request_larger_than_the_whole_budget_says_it_can_never_fit_and_the_sdk_does_not_retry_it() -> None:
    budget = InflightBudget(32 * MiB)
    with pytest.raises(RequestTooLargeError) as refused:
        budget.reserve(33 * MiB)
    assert not isinstance(refused.value, QueueFullError)  # no retry hint: waiting does not help
    assert TOO_LARGE_FOR_BUDGET in str(refused.value)
    assert "--max-inflight-bytes" in str(refused.value)
    assert retry._BUDGET_TOO_LARGE == TOO_LARGE_FOR_BUDGET  # the SDK recognises the server's message
    assert budget.used == 0


def test_grown_bytes_are_never_refused_but_keep_new_requests_out_until_released() -> None:
    budget = InflightBudget(10 * MiB)
    budget.reserve(8 * MiB)
    budget.grow(6 * MiB)  # outputs larger than their estimate: the work is done, so it is counted, never refused
    assert budget.used == 14 * MiB
    with pytest.raises(OverBudgetError):
        budget.reserve(1)
    budget.release(14 * MiB)
    budget.reserve(1)


def test_byte_counts_read_for_people() -> None:
    assert [format_bytes(n) for n in (512, 12 * MiB, 3 * GiB + GiB // 2)] == ["512 B", "12.0 MiB", "3.50 GiB"]


# -- the container's memory ------------------------------------------------------------------------------------


def _cgroups(tmp_path: Path, lines: str) -> Path:
    proc = tmp_path / "proc_cgroup"
    proc.write_text(lines)
    return proc


def test_cgroup_v2_memory_max_is_the_tightest_along_the_path(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (root / "kubepods" / "memory.max").write_text("max\n")
    (root / "kubepods" / "pod1" / "memory.max").write_text(f"{3 * GiB}\n")
    (root / "kubepods" / "pod1" / "ctr" / "memory.max").write_text(f"{4 * GiB}\n")  # a child cannot exceed its pod
    proc = _cgroups(tmp_path, "0::/kubepods/pod1/ctr\n")
    assert cgroup_memory_limit(root, proc) == (3 * GiB, "cgroup memory.max")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {64 * GiB // 1024} kB\nMemFree: 1 kB\n")
    limit = container_memory(root, proc, meminfo)
    assert (limit.bytes, limit.source) == (3 * GiB, "cgroup memory.max")


def test_cgroup_v1_limit_in_bytes_counts_and_its_huge_no_limit_value_does_not(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    proc = _cgroups(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n0::/\n")
    assert cgroup_memory_limit(root, proc) == (GiB, "cgroup v1 memory.limit_in_bytes")
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(root, proc) is None


def test_without_a_cgroup_limit_the_host_memory_counts_and_a_limit_above_it_is_none(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    (root / "memory.max").write_text(f"{128 * GiB}\n")
    proc = _cgroups(tmp_path, "0::/\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {16 * GiB // 1024} kB\n")
    limit = container_memory(root, proc, meminfo)
    assert (limit.bytes, limit.source) == (16 * GiB, "host MemTotal")
    assert container_memory(root, tmp_path / "missing", meminfo).bytes == 16 * GiB
    assert host_memory(tmp_path / "missing") is None
    real, pages = host_memory(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert real is not None
    assert 0.8 * pages <= real <= pages


def test_the_default_budget_is_half_of_what_the_models_leave_with_a_floor_and_a_share_per_worker() -> None:
    assert default_limit(4 * GiB, 1 * GiB) == 3 * GiB // 2
    assert default_limit(4 * GiB, 1 * GiB, workers=2) == GiB // 2  # (2 GiB each - 1 GiB resident) / 2
    assert default_limit(1 * GiB, 1 * GiB) == FLOOR_BYTES  # the models fill the container: small requests still go


@pytest.mark.parametrize(("memory", "message", "streams"), [
    (GiB, int(2.56 * MiB), 100),
    (4 * GiB, int(10.24 * MiB), 100),
    (16 * GiB, int(40.96 * MiB), 100),
    (64 * GiB, 64 * MiB, 256),
    (512 * GiB, 64 * MiB, 1024),
    (256 * MiB, 1 * MiB, 100),  # the 1 MiB floor: the product passes the quarter only in containers this small
])
def test_derived_transport_limits_keep_a_connections_messages_within_a_quarter_of_the_memory(
    memory: int, message: int, streams: int
) -> None:
    got_message, got_streams = transport_limits(memory, None, None)
    assert abs(got_message - message) <= 1024
    assert got_streams == streams
    if memory >= 400 * MiB:
        assert got_message * got_streams <= memory // 4


def test_explicit_transport_limits_stay_and_an_explicit_message_size_lowers_the_derived_stream_count() -> None:
    assert transport_limits(4 * GiB, 8 * MiB, 16) == (8 * MiB, 16)
    assert transport_limits(64 * GiB, MiB, None) == (MiB, 1024)
    assert transport_limits(64 * GiB, 64 * MiB, None, workers=4) == (64 * MiB, 100)  # the floor of 100 streams


# -- ModelInfer's codecs ----------------------------------------------------------------------------------------


def _request(rows: int, cols: int, *, typed: bool = False) -> pb.ModelInferRequest:
    rng = np.random.default_rng(rows * cols)
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    b = rng.integers(-100, 100, (rows, 3)).astype(np.int8)
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="req-7", outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="y")])
    request.parameters["timeout"].int64_param = 5000
    request.parameters["nnserve.timing"].bool_param = True
    for name, array, datatype in (("a", a, "FP32"), ("b", b, "INT8")):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if typed and datatype == "FP32":
            tensor.contents.fp32_contents.extend(array.reshape(-1).tolist())
    if not typed:
        request.raw_input_contents.extend([a.tobytes(), b.tobytes()])
    return request


def _same(parsed: pb.ModelInferRequest | ParsedInferRequest, expected: pb.ModelInferRequest) -> None:
    for field in ("model_name", "model_version", "id"):
        assert getattr(parsed, field) == getattr(expected, field)
    assert list(parsed.inputs) == list(expected.inputs)
    assert list(parsed.outputs) == list(expected.outputs)
    assert dict(parsed.parameters) == dict(expected.parameters)
    assert [bytes(r) for r in parsed.raw_input_contents] == list(expected.raw_input_contents)


def test_a_large_request_is_parsed_with_its_raw_inputs_as_views_of_the_received_bytes() -> None:
    expected = _request(256, 512)
    data = expected.SerializeToString()
    assert len(data) >= ZERO_COPY_MIN_BYTES
    parsed = parse_infer_request(data)
    assert isinstance(parsed, ParsedInferRequest)
    _same(parsed, expected)
    assert all(isinstance(r, memoryview) and r.obj is data for r in parsed.raw_input_contents)  # no copy
    assert len(data) <= parsed.wire_bytes < len(data) + 1024
    view = np.frombuffer(parsed.raw_input_contents[0], dtype=np.float32)
    assert view.base is not None
    assert not view.flags.owndata


def test_field_order_and_repeated_fields_do_not_matter_to_the_split_parse() -> None:
    expected = _request(128, 512)
    pieces = [pb.ModelInferRequest(raw_input_contents=[expected.raw_input_contents[0]]).SerializeToString(),
              pb.ModelInferRequest(model_name="m", inputs=[expected.inputs[0]]).SerializeToString(),
              pb.ModelInferRequest(raw_input_contents=[expected.raw_input_contents[1]]).SerializeToString(),
              pb.ModelInferRequest(model_version="2", id="req-7", inputs=[expected.inputs[1]],
                                   outputs=expected.outputs).SerializeToString()]
    extra = pb.ModelInferRequest()
    for key in ("timeout", "nnserve.timing"):
        extra.parameters[key].CopyFrom(expected.parameters[key])
    data = b"".join([*pieces, extra.SerializeToString()])  # raw entries first and between the other fields
    assert pb.ModelInferRequest.FromString(data) == expected
    parsed = parse_infer_request(data)
    assert isinstance(parsed, ParsedInferRequest)
    _same(parsed, expected)


def test_typed_contents_and_small_requests_take_protobufs_own_path_unchanged() -> None:
    small = _request(2, 4)
    assert type(parse_infer_request(small.SerializeToString())) is pb.ModelInferRequest
    typed = _request(256, 256, typed=True)
    parsed = parse_infer_request(typed.SerializeToString())
    _same(parsed, typed)
    assert list(parsed.inputs[0].contents.fp32_contents) == list(typed.inputs[0].contents.fp32_contents)


@pytest.mark.parametrize("cut", [1, 7, 1000, -3])
def test_a_truncated_or_corrupt_large_message_is_refused_as_protobuf_refuses_it(cut: int) -> None:
    data = _request(256, 512).SerializeToString()
    broken = data[:cut] + b"\xff" * 8 + data[cut + 8:] if cut > 0 else data[:cut]
    try:
        pb.ModelInferRequest.FromString(broken)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(broken)
    else:  # protobuf accepts it: so must the split parse, with the same contents
        _same(parse_infer_request(broken), pb.ModelInferRequest.FromString(broken))


def test_a_message_of_very_many_small_fields_is_left_to_protobuf() -> None:
    request = _request(64, 512)
    request.outputs.extend(pb.ModelInferRequest.InferRequestedOutputTensor(name=f"o{i}") for i in range(5000))
    parsed = parse_infer_request(request.SerializeToString())
    assert type(parsed) is pb.ModelInferRequest
    assert parsed == request


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.bool_])
def test_a_response_written_from_its_arrays_parses_as_the_message_protobuf_builds(dtype: type) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((300, 70)).astype(dtype), np.asfortranarray(rng.standard_normal((5, 3))),
              np.zeros((0, 4), np.float32), rng.standard_normal((64, 10))[::2]]  # non-contiguous views too
    header = pb.ModelInferResponse(model_name="m", model_version="1", id="x", outputs=[
        pb.ModelInferResponse.InferOutputTensor(name=f"y{i}", datatype="FP32", shape=a.shape)
        for i, a in enumerate(arrays)])
    header.parameters["nnserve.total_us"].int64_param = 12
    expected = pb.ModelInferResponse()
    expected.CopyFrom(header)
    expected.raw_output_contents.extend(np.ascontiguousarray(a).tobytes() for a in arrays)
    response = RawInferResponse(header, arrays)
    assert pb.ModelInferResponse.FromString(serialize_infer_response(response)) == expected
    assert response.arrays == ()  # dropped once written: only the bytes are left to send
    assert serialize_infer_response(expected) == expected.SerializeToString()
