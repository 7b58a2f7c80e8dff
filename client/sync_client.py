"""`InferenceClient`: the blocking client, one grpc channel per client, safe to share between threads."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from nnserve.client import _chunks, _codec
from nnserve.client._base import ClientBase
from nnserve.client._codec import Inputs, ParameterValue, Rpc
from nnserve.client.errors import InvalidInputError, ModelNotFoundError, from_rpc_error
from nnserve.client.progress import Progress, ProgressCallback
from nnserve.client.retry import Attempts
from nnserve.client.types import InferResult, ModelMetadata, ModelStatistics, RepositoryModel, ServerMetadata
from nnserve.protos import grpc_service_pb2_grpc, model_config_pb2

T = TypeVar("T")


class InferenceClient(ClientBase):
    """Blocking KServe v2 gRPC client with numpy in and out.

    Example:
        with InferenceClient("127.0.0.1:8001") as client:
            probabilities = client.infer("two_layer_softmax", np.array([[1.5, -0.5]], dtype=np.float32))

    Every method takes `timeout` (seconds, retries included; the client's default when None) and raises a subclass
    of `InferenceError` on failure. See `ClientBase.__init__` for the connection options.
    """

    _channel: grpc.Channel | None = None
    _stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub | None = None

    # -- connection ---------------------------------------------------------------------------------------------

    def _get_stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            with self._lock:
                if self._stub is None:
                    settings = self._settings
                    if self._credentials is None:
                        channel = grpc.insecure_channel(
                            settings.target(), options=settings.options(), compression=settings.compression()
                        )
                    else:
                        channel = grpc.secure_channel(
                            settings.target(), self._credentials, settings.options(), settings.compression()
                        )
                    self._channel = channel
                    self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return self._stub

    def _invoke(self, rpc: Rpc[T], timeout: float | None) -> T:
        """Call with the client's metadata, retrying per the policy within one overall deadline."""
        method = getattr(self._get_stub(), rpc.method)
        attempts = Attempts(self._retry, self._timeout(timeout))
        while True:
            try:
                reply = method(rpc.request, timeout=attempts.remaining_s(), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                delay = attempts.next_delay_s(error)
                if delay is None:
                    raise error from None
                time.sleep(delay)
            else:
                return rpc.decode(reply)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. The client reconnects if used again."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._stub = None

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- health and metadata ------------------------------------------------------------------------------------

    def is_server_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process answers (the liveness probe)."""
        return self._invoke(_codec.server_live(), timeout)

    def is_server_ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready to run inference (the readiness probe)."""
        return self._invoke(_codec.server_ready(), timeout)

    def is_model_ready(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> bool:
        """Whether the model (a specific version, or the server's default choice) can run inference now."""
        return self._invoke(_codec.model_ready(model, version), timeout)

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        """Server name, version and protocol extensions."""
        return self._invoke(_codec.server_metadata(), timeout)

    def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> ModelMetadata:
        """Versions, platform and input/output signatures; also refreshes the cache `infer` uses to name inputs."""
        return self._remember(model, version, self._invoke(_codec.model_metadata(model, version), timeout))

    def model_config(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> model_config_pb2.ModelConfig:
        """The model's configuration as Triton's `ModelConfig` message (max_batch_size, batching, parameters)."""
        return self._invoke(_codec.model_config(model, version), timeout)

    def model_statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None
    ) -> list[ModelStatistics]:
        """Cumulative server-side statistics, one entry per model version; every model when `model` is empty."""
        return self._invoke(_codec.model_statistics(model, version), timeout)

    # -- repository ---------------------------------------------------------------------------------------------

    def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[RepositoryModel]:
        """Every model (version) the repository knows, with its state and the reason when not ready."""
        return self._invoke(_codec.repository_index(ready_only), timeout)

    def load_model(self, model: str, *, config: str | None = None, timeout: float | None = None) -> None:
        """Load or reload a model (server must allow repository control); `config` is a JSON config override."""
        self._forget(model)
        self._invoke(_codec.load_model(model, config), timeout)

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Unload a model (server must allow repository control)."""
        self._forget(model)
        self._invoke(_codec.unload_model(model), timeout)

    # -- inference ----------------------------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        request_id: str | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Run one request: an array for a single-input model (or a dict name -> array); returns the single output
        array, or a dict when the model (or `outputs`) gives several. Arrays travel as-is: their dtype must be the
        model's (e.g. float32). Returned arrays are read-only views of the response."""
        return self.infer_result(
            model,
            inputs,
            version=version,
            outputs=outputs,
            timeout=timeout,
            parameters=parameters,
            request_id=request_id,
        ).value

    def infer_result(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        """Like `infer`, returning the whole response (`as_numpy(name)`, echoed id, model version, parameters)."""
        metadata = None
        if not isinstance(inputs, Mapping):
            metadata = self._cached(model, version) or self.model_metadata(model, version, timeout=timeout)
        rpc = _codec.infer(
            model,
            _codec.name_inputs(inputs, metadata),
            version=version,
            outputs=outputs,
            parameters=parameters,
            request_id=request_id,
        )
        try:
            return self._invoke(rpc, timeout)
        except (InvalidInputError, ModelNotFoundError):
            self._forget(model)
            raise

    def infer_many(
        self,
        model: str,
        inputs: Inputs,
        *,
        batch_size: int = 64,
        concurrency: int = 4,
        progress: bool | ProgressCallback = False,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Infer a large array in `batch_size`-row requests, `concurrency` in flight (threads), results in order.

        `timeout` applies to each request. `progress=True` draws a progress line on stderr; a callable receives
        `(rows_done, rows_total)`. The first failing request raises; requests not yet sent are cancelled.
        """
        metadata = None if isinstance(inputs, Mapping) else self.model_metadata(model, version, timeout=timeout)
        chunks = _chunks.split(_codec.name_inputs(inputs, metadata), batch_size)
        total = sum(_chunks.row_count(chunk) for chunk in chunks)
        tracker = Progress(f"infer {model}", total, progress)

        def run(chunk: dict[str, Any]) -> np.ndarray | dict[str, np.ndarray]:
            result = self.infer(model, chunk, version=version, outputs=outputs, timeout=timeout)
            tracker.advance(_chunks.row_count(chunk))
            return result

        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="nnserve-infer")
        try:
            return _chunks.assemble(list(pool.map(run, chunks)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            tracker.close()
