"""nnserve's Python client: numpy in and out over the KServe v2 / Open Inference Protocol gRPC API.

    import numpy as np
    from nnserve.client import InferenceClient

    with InferenceClient("127.0.0.1:8001") as client:
        print(client.infer("two_layer_softmax", np.array([[1.5, -0.5]], dtype=np.float32)))

`InferenceClient` blocks; `AsyncInferenceClient` has the same methods as coroutines. Both speak the Triton-compatible
service, so they also work against Triton Inference Server and other v2 servers.
"""

from nnserve.client.async_client import AsyncInferenceClient
from nnserve.client.connection import Keepalive
from nnserve.client.errors import (
    DeadlineExceededError,
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ServerNotReadyError,
    ServerOverloadedError,
    ServerUnavailableError,
)
from nnserve.client.retry import RetryPolicy
from nnserve.client.sync_client import InferenceClient
from nnserve.client.types import (
    Duration,
    InferResult,
    ModelMetadata,
    ModelStatistics,
    RepositoryModel,
    ServerMetadata,
    StatisticsSnapshot,
    TensorMetadata,
)

__all__ = [
    "AsyncInferenceClient",
    "DeadlineExceededError",
    "Duration",
    "InferResult",
    "InferenceClient",
    "InferenceError",
    "InvalidInputError",
    "Keepalive",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelStatistics",
    "RepositoryModel",
    "RetryPolicy",
    "ServerMetadata",
    "ServerNotReadyError",
    "ServerOverloadedError",
    "ServerUnavailableError",
    "StatisticsSnapshot",
    "TensorMetadata",
]
