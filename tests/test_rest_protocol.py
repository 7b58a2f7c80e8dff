"""The KServe v2 REST protocol and Triton's HTTP extensions against the real server, with curl-like raw requests.

Every route, JSON tensors flat and nested in every datatype the models take, Triton's binary tensor extension both
ways, request/response compression, and the errors: each malformed request gets its 4xx and a message naming what
was wrong, and never affects another request. Results are checked against independent numpy forward passes.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from nnserve.server.frontends.rest_http import BadEncoding, BodyTooLarge, decompress
from tests.conftest import (
    EXAMPLES,
    RunningServer,
    dense_reference,
    run_in_threads,
    running_server,
)
from tests.rest_requests import binary_request, call, get, post_json, v2_input

SOFTMAX = "two_layer_softmax"


@pytest.fixture(scope="module")
def rest(standard_repo: Path) -> Iterator[RunningServer]:
    with running_server(standard_repo, http_port=0, max_message_bytes=1 << 20) as running:
        yield running


@pytest.fixture(scope="module")
def port(rest: RunningServer) -> int:
    assert rest.app.http_port
    return rest.app.http_port


def softmax(x: np.ndarray) -> np.ndarray:
    return forward(load_spec(EXAMPLES / "001_two_layer_softmax.json"), x)


# -- health, metadata, config, statistics, repository --------------------------------------------------------------


def test_health_routes_answer_in_status_and_body(port: int) -> None:
    live = get(port, "/v2/health/live")
    assert (live.status, live.json()) == (200, {"live": True})
    ready = get(port, "/v2/health/ready")
    assert (ready.status, ready.json()) == (200, {"ready": True})
    model = get(port, f"/v2/models/{SOFTMAX}/ready")
    assert (model.status, model.json()) == (200, {"name": SOFTMAX, "ready": True})
    assert get(port, f"/v2/models/{SOFTMAX}/versions/1/ready").status == 200
    assert get(port, f"/v2/models/{SOFTMAX}/versions/9/ready").status == 503  # no such version: not ready
    unknown = get(port, "/v2/models/no_such_model/ready")
    assert unknown.status == 404
    assert "unknown model 'no_such_model'" in unknown.json()["error"]


def test_server_and_model_metadata(port: int) -> None:
    server = get(port, "/v2").json()
    assert server["name"] == "nnserve"
    assert {"model_repository", "model_configuration", "statistics", "schedule_policy", "binary_tensor_data"} <= set(
        server["extensions"]
    )
    meta = get(port, "/v2/models/multi_io").json()
    assert meta == {
        "name": "multi_io", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                   {"name": "b", "datatype": "INT8", "shape": [-1, 3]}],
        "outputs": [{"name": "sum", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "doubled", "datatype": "INT64", "shape": [-1, 3]}],
    }
    assert get(port, "/v2/models/versioned/versions/2").json()["versions"] == ["3", "2", "1"]
    assert get(port, "/v2/models/versioned/versions/7").status == 404


def test_model_config_is_tritons_json_with_numbers(port: int) -> None:
    config = get(port, "/v2/models/dense/config").json()
    assert config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [3]  # numbers, as perf_analyzer reads them (not protobuf's strings)
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert config["parameters"]["parameter_count"] == {"string_value": "8"}
    fixed = get(port, "/v2/models/fixed/config").json()
    assert (fixed["max_batch_size"], fixed["input"][0]["dims"]) == (0, [2, 3])


def test_statistics_are_unsigned_numbers_with_every_field(port: int) -> None:
    post_json(port, "/v2/models/dense/infer", {"inputs": [v2_input("input", np.ones((2, 3), np.float32), "FP32")]})
    every = get(port, "/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in every} >= {"dense", SOFTMAX}
    (dense,) = get(port, "/v2/models/dense/stats").json()["model_stats"]
    assert get(port, "/v2/models/dense/versions/1/stats").json()["model_stats"] == [dense]
    stats = dense["inference_stats"]
    assert set(stats) >= {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                          "cache_hit", "cache_miss"}
    assert isinstance(stats["success"]["count"], int)
    assert stats["success"]["count"] >= 1
    assert dense["inference_count"] >= 2
    assert all(isinstance(b["batch_size"], int) for b in dense["batch_stats"])
    assert get(port, "/v2/models/dense/versions/5/stats").status == 404


def test_repository_index_lists_models_and_load_is_refused_without_explicit_control(port: int) -> None:
    index = call(port, "POST", "/v2/repository/index").json()
    assert {"name": "dense", "version": "1", "state": "READY", "reason": ""} in index
    ready_only = post_json(port, "/v2/repository/index", {"ready": True}).json()
    assert all(row["state"] == "READY" for row in ready_only)
    refused = call(port, "POST", "/v2/repository/models/dense/load")
    assert refused.status == 400
    assert "--model-control explicit" in refused.json()["error"]


def test_unknown_routes_and_methods_get_a_json_error(port: int) -> None:
    missing = get(port, "/v2/nothing/here")
    assert (missing.status, missing.json()) == (404, {"error": "Not Found"})
    wrong_method = get(port, f"/v2/models/{SOFTMAX}/infer")
    assert wrong_method.status == 405
    assert "POST" in wrong_method.headers["Allow"]


# -- inference: JSON ---------------------------------------------------------------------------------------------


def test_json_infer_flat_and_nested_data_echoes_the_id_and_matches_numpy(port: int) -> None:
    x = np.array([[1.5, -0.5], [0.0, 1.0], [-2.0, 3.0]], dtype=np.float32)
    for nested in (False, True):
        reply = post_json(port, f"/v2/models/{SOFTMAX}/infer",
                          {"id": "req-7", "inputs": [v2_input("input", x, "FP32", nested=nested)]})
        assert reply.status == 200, reply.body
        assert reply.headers["Content-Type"].startswith("application/json")
        body = reply.json()
        assert (body["model_name"], body["model_version"], body["id"]) == (SOFTMAX, "1", "req-7")
        (output,) = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [3, 2])
        np.testing.assert_allclose(np.array(output["data"]).reshape(3, 2), softmax(x), rtol=1e-6, atol=1e-7)


def test_json_infer_with_several_datatypes_and_requested_outputs(port: int) -> None:
    a = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    b = np.array([[-128, 0, 127]], dtype=np.int8)
    both = post_json(port, "/v2/models/multi_io/infer",
                     {"inputs": [v2_input("a", a, "FP32"), v2_input("b", b, "INT8")]}).json()
    outputs = {o["name"]: o for o in both["outputs"]}
    np.testing.assert_allclose(outputs["sum"]["data"], (a + b.astype(np.float32)).ravel())
    assert outputs["doubled"]["data"] == (2 * b.astype(np.int64)).ravel().tolist()
    assert outputs["doubled"]["datatype"] == "INT64"
    only = post_json(port, "/v2/models/multi_io/infer", {"inputs": [v2_input("a", a, "FP32"), v2_input("b", b, "INT8")],
                                                        "outputs": [{"name": "doubled"}]}).json()
    assert [o["name"] for o in only["outputs"]] == ["doubled"]
    for model, dtype, datatype, factor in (("fp16", np.float16, "FP16", 2.0), ("fp64", np.float64, "FP64", -3.0)):
        x = np.array([[0.25, -1.5, 3.0, 8.0]], dtype=dtype)
        reply = post_json(port, f"/v2/models/{model}/infer", {"inputs": [v2_input("x", x, datatype)]})
        (out,) = reply.json()["outputs"]
        assert out["datatype"] == datatype
        np.testing.assert_allclose(np.array(out["data"], dtype=dtype), x.ravel() * factor)


def test_versions_and_unbatched_models(port: int) -> None:
    x = np.ones((1, 4), np.float32)
    for version, factor in (("1", 1.0), ("2", 2.0), ("3", 3.0)):
        body = post_json(port, f"/v2/models/versioned/versions/{version}/infer",
                         {"inputs": [v2_input("x", x, "FP32")]}).json()
        assert body["model_version"] == version
        np.testing.assert_allclose(body["outputs"][0]["data"], (x * factor).ravel())
    fixed = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)
    body = post_json(port, "/v2/models/fixed/infer", {"inputs": [v2_input("x", fixed, "FP32")]}).json()
    np.testing.assert_allclose(body["outputs"][0]["data"], np.maximum(fixed, 0).ravel())


def test_a_form_content_type_is_not_refused(port: int) -> None:
    """`curl -d` sends application/x-www-form-urlencoded; tritonclient sends none: the body decides."""
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    body = json.dumps({"inputs": [v2_input("input", x, "FP32")]}).encode()
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        reply = call(port, "POST", "/v2/models/dense/infer", body, headers)
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(reply.json()["outputs"][0]["data"], dense_reference(x).ravel(), rtol=1e-6)


def test_per_request_timing_comes_back_as_response_parameters(port: int) -> None:
    x = np.ones((2, 3), np.float32)
    body = post_json(port, "/v2/models/dense/infer",
                     {"inputs": [v2_input("input", x, "FP32")], "parameters": {"nnserve.timing": True}}).json()
    timing = body["parameters"]
    assert timing["nnserve.queue_us"] + timing["nnserve.compute_us"] <= timing["nnserve.total_us"]
    assert timing["nnserve.batch_rows"] >= 2
    assert timing["nnserve.provider"] == "CPUExecutionProvider"
    assert "parameters" not in post_json(port, "/v2/models/dense/infer",
                                         {"inputs": [v2_input("input", x, "FP32")]}).json()


# -- inference: Triton's binary tensor extension ----------------------------------------------------------------


def test_binary_inputs_and_outputs(port: int) -> None:
    x = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    document = {"inputs": [{"name": "input", "shape": [5, 3], "datatype": "FP32"}],
                "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    body, headers = binary_request(document, [x])
    reply = call(port, "POST", "/v2/models/dense/infer", body, headers)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"] == "application/octet-stream"
    header = reply.header_json()
    (output,) = header["outputs"]
    assert output["parameters"]["binary_data_size"] == 5 * 2 * 4
    assert "data" not in output
    np.testing.assert_allclose(np.frombuffer(reply.tail(), np.float32).reshape(5, 2), dense_reference(x), rtol=1e-5)


def test_binary_data_output_covers_outputs_not_named_and_json_inputs_mix_with_binary_ones(port: int) -> None:
    a = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    b = np.array([[1, 2, 3], [-4, -5, -6]], dtype=np.int8)
    document = {"inputs": [v2_input("a", a, "FP32"), {"name": "b", "shape": [2, 3], "datatype": "INT8"}],
                "outputs": [{"name": "sum", "parameters": {"binary_data": False}}, {"name": "doubled"}],
                "parameters": {"binary_data_output": True}}
    body, headers = binary_request(document, [b])
    reply = call(port, "POST", "/v2/models/multi_io/infer", body, headers)
    assert reply.status == 200, reply.body
    outputs = {o["name"]: o for o in reply.header_json()["outputs"]}
    np.testing.assert_allclose(outputs["sum"]["data"], (a + b).ravel())  # asked for JSON explicitly
    assert outputs["doubled"]["parameters"]["binary_data_size"] == 6 * 8
    np.testing.assert_array_equal(np.frombuffer(reply.tail(), np.int64), (2 * b.astype(np.int64)).ravel())


def test_a_header_length_with_pure_json_is_accepted(port: int) -> None:
    """The C++ client always sends Inference-Header-Content-Length, even when nothing binary follows."""
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    body = json.dumps({"inputs": [v2_input("input", x, "FP32")]}).encode()
    reply = call(port, "POST", "/v2/models/dense/infer", body, {"Inference-Header-Content-Length": str(len(body))})
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")


# -- compression ---------------------------------------------------------------------------------------------------


def test_gzip_and_deflate_bodies_are_accepted_and_accept_encoding_is_honoured(port: int) -> None:
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    raw = json.dumps({"inputs": [v2_input("input", x, "FP32")]}).encode()
    for encoding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        reply = call(port, "POST", "/v2/models/dense/infer", packed, {"Content-Encoding": encoding})
        assert reply.status == 200, reply.body
        np.testing.assert_allclose(reply.json()["outputs"][0]["data"], dense_reference(x).ravel(), rtol=1e-6)
    compressed = call(port, "POST", "/v2/models/dense/infer", raw, {"Accept-Encoding": "gzip"})
    assert compressed.headers.get("Content-Encoding") == "gzip"
    assert json.loads(gzip.decompress(compressed.body))["outputs"][0]["shape"] == [1, 2]
    plain = call(port, "POST", "/v2/models/dense/infer", raw)
    assert "Content-Encoding" not in plain.headers


def test_a_body_over_the_limit_is_refused_before_it_is_read_and_gzip_bombs_count_decompressed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:  # headers only: the body never comes
        raw.sendall(b"POST /v2/models/dense/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % ((1 << 20) + 1))
        answer = raw.makefile("rb").read()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-message-bytes" in rest
    bomb = gzip.compress(b" " * (8 << 20))  # 8 MiB of spaces in about 8 KiB, the limit is 1 MiB decompressed
    assert len(bomb) < 1 << 20
    exploded = call(port, "POST", "/v2/models/dense/infer", bomb, {"Content-Encoding": "gzip"})
    assert exploded.status == 413


def test_decompression_stops_at_the_limit_and_refuses_what_it_cannot_decode(port: int) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 KiB
    with pytest.raises(BodyTooLarge):
        decompress(bomb, "gzip", 1 << 20)  # zlib produces at most the limit + 1 byte before it is refused
    assert decompress(zlib.compress(b"abc"), "deflate", 10) == b"abc"
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decompress(raw_deflate.compress(b"abc") + raw_deflate.flush(), "deflate", 10) == b"abc"
    with pytest.raises(BadEncoding, match="cut short"):
        decompress(gzip.compress(b"x" * 1000)[:-12], "gzip", 10_000)
    brotli = call(port, "POST", "/v2/models/dense/infer", b"\x1b\x00", {"Content-Encoding": "br"})
    assert brotli.status == 400
    assert "Content-Encoding 'br' is not supported" in brotli.json()["error"]
    garbage = call(port, "POST", "/v2/models/dense/infer", b"not gzip at all", {"Content-Encoding": "gzip"})
    assert garbage.status == 400
    assert "not valid gzip data" in garbage.json()["error"]


# -- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "fragment"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b"{}", {}, 400, "needs 'inputs'"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32"}]}).encode(), {}, 400,
         "has no 'data'"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode(), {},
         400, "dimension 1 must be 3"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}).encode(),
         {}, 400, "has datatype FP32, but the request says FP64"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}).encode(), {},
         400, "has 2 values in 'data', but shape [1, 3] needs 3"),
        (json.dumps({"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32",
                                 "data": [[1, 2, 3], [4, 5]]}]}).encode(), {}, 400, "every row the same length"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                 "data": ["a", "b", "c"]}]}).encode(), {}, 400, "holds strings"),
        (json.dumps({"inputs": [{"name": "nope", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
         {}, 400, "unknown input 'nope' and missing input 'input'"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 12}}]}).encode(),
         {"Inference-Header-Content-Length": "10000"}, 400, "Inference-Header-Content-Length is '10000'"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 12}}]}).encode() + b"\0" * 8,
         "header", 400, "only 8 bytes of binary data are left"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 8}}]}).encode() + b"\0" * 12,
         "header", 400, "add up to 8; they must be equal"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 8}}]}).encode() + b"\0" * 8,
         "header", 400, "raw contents of input 'input' have 8 bytes, but shape [1, 3] of FP32 needs 12"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
                     "parameters": {"timeout": "soon"}}).encode(), {}, 400, "parameter 'timeout' must be"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_malformed_requests_get_400_naming_the_problem(
    port: int, body: bytes, headers: dict[str, str] | str, status: int, fragment: str
) -> None:
    if headers == "header":  # the JSON part is everything before the zero bytes
        headers = {"Inference-Header-Content-Length": str(body.index(b"\0"))}
    assert isinstance(headers, dict)
    reply = call(port, "POST", "/v2/models/dense/infer", body, headers)
    assert reply.status == status, reply.body
    assert fragment in reply.json()["error"], reply.json()


def test_integer_inputs_are_checked_for_kind_and_range(port: int) -> None:
    a = [0.5, -1.0, 2.0]
    for b, fragment in (([1.5, 2, 3], "holds numbers with fractions"), ([1, 2, 300], "outside the INT8 range"),
                        ([True, False, True], "holds booleans")):
        reply = post_json(port, "/v2/models/multi_io/infer", {"inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": a},
            {"name": "b", "shape": [1, 3], "datatype": "INT8", "data": b}]})
        assert reply.status == 400
        assert fragment in reply.json()["error"]


def test_a_malformed_body_is_refused_after_routing_and_counted_for_its_model(rest: RunningServer, port: int) -> None:
    unknown = call(port, "POST", "/v2/models/nope/infer", b"{not json")
    assert unknown.status == 404  # the model is what is wrong first
    before = dict(rest.app.repository.get("dense").stats.failures).get("invalid", 0)
    assert call(port, "POST", "/v2/models/dense/infer", b"{not json").status == 400
    assert dict(rest.app.repository.get("dense").stats.failures).get("invalid", 0) == before + 1


def test_unknown_model_is_404(port: int) -> None:
    x = np.ones((1, 3), np.float32)
    unknown = post_json(port, "/v2/models/nope/infer", {"inputs": [v2_input("input", x, "FP32")]})
    assert unknown.status == 404
    assert "unknown model 'nope'" in unknown.json()["error"]
    assert get(port, "/v2/models/nope").status == 404


def test_a_bad_request_never_fails_the_good_ones_beside_it(port: int) -> None:
    """Good and bad requests sent together to one batched model: every good one gets its own rows."""
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 3, 3)).astype(np.float32) for i in range(24)]

    def send(i: int) -> tuple[int, np.ndarray, dict[str, object]]:
        if i % 4 == 3:  # every fourth request is malformed (wrong width)
            body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        else:
            body = {"inputs": [v2_input("input", inputs[i], "FP32")]}
        reply = post_json(port, "/v2/models/dense/infer", body)
        return i, inputs[i], reply.json() | {"status": reply.status}

    counter = iter(range(24))
    results = [f.result(60) for f in run_in_threads(lambda: send(next(counter)), 24)]
    for i, x, body in results:
        if i % 4 == 3:
            assert body["status"] == 400
        else:
            assert body["status"] == 200, body
            (out,) = body["outputs"]  # type: ignore[misc]
            np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), dense_reference(x), rtol=1e-5)
