"""Helpers shared by the benchmark scripts (request bytes, ports, waiting for a server)."""

from __future__ import annotations

import socket
import time

import numpy as np


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
