"""BYTES tensors (ONNX `tensor(string)`) on both protocols, against the real server and real clients.

Models built here with onnx.helper: `strings` (Identity, [batch, 2]) and `labels` (a mixed ai.onnx.ml
LabelEncoder model: a string and a float input, string, int64 and float outputs), plus the two string models of
ONNX's own backend tests that onnxruntime runs here. Expected strings come from the test's own reference
(`tests.conftest.label_reference`) or the backend tests' stored outputs. The malformed buffers of the v2 wire
format (each element a 4-byte little-endian length, then its bytes) get INVALID_ARGUMENT / 400 with a message
naming the input and the element; the limits name their flags; strings never leak between batched requests.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nnserve.client import AsyncInferenceClient, InferenceClient
from nnserve.client.errors import InvalidInputError as ClientInvalidInputError
from nnserve.client.errors import ServerOverloadedError
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import bytes_tensors
from nnserve.server.errors import InvalidInputError
from nnserve.server.limits import RequestLimits
from tests.conftest import (
    RunningServer,
    label_reference,
    running_server,
    scale_model,
    string_identity_model,
    string_label_model,
    write_model,
)
from tests.rest_requests import call, post_json

BACKEND_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple"
STRNORM_MODELS = (
    "test_strnorm_model_monday_casesensintive_nochangecase",
    "test_strnorm_model_nostopwords_nochangecase",
)
"""The string models of ONNX's backend tests that onnxruntime runs on this machine (the other four StringNormalizer
cases need the en_US.UTF-8 locale, which onnxruntime fails to construct here)."""
TEXT = [["plain", ""], ["größe ✓", "日本語"], ["nul\x00inside", "x" * 300]]


def length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def utf8(rows: list[list[str]]) -> np.ndarray:
    array = np.empty((len(rows), len(rows[0])), dtype=object)
    array[:] = [[text.encode() for text in row] for row in rows]
    return array


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("strings")
    write_model(root, "strings", string_identity_model(),
                config={"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 20000, "delay_mode": "fixed",
                                                    "inline_max_compute_us": 0}})
    write_model(root, "labels", string_label_model())
    unbatched = {"max_batch_size": 0, "dynamic_batching": {"enabled": False}}
    write_model(root, "strings_unbatched", string_identity_model(), config=unbatched)
    write_model(root, "scale", scale_model(np.dtype(np.float32), 2.0), config=unbatched)
    for name in STRNORM_MODELS:
        write_model(root, name.removeprefix("test_"), (BACKEND_MODELS / name / "model.onnx").read_bytes())
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    with running_server(repository, http_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def http_port(server: RunningServer) -> int:
    assert server.app.http_port
    return server.app.http_port


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[InferenceClient]:
    with InferenceClient(server.address) as sdk:
        yield sdk


def raw_request(model: str, tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s) for n, d, s, _ in tensors],
        raw_input_contents=[data for *_, data in tensors],
    )


def refusal(server: RunningServer, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        server.stub().ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details() or ""


# -- the SDK and nnserve's own gRPC ------------------------------------------------------------------------------


def test_strings_round_trip_through_the_sdk_as_bytes_and_str_arrays(client: InferenceClient) -> None:
    sent = utf8(TEXT)
    assert np.array_equal(client.infer("strings", {"text": sent}), sent)
    as_str = np.array(TEXT)  # numpy's fixed-width unicode: sent as UTF-8, answered as bytes
    assert np.array_equal(client.infer("strings", {"text": as_str}), sent)


def test_async_client_sends_and_receives_strings(server: RunningServer) -> None:
    async def run() -> np.ndarray:
        async with AsyncInferenceClient(server.address) as sdk:
            return await sdk.infer("strings", {"text": utf8(TEXT)})

    assert np.array_equal(asyncio.run(run()), utf8(TEXT))


def test_mixed_model_string_and_float_inputs_give_string_int_and_float_outputs(client: InferenceClient) -> None:
    words = ["dog", "größe", "unknown", "", "cat"]
    scores = np.arange(10, dtype=np.float32).reshape(5, 2) - 3
    outputs = client.infer("labels", {"word": np.array(words, dtype=object), "score": scores})
    ids, names, scaled = label_reference(words, scores)
    np.testing.assert_array_equal(outputs["id"], ids)
    assert [name.decode() for name in outputs["name"]] == names
    np.testing.assert_allclose(outputs["scaled"], scaled)


def test_typed_bytes_contents_are_accepted(server: RunningServer) -> None:
    elements = [text.encode() for row in TEXT for text in row]
    request = pb.ModelInferRequest(model_name="strings", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[3, 2], contents=pb.InferTensorContents(bytes_contents=elements))])
    response = server.stub().ModelInfer(request, timeout=10)
    assert response.outputs[0].datatype == "BYTES"
    assert list(response.outputs[0].shape) == [3, 2]
    assert response.raw_output_contents[0] == length_prefixed(elements)


def test_metadata_and_config_say_bytes(client: InferenceClient, server: RunningServer) -> None:
    meta = client.model_metadata("labels")
    assert [(t.name, t.datatype) for t in meta.inputs] == [("word", "BYTES"), ("score", "FP32")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("id", "INT64"), ("name", "BYTES"), ("scaled", "FP32")]
    config = server.stub().ModelConfig(pb.ModelConfigRequest(name="labels"), timeout=10).config
    assert (config.input[0].data_type, config.output[1].data_type) == (13, 13)  # TYPE_STRING


@pytest.mark.parametrize("name", STRNORM_MODELS)
def test_onnx_backend_string_models_are_served_correctly(client: InferenceClient, name: str) -> None:
    folder = BACKEND_MODELS / name
    for data_set in sorted(folder.glob("test_data_set_*")):
        given = numpy_helper.to_array(onnx.load_tensor(str(data_set / "input_0.pb")))
        expected = numpy_helper.to_array(onnx.load_tensor(str(data_set / "output_0.pb")))
        got = client.infer(name.removeprefix("test_"), {"x": given})
        assert [v.decode() for v in got.ravel()] == [str(v) for v in expected.ravel()]


# -- REST: JSON strings and the binary extension ----------------------------------------------------------------


def test_rest_json_strings_in_and_out(http_port: int) -> None:
    flat = [text for row in TEXT for text in row]
    document = {"id": "j", "inputs": [{"name": "text", "shape": [3, 2], "datatype": "BYTES", "data": TEXT}]}
    reply = post_json(http_port, "/v2/models/strings/infer", document)
    assert reply.status == 200, reply.body
    output = reply.json()["outputs"][0]
    assert (output["datatype"], output["shape"], output["data"]) == ("BYTES", [3, 2], flat)


def test_rest_binary_strings_in_and_out(http_port: int) -> None:
    elements = [text.encode() for row in TEXT for text in row]
    tail = length_prefixed(elements)
    header = json.dumps({"inputs": [{"name": "text", "shape": [3, 2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(tail)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    reply = call(http_port, "POST", "/v2/models/strings/infer", header + tail,
                 {"Inference-Header-Content-Length": str(len(header))})
    assert reply.status == 200, reply.body
    output = reply.header_json()["outputs"][0]
    assert output["parameters"]["binary_data_size"] == len(tail)
    assert reply.tail() == tail


def test_rest_mixed_model_json(http_port: int) -> None:
    words = ["cat", "bird"]
    document = {"inputs": [
        {"name": "word", "shape": [2], "datatype": "BYTES", "data": words},
        {"name": "score", "shape": [2, 2], "datatype": "FP32", "data": [1.5, -1, 0, 2]},
    ]}
    reply = post_json(http_port, "/v2/models/labels/infer", document)
    assert reply.status == 200, reply.body
    outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
    ids, names, scaled = label_reference(words, np.array([[1.5, -1], [0, 2]], dtype=np.float32))
    assert (outputs["id"], outputs["name"], outputs["scaled"]) == (ids.tolist(), names, scaled.ravel().tolist())


@pytest.mark.parametrize(("data", "message"), [
    ([["a", 1], ["b", "c"], ["d", "e"]], "element 1 in 'data' is a number; BYTES elements are strings"),
    ([["a", "b"]], "has 2 elements in 'data', but shape [3, 2] needs 6"),
    ([["a", "\ud800"], ["b", "c"], ["d", "e"]], "not valid JSON: no low surrogate"),
])
def test_rest_json_bad_strings_get_400(http_port: int, data: list[list[object]], message: str) -> None:
    document = {"inputs": [{"name": "text", "shape": [3, 2], "datatype": "BYTES", "data": data}]}
    body = json.dumps(document, ensure_ascii=True).encode()
    reply = call(http_port, "POST", "/v2/models/strings/infer", body)
    assert reply.status == 400, reply.body
    assert message in reply.json()["error"]


# -- Triton's clients ----------------------------------------------------------------------------------------------

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th

grpc_url, http_url = sys.argv[1], sys.argv[2]
rows = json.loads(sys.argv[3])
sent = np.array([[t.encode() for t in row] for row in rows], dtype=object)
out = {}
client = tg.InferenceServerClient(grpc_url)
tensor = tg.InferInput("text", list(sent.shape), "BYTES")
tensor.set_data_from_numpy(sent)
out["grpc"] = [[v.decode() for v in row] for row in client.infer("strings", [tensor]).as_numpy("same")]
words = np.array([b"dog", "größe".encode(), b"zebra"], dtype=object)
inputs = [tg.InferInput("word", [3], "BYTES"), tg.InferInput("score", [3, 2], "FP32")]
inputs[0].set_data_from_numpy(words)
inputs[1].set_data_from_numpy(np.ones((3, 2), np.float32))
result = client.infer("labels", inputs)
out["grpc_labels"] = [v.decode() for v in result.as_numpy("name")] + result.as_numpy("id").tolist()
client.close()
http = th.InferenceServerClient(http_url)
for binary in (True, False):
    tensor = th.InferInput("text", list(sent.shape), "BYTES")
    tensor.set_data_from_numpy(sent, binary_data=binary)
    result = http.infer("strings", [tensor], outputs=[th.InferRequestedOutput("same", binary_data=binary)])
    values = result.as_numpy("same")
    out[f"http_{binary}"] = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in values]
http.close()
print(json.dumps(out))
"""


