"""Triton's own HTTP client (`tritonclient.http`, sync and asyncio) drives the REST frontend unchanged.

It runs in a subprocess (as in tests/test_server_triton_client.py): tritonclient's HTTP client is built on gevent,
which should not share a process with the test's threads. Both JSON and binary tensors, requested outputs, ids,
metadata, config, statistics, readiness and errors; values checked against numpy here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nnserve.builder import load_spec
from nnserve.builder.reference import forward
from tests.conftest import EXAMPLES, RunningServer, dense_reference, running_server

SCRIPT = r"""
import asyncio, json, sys
import numpy as np
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

url = sys.argv[1]
client = th.InferenceServerClient(url)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("dense"),
    "missing_ready": client.is_model_ready("no_such_model"),
    "server": client.get_server_metadata(),
    "metadata": client.get_model_metadata("multi_io"),
    "config": client.get_model_config("dense"),
    "index": client.get_model_repository_index(),
}

x = np.arange(15, dtype=np.float32).reshape(5, 3) / 7
for binary in (True, False):
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("dense", [inp], outputs=[th.InferRequestedOutput("output", binary_data=binary)],
                          request_id=f"triton-http-{binary}")
    out[f"dense_{binary}"] = result.as_numpy("output").tolist()
    out[f"dense_id_{binary}"] = result.get_response()["id"]

a = np.array([[0.5, 1.5, -2.0]], dtype=np.float32)
b = np.array([[1, -2, 100]], dtype=np.int8)
inputs = [th.InferInput("a", [1, 3], "FP32"), th.InferInput("b", [1, 3], "INT8")]
inputs[0].set_data_from_numpy(a)
inputs[1].set_data_from_numpy(b, binary_data=False)
result = client.infer("multi_io", inputs)  # no outputs named: every output, binary by default
out["sum"] = result.as_numpy("sum").tolist()
out["doubled"] = result.as_numpy("doubled").tolist()
out["doubled_dtype"] = str(result.as_numpy("doubled").dtype)

h = np.array([[0.5, -1.0, 2.0, 4.0]], dtype=np.float16)
inp = th.InferInput("x", [1, 4], "FP16")
inp.set_data_from_numpy(h)
out["fp16"] = client.infer("fp16", [inp]).as_numpy("y").astype(float).tolist()

out["stats"] = client.get_inference_statistics("dense")

try:
    bad = th.InferInput("input", [1, 2], "FP32")
    bad.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    client.infer("dense", [bad])
    out["error"] = None
except InferenceServerException as exc:
    out["error"] = [exc.status(), exc.message()]
try:
    client.get_model_metadata("no_such_model")
    out["missing_error"] = None
except InferenceServerException as exc:
    out["missing_error"] = [exc.status(), exc.message()]
client.close()

async def async_calls():
    aclient = tha.InferenceServerClient(url)
    try:
        inp = tha.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = await aclient.infer("dense", [inp], outputs=[tha.InferRequestedOutput("output")])
        return {"ready": await aclient.is_model_ready("dense"), "dense": result.as_numpy("output").tolist()}
    finally:
        await aclient.close()

out["async"] = asyncio.run(async_calls())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def rest(standard_repo: Path) -> Iterator[RunningServer]:
    with running_server(standard_repo, http_port=0) as running:
        yield running


def test_tritonclient_http_sync_and_async_json_and_binary(rest: RunningServer) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, f"127.0.0.1:{rest.app.http_port}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert (out["live"], out["ready"], out["model_ready"], out["missing_ready"]) == (True, True, True, False)
    assert out["server"]["name"] == "nnserve"
    assert [i["name"] for i in out["metadata"]["inputs"]] == ["a", "b"]
    assert out["config"]["max_batch_size"] == 8
    assert {"name": "dense", "version": "1", "state": "READY", "reason": ""} in out["index"]

    x = np.arange(15, dtype=np.float32).reshape(5, 3) / 7
    for binary in ("True", "False"):
        np.testing.assert_allclose(out[f"dense_{binary}"], dense_reference(x), rtol=1e-5, atol=1e-6)
        assert out[f"dense_id_{binary}"] == f"triton-http-{binary}"
    a = np.array([[0.5, 1.5, -2.0]], dtype=np.float32)
    b = np.array([[1, -2, 100]], dtype=np.int8)
    np.testing.assert_allclose(out["sum"], a + b)
    assert out["doubled"] == (2 * b.astype(np.int64)).tolist()
    assert out["doubled_dtype"] == "int64"
    np.testing.assert_allclose(out["fp16"], [[1.0, -2.0, 4.0, 8.0]])
    (stats,) = out["stats"]["model_stats"]
    assert stats["name"] == "dense"
    assert stats["inference_stats"]["success"]["count"] >= 2  # the two dense requests before it
    status, message = out["error"]
    assert "400" in str(status)
    assert "dimension 1 must be 3" in message
    assert "404" in str(out["missing_error"][0])
    assert "unknown model 'no_such_model'" in out["missing_error"][1]
    assert out["async"]["ready"] is True
    np.testing.assert_allclose(out["async"]["dense"], dense_reference(x), rtol=1e-5, atol=1e-6)


def test_softmax_network_over_http_matches_the_document(rest: RunningServer) -> None:
    """Document 001's 2-3-2 network through tritonclient.http, against the builder's numpy forward pass."""
    script = (
        "import sys, json, numpy as np, tritonclient.http as th\n"
        "c = th.InferenceServerClient(sys.argv[1])\n"
        "i = th.InferInput('input', [1, 2], 'FP32'); i.set_data_from_numpy(np.array([[1.5, -0.5]], np.float32))\n"
        "print(json.dumps(c.infer('two_layer_softmax', [i]).as_numpy('probabilities').tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{rest.app.http_port}"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(done.stdout))
    expected = forward(load_spec(EXAMPLES / "001_two_layer_softmax.json"), np.array([[1.5, -0.5]], np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got, [[0.538, 0.463]], atol=1e-3)  # the document's worked numbers
