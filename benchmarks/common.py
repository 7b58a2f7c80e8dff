"""Helpers shared by the benchmark scripts (request bytes, ports, waiting for a server, running another checkout)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

CHECKOUT_BOOTSTRAP = """
import importlib.util, runpy, sys
from pathlib import Path
root = Path(sys.argv.pop(1))
folders = {"nnserve": "cli", "nnserve.builder": "builder", "nnserve.server": "server", "nnserve.client": "client",
           "nnserve.protos": "protos"}
class Checkout:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in folders:
            return None
        folder = root / folders[name]
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
sys.meta_path.insert(0, Checkout)
sys.argv[0] = "nnserve"
runpy.run_module("nnserve", run_name="__main__")
"""
"""`python -c CHECKOUT_BOOTSTRAP DIR ARGS...` runs `nnserve ARGS...` from the source folders of checkout DIR."""


def infer_request_bytes(model: str, input_name: str, x: np.ndarray) -> bytes:
    """A serialized KServe v2 ModelInferRequest carrying `x` as raw FP32 contents (built once per run)."""
    from nnserve.protos import grpc_service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32", shape=list(x.shape))
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])
    return request.SerializeToString()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 60.0) -> None:
    """Until a TCP connect succeeds (the gRPC readiness is checked by the caller with a real RPC)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop_process_group(process: subprocess.Popen[Any] | None, grace_s: float = 30) -> None:
    """SIGTERM a server started with `start_new_session=True` and its process group (the workers or peers it
    started), SIGKILL what outlives `grace_s`."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def save_results(result: dict[str, Any], out: Path | None, default: Path) -> Path:
    """Write a run's results as JSON to `out` (or `default`), creating its folder; the path written."""
    path = out or default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