def test_tritonclient_grpc_and_http_json_and_binary(server: RunningServer, http_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, server.address, f"127.0.0.1:{http_port}", json.dumps(TEXT)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["grpc"] == TEXT
    assert out["http_True"] == TEXT
    assert out["http_False"] == TEXT
    _ids, names, _ = label_reference(["dog", "größe", "zebra"], np.ones((3, 2), np.float32))
    assert out["grpc_labels"] == [*names, 1, 2, -1]


# -- malformed buffers -------------------------------------------------------------------------------------------

PREFIX = struct.Struct("<I")
MALFORMED = [
    (b"\x01\x00", "ends inside the length of element 0"),
    (PREFIX.pack(5) + b"abc", "element 0 declares 5 bytes, but only 3 are left"),
    (PREFIX.pack(0xFFFFFFFF) + b"abc", "element 0 is 4294967295 bytes long"),
    (PREFIX.pack(0x80000000) + b"a", "element 0 is 2147483648 bytes long"),  # "negative" as a signed int32
    (length_prefixed([b"a"]), "has 2 elements in shape [1, 2], but its raw contents ends after 1"),
    (length_prefixed([b"a", b"b", b"c"]), "bytes after its 2 elements"),
    (length_prefixed([b"a", b"caf\xe9"]), "element 1 is not valid UTF-8 (byte 0xe9 at offset 3)"),
    (length_prefixed([b"\xc3", b"b"]), "element 0 is not valid UTF-8"),
]


@pytest.mark.parametrize(("buffer", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_raw_strings_are_refused_on_grpc_and_http(
    server: RunningServer, http_port: int, buffer: bytes, message: str
) -> None:
    details = refusal(server, raw_request("strings", [("text", "BYTES", (1, 2), buffer)]))
    assert "BYTES input 'text'" in details
    assert message in details, details
    header = json.dumps({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(buffer)}}]}).encode()
    reply = call(http_port, "POST", "/v2/models/strings/infer", header + buffer,
                 {"Inference-Header-Content-Length": str(len(header))})
    assert reply.status == 400
    assert message in reply.json()["error"]


