"""The benchmark's transport ceiling (and nnserve's stack floor, `--typed`) answers like a model server: each flavour
of `benchmarks/echo_server.py` returns the request's tensor as a valid ModelInferResponse, so every client (the SDK
here) measures it exactly as it measures nnserve. The uvloop flavour needs uvloop, which only the benchmark
installs, so it is covered where uvloop imports.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nnserve.client import InferenceClient
from tests.conftest import start_server_process

ECHO_SERVER = Path(__file__).resolve().parent.parent / "benchmarks" / "echo_server.py"
FLAVOURS = [[], ["--threads", "4"], ["--typed"]] + ([["--uvloop"]] if importlib.util.find_spec("uvloop") else [])


@pytest.fixture(params=FLAVOURS, ids=lambda flags: " ".join(flags) or "asyncio")
def echo_address(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The echo server on a free port it reports, awaited on its health service like every server in the suite."""
    port_file = tmp_path / "echo.ports.json"
    command = [sys.executable, str(ECHO_SERVER), "--port", "0", "--port-file", str(port_file), "--model", "echo",
               "--width", "3", *request.param]
    with start_server_process(command, tmp_path / "echo.log", port_file) as running:
        yield running.address
        running.terminate()
        running.process.wait(timeout=30)


def test_echo_server_returns_the_request_tensor_as_the_response(echo_address: str) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    with InferenceClient(echo_address, timeout=10) as client:
        got = client.infer("echo", {"input": x})
        metadata = client.model_metadata("echo")
    np.testing.assert_array_equal(got, x)
    assert [list(t.shape) for t in metadata.inputs] == [[-1, 3]]
