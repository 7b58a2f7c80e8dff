"""Triton Inference Server's core (through PyTriton) serving an ONNX model with onnxruntime in a Python callable.

Triton's dynamic batcher merges requests; the callable runs the merged batch. Runs in the benchmark's PyTriton
virtual environment: `python pytriton_server.py MODEL.onnx NAME GRPC_PORT HTTP_PORT METRICS_PORT`.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def main() -> None:
    path, name, grpc_port, http_port, metrics_port = sys.argv[1:6]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    width_in = int(session.get_inputs()[0].shape[1])
    width_out = int(session.get_outputs()[0].shape[1])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (y,) = session.run(None, {input_name: inputs[input_name]})
        return {output_name: y}

    config = TritonConfig(grpc_port=int(grpc_port), http_port=int(http_port), metrics_port=int(metrics_port),
                          grpc_address="127.0.0.1", http_address="127.0.0.1")
    # PyTriton protects the statistics and repository RPCs with a generated token by default; perf_analyzer needs
    # ModelStatistics, and nothing but this benchmark reaches the loopback server.
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name=input_name, dtype=np.float32, shape=(width_in,))],
            outputs=[Tensor(name=output_name, dtype=np.float32, shape=(width_out,))],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=100)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