def test_a_bad_string_request_does_not_fail_the_others_in_its_batch(server: RunningServer) -> None:
    good = [utf8([[f"req{i}-a", f"req{i}-b"]]) for i in range(12)]

    def send(index: int) -> object:
        if index % 3 == 0:
            return refusal(server, raw_request("strings", [("text", "BYTES", (1, 2), b"\x05\x00\x00\x00ab")]))
        elements = list(good[index].ravel())
        request = raw_request("strings", [("text", "BYTES", (1, 2), length_prefixed(elements))])
        return server.stub().ModelInfer(request, timeout=30).raw_output_contents[0], length_prefixed(elements)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    for index, answer in enumerate(answers):
        if index % 3 == 0:
            assert "element 0 declares 5 bytes" in str(answer)
        else:
            got, expected = answer  # type: ignore[misc]
            assert got == expected


# -- batching ----------------------------------------------------------------------------------------------------


def test_batched_string_requests_each_get_their_own_strings(server: RunningServer, client: InferenceClient) -> None:
    before = client.model_statistics("strings")[0]
    count = 24

    def one(index: int) -> tuple[int, np.ndarray]:
        rows = 1 + index % 3
        sent = utf8([[f"r{index}.{row}.{col}-{'é' * index}" for col in range(2)] for row in range(rows)])
        return index, client.infer("strings", {"text": sent})

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    for index, got in answers:
        rows = 1 + index % 3
        assert got.shape == (rows, 2)
        assert [v.decode() for v in got.ravel()] == [
            f"r{index}.{row}.{col}-{'é' * index}" for row in range(rows) for col in range(2)]
    after = client.model_statistics("strings")[0]
    requests = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert requests >= count  # rows, at least one per request
    assert executions < count, "no two requests were batched together: the test proves nothing"


