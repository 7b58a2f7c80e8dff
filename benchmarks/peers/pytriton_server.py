"""Triton Inference Server's core (through PyTriton) serving ONNX models with onnxruntime in Python callables.

Triton's dynamic batcher merges requests; the callable runs the merged batch. Runs in the benchmark's PyTriton
virtual environment: `python pytriton_server.py MODEL.onnx NAME GRPC_PORT HTTP_PORT METRICS_PORT [NAME2=MODEL2.onnx
...]` (every model on the same server). onnxruntime gets one intra-op thread per CPU this process may use, as
nnserve's sessions do, so that a server pinned to one core does not run two threads on it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def session_of(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bind(triton: Triton, name: str, path: str) -> None:
    session = session_of(path)
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    width_in = int(session.get_inputs()[0].shape[1])
    width_out = int(session.get_outputs()[0].shape[1])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (y,) = session.run(None, {input_name: inputs[input_name]})
        return {output_name: y}

    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=input_name, dtype=np.float32, shape=(width_in,))],
        outputs=[Tensor(name=output_name, dtype=np.float32, shape=(width_out,))],
        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=100)),
        strict=False,
    )


def main() -> None:
    path, name, grpc_port, http_port, metrics_port = sys.argv[1:6]
    models = {name: path} | dict(arg.split("=", 1) for arg in sys.argv[6:])
    config = TritonConfig(grpc_port=int(grpc_port), http_port=int(http_port), metrics_port=int(metrics_port),
                          grpc_address="127.0.0.1", http_address="127.0.0.1")
    # PyTriton protects the statistics and repository RPCs with a generated token by default; perf_analyzer needs
    # ModelStatistics, and nothing but this benchmark reaches the loopback server.
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        for model_name, model_path in models.items():
            bind(triton, model_name, model_path)
        triton.serve()


if __name__ == "__main__":
    main()
