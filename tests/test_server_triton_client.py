"""Triton's own Python client (`tritonclient.grpc`) drives the server unchanged.

tritonclient registers the same protobuf full names (`inference.*`) as nnserve's generated
code in the default descriptor pool, so it runs in a subprocess that imports only tritonclient.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import RunningServer, dense_reference

SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

url = sys.argv[1]
client = tc.InferenceServerClient(url)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("dense"),
    "missing_ready": client.is_model_ready("no_such_model"),
    "server": client.get_server_metadata(as_json=True),
    "metadata": client.get_model_metadata("multi_io", as_json=True),
    "config": client.get_model_config("dense", as_json=True),
    "index": client.get_model_repository_index(as_json=True),
}

x = np.arange(15, dtype=np.float32).reshape(5, 3) / 7
inp = tc.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("dense", [inp], outputs=[tc.InferRequestedOutput("output")], request_id="triton-1")
out["dense"] = result.as_numpy("output").tolist()
out["dense_id"] = result.get_response().id

a = np.array([[0.5, 1.5, -2.0]], dtype=np.float32)
b = np.array([[1, -2, 100]], dtype=np.int8)
inputs = [tc.InferInput("a", [1, 3], "FP32"), tc.InferInput("b", [1, 3], "INT8")]
inputs[0].set_data_from_numpy(a)
inputs[1].set_data_from_numpy(b)
result = client.infer("multi_io", inputs)
out["sum"] = result.as_numpy("sum").tolist()
out["doubled"] = result.as_numpy("doubled").tolist()

try:
    client.infer("no_such_model", [inp])
except tc.InferenceServerException as exc:
    out["error_status"] = exc.status()
    out["error_message"] = exc.message()

out["stats"] = client.get_inference_statistics("dense", as_json=True)
print(json.dumps(out))
"""


def test_triton_python_client_reads_metadata_config_statistics_index_and_infers(server: RunningServer) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, server.address], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    assert out["live"]
    assert out["ready"]
    assert out["model_ready"]
    assert not out["missing_ready"]
    assert out["server"]["name"] == "nnserve"
    assert "statistics" in out["server"]["extensions"]

    metadata = out["metadata"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "a", "datatype": "FP32", "shape": ["-1", "3"]},
                                  {"name": "b", "datatype": "INT8", "shape": ["-1", "3"]}]

    config = out["config"]["config"]
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["3"]}]
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert config["parameters"]["parameter_count"]["string_value"] == "8"

    index = {(m["name"], m.get("version", "")): m["state"] for m in out["index"]["models"]}
    assert index[("dense", "1")] == "READY"

    x = np.arange(15, dtype=np.float32).reshape(5, 3) / 7
    np.testing.assert_allclose(out["dense"], dense_reference(x), atol=1e-6)
    assert out["dense_id"] == "triton-1"
    np.testing.assert_array_equal(out["sum"], [[1.5, -0.5, 98.0]])
    np.testing.assert_array_equal(out["doubled"], [[2, -4, 200]])

    assert out["error_status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'no_such_model'" in out["error_message"]

    (stats,) = out["stats"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("dense", "1")
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    assert int(stats["inference_count"]) >= 5