# -- limits and the byte budget ----------------------------------------------------------------------------------


def test_limits_name_their_flags(repository: Path) -> None:
    with running_server(repository, max_bytes_elements=4, max_bytes_element_size=8,
                        max_bytes_tensor_size=40) as small:
        too_many = length_prefixed([b"a"] * 6)
        assert "--max-bytes-elements" in refusal(small, raw_request("strings", [("text", "BYTES", (3, 2), too_many)]))
        too_long = length_prefixed([b"a", b"x" * 9])
        details = refusal(small, raw_request("strings", [("text", "BYTES", (1, 2), too_long)]))
        assert "element 1 is 9 bytes long" in details
        assert "--max-bytes-element-size" in details
        too_big = length_prefixed([b"x" * 8] * 4)  # 48 bytes on the wire
        details = refusal(small, raw_request("strings", [("text", "BYTES", (2, 2), too_big)]))
        assert "carries 48 bytes" in details
        assert "--max-bytes-tensor-size" in details
        typed = pb.ModelInferRequest(model_name="strings", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1, 2],
            contents=pb.InferTensorContents(bytes_contents=[b"ok", b"y" * 20]))])
        assert "--max-bytes-element-size" in refusal(small, typed)
        fits = length_prefixed([b"12345678", b""])
        answer = small.stub().ModelInfer(raw_request("strings", [("text", "BYTES", (1, 2), fits)]), timeout=10)
        assert answer.raw_output_contents[0] == fits


def test_decoded_strings_count_against_the_byte_budget(repository: Path) -> None:
    """100,000 one-byte strings are 500 kB on the wire but about 10 MB as Python strings: a 4 MiB budget refuses
    them as over budget, while a numeric tensor of the same wire size fits."""
    elements = 100_000
    with (running_server(repository, max_inflight_bytes=4 << 20, max_message_bytes=8 << 20) as budgeted,
          InferenceClient(budgeted.address, retry=None) as sdk):
        many = np.full((elements // 2, 2), b"a", dtype=object)
        with pytest.raises(ServerOverloadedError) as caught:
            sdk.infer("strings_unbatched", {"text": many})
        assert "budget" in str(caught.value)
        numbers = np.ones((elements * 5 // 16, 4), np.float32)  # FP32 of the same wire size (500 kB)
        np.testing.assert_array_equal(sdk.infer("scale", {"x": numbers}), numbers * 2)


# -- the pure decoder --------------------------------------------------------------------------------------------


def test_decoder_reports_held_bytes_far_above_the_wire_size() -> None:
    array = bytes_tensors.decode_raw("t", length_prefixed([b"a"] * 1000), (1000,), 1000, RequestLimits())
    assert list(array[:2]) == ["a", "a"]
    assert bytes_tensors.held_bytes(array) > 10 * 5 * 1000  # 5 bytes per element on the wire
    assert bytes_tensors.encode(array) == length_prefixed([b"a"] * 1000)


def test_decoder_accepts_memoryviews_and_empty_tensors() -> None:
    limits = RequestLimits()
    assert bytes_tensors.decode_raw("t", memoryview(b""), (0, 2), 0, limits).shape == (0, 2)
    view = memoryview(b"junk" + length_prefixed([b"x", b"yz"]))[4:]
    assert bytes_tensors.decode_raw("t", view, (2,), 2, limits).tolist() == ["x", "yz"]
    with pytest.raises(InvalidInputError, match=r"element 0 in contents\.bytes_contents is a number"):
        bytes_tensors.decode_elements("t", [3], (1,), 1, limits, where="contents.bytes_contents")
    with pytest.raises(InvalidInputError, match="element 1 holds a lone UTF-16 surrogate"):
        bytes_tensors.decode_elements("t", ["ok", "\ud800"], (2,), 2, limits, where="'data'")


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_infers_strings_and_lists_bytes_models(server: RunningServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nnserve", "infer", "strings", "--url", server.address, "--data",
         json.dumps([["hello", "wörld"]]), "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)["outputs"]["same"]
    assert (output["datatype"], output["data"]) == ("BYTES", [["hello", "wörld"]])
    models = subprocess.run([sys.executable, "-m", "nnserve", "models", "--url", server.address],
                            capture_output=True, text=True, timeout=60)
    assert models.returncode == 0, models.stderr
    rows = {line.split()[0]: line for line in models.stdout.splitlines() if line.strip()}
    assert "BYTES,FP32" in rows["labels"]
    assert "BYTES" in rows["strings"]


def test_sdk_refuses_mixed_object_arrays_before_sending(client: InferenceClient) -> None:
    with pytest.raises(ClientInvalidInputError, match="bytes/str for BYTES"):
        client.infer("strings", {"text": np.array([[b"a", 3]], dtype=object)})
