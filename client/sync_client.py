"""`InferenceClient`: the blocking client, one grpc channel per client, safe to share between threads."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve.client import _chunks, _codec
from nnserve.client._base import DEFAULT_READY_TIMEOUT_S, SERVER, ClientBase, health_word
from nnserve.client._codec import Inputs, ParameterValue, Rpc
from nnserve.client.errors import InferenceError, InvalidInputError, ModelNotFoundError, from_rpc_error
from nnserve.client.progress import Progress, ProgressCallback
from nnserve.client.retry import Attempts
from nnserve.client.tracing import with_trace_context
from nnserve.client.types import (
    InferResult,
    ModelMetadata,
    RepositoryModel,
    ServerMetadata,
    StatisticsSnapshot,
)
from nnserve.protos import grpc_service_pb2_grpc, model_config_pb2

_RECONNECT_PAUSE_S = 0.05
"""Pause before watching health again after the server closed the stream (it restarted or went away)."""

T = TypeVar("T")


class InferenceClient(ClientBase):
    """Blocking KServe v2 gRPC client with numpy in and out.

    Example:
        with InferenceClient("127.0.0.1:8001") as client:
            probabilities = client.infer("two_layer_softmax", np.array([[1.5, -0.5]], dtype=np.float32))

    Every method takes `timeout` (seconds, retries included; the client's default when None) and `wait_for_ready`
    (wait for a connection until the deadline instead of failing UNAVAILABLE at once; the client's default when
    None), and raises a subclass of `InferenceError` on failure. See `ClientBase.__init__` for the connection
    options.
    """

    _channels: list[grpc.Channel] | None = None
    _stubs: list[grpc_service_pb2_grpc.GRPCInferenceServiceStub] | None = None

    # -- connection ---------------------------------------------------------------------------------------------

    def _connect(self) -> tuple[list[grpc.Channel], list[grpc_service_pb2_grpc.GRPCInferenceServiceStub]]:
        channels, stubs = self._channels, self._stubs
        if channels is None or stubs is None:
            with self._lock:
                if self._channels is None or self._stubs is None:
                    self._channels = [self._new_channel() for _ in range(self._connections)]
                    self._stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self._channels]
                channels, stubs = self._channels, self._stubs
        return channels, stubs

    def _new_channel(self) -> grpc.Channel:
        settings = self._settings
        if self._credentials is None:
            return grpc.insecure_channel(settings.target(), options=settings.options(),
                                         compression=settings.compression())
        return grpc.secure_channel(settings.target(), self._credentials, settings.options(), settings.compression())

    def _get_stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return self._connect()[1][self._next_index()]

    def _invoke(self, rpc: Rpc[T], timeout: float | None, wait_for_ready: bool | None = None) -> T:
        """Call with the client's metadata, retrying per the policy within one overall deadline."""
        method = getattr(self._get_stub(), rpc.method)
        attempts = Attempts(self._retry, self._timeout(timeout))
        waits = self._waits(wait_for_ready)
        while True:
            try:
                reply = method(rpc.request, timeout=attempts.remaining_s(),
                               metadata=with_trace_context(self._metadata), wait_for_ready=waits)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, tls=self._settings.uses_tls)
                delay = attempts.next_delay_s(error)
                if delay is None:
                    raise error from None
                time.sleep(delay)
            else:
                return rpc.decode(reply)

    def close(self) -> None:
        """Close the connections; calls in flight are cancelled. The client reconnects if used again."""
        with self._lock:
            for channel in self._channels or ():
                channel.close()
            self._channels = None
            self._stubs = None

    def wait_until_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S, *, models: Sequence[str] = ()) -> None:
        """Block until the server is ready, and every model named is, or raise `ServerNotReadyError` naming what
        was not when `timeout` seconds have passed.

        It asks what a load balancer asks: the grpc.health.v1 service, "" for the server (ready when every model it
        is meant to serve is ready and no drain is under way) and each model's name. The health service needs no
        token, so this works with any token, `infer`-only included. A server not yet listening is waited for
        (the calls use wait_for_ready); a server that restarts meanwhile is watched again.
        """
        deadline = time.monotonic() + timeout
        health = health_pb2_grpc.HealthStub(self._connect()[0][0])
        services = [SERVER, *models]
        seen: dict[str, str] = {}
        for service in services:
            if not self._watch_until_serving(health, service, deadline, seen):
                self._describe(health, services, seen)
                raise self._not_ready_error(timeout, services, seen)

    def _watch_until_serving(
        self, health: health_pb2_grpc.HealthStub, service: str, deadline: float, seen: dict[str, str]
    ) -> bool:
        while (remaining := deadline - time.monotonic()) > 0:
            responses = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=remaining,
                                     metadata=self._metadata, wait_for_ready=True)
            try:
                for response in responses:
                    seen[service] = health_word(response.status)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        responses.cancel()
                        return True
            except grpc.RpcError as rpc_error:
                code = rpc_error.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return False
                if code != grpc.StatusCode.UNAVAILABLE:  # e.g. a server without the health service
                    raise from_rpc_error(rpc_error, tls=self._settings.uses_tls) from None
            time.sleep(min(_RECONNECT_PAUSE_S, max(0.0, deadline - time.monotonic())))
        return False

    def _describe(self, health: health_pb2_grpc.HealthStub, services: Sequence[str], seen: dict[str, str]) -> None:
        """After a timeout, one quick look at the services not watched yet, so the error can name each."""
        if not seen:
            return  # no server answered; nothing more to learn
        for service in services:
            if service not in seen:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0,
                                         metadata=self._metadata)
                except grpc.RpcError as rpc_error:
                    if rpc_error.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        return
                    seen[service] = "SERVICE_UNKNOWN"  # Check's answer for a name it has no status for
                else:
                    seen[service] = health_word(reply.status)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- health and metadata ------------------------------------------------------------------------------------

    def is_server_live(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> bool:
        """Whether the server process answers (the liveness probe)."""
        return self._invoke(_codec.server_live(), timeout, wait_for_ready)

    def is_server_ready(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> bool:
        """Whether the server is ready to run inference (the readiness probe)."""
        return self._invoke(_codec.server_ready(), timeout, wait_for_ready)

    def is_model_ready(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> bool:
        """Whether the model (a specific version, or the server's default choice) can run inference now."""
        return self._invoke(_codec.model_ready(model, version), timeout, wait_for_ready)

    def server_metadata(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> ServerMetadata:
        """Server name, version and protocol extensions."""
        return self._invoke(_codec.server_metadata(), timeout, wait_for_ready)

    def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> ModelMetadata:
        """Versions, platform and input/output signatures; also refreshes the cache `infer` uses to name inputs."""
        return self._remember(model, version,
                              self._invoke(_codec.model_metadata(model, version), timeout, wait_for_ready))

    def model_config(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> model_config_pb2.ModelConfig:
        """The model's configuration as Triton's `ModelConfig` message (max_batch_size, batching, parameters)."""
        return self._invoke(_codec.model_config(model, version), timeout, wait_for_ready)

    def model_statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> StatisticsSnapshot:
        """Cumulative server-side statistics, one entry per model version (every model when `model` is empty);
        `after - before` gives what happened in between."""
        return self._invoke(_codec.model_statistics(model, version), timeout, wait_for_ready)

    # -- repository ---------------------------------------------------------------------------------------------

    def repository_index(
        self, *, ready_only: bool = False, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[RepositoryModel]:
        """Every model (version) the repository knows, with its state and the reason when not ready."""
        return self._invoke(_codec.repository_index(ready_only), timeout, wait_for_ready)

    def load_model(
        self, model: str, *, config: str | None = None, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> None:
        """Load or reload a model (server must allow repository control); `config` is a JSON config override."""
        self._forget(model)
        self._invoke(_codec.load_model(model, config), timeout, wait_for_ready)

    def unload_model(self, model: str, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> None:
        """Unload a model (server must allow repository control)."""
        self._forget(model)
        self._invoke(_codec.unload_model(model), timeout, wait_for_ready)

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
        wait_for_ready: bool | None = None,
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
            wait_for_ready=wait_for_ready,
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
        wait_for_ready: bool | None = None,
    ) -> InferResult:
        """Like `infer`, returning the whole response (`as_numpy(name)`, echoed id, model version, parameters)."""
        metadata = None
        if not isinstance(inputs, Mapping):
            metadata = self._cached(model, version) or self.model_metadata(
                model, version, timeout=timeout, wait_for_ready=wait_for_ready
            )
        rpc = _codec.infer(
            model,
            _codec.name_inputs(inputs, metadata),
            version=version,
            outputs=outputs,
            parameters=parameters,
            request_id=request_id,
        )
        try:
            return self._invoke(rpc, timeout, wait_for_ready)
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
        wait_for_ready: bool | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Infer a large array in requests of at most `batch_size` rows, `concurrency` in flight (threads), results
        in order.

        Requests never exceed the model's `max_batch_size` (from its ModelConfig): a larger `batch_size` is lowered
        to it, and a model without a batch dimension (max_batch_size 0) gets the whole input in one request.
        `timeout` applies to each request. `progress=True` draws a progress line on stderr; a callable receives
        `(rows_done, rows_total)`. The first failing request raises; requests not yet sent are cancelled.
        """
        metadata = None if isinstance(inputs, Mapping) else self.model_metadata(
            model, version, timeout=timeout, wait_for_ready=wait_for_ready
        )
        named = _codec.name_inputs(inputs, metadata)
        try:
            config = self.model_config(model, version, timeout=timeout, wait_for_ready=wait_for_ready)
        except InferenceError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:  # a v2 server without Triton's config extension
                raise
            config = None
        chunks = _chunks.split(named, _chunks.request_rows(batch_size, config))
        total = sum(_chunks.row_count(chunk) for chunk in chunks)
        tracker = Progress(f"infer {model}", total, progress)

        def run(chunk: dict[str, Any]) -> np.ndarray | dict[str, np.ndarray]:
            result = self.infer(model, chunk, version=version, outputs=outputs, timeout=timeout,
                                wait_for_ready=wait_for_ready)
            tracker.advance(_chunks.row_count(chunk))
            return result

        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="nnserve-infer")
        try:
            return _chunks.assemble(list(pool.map(run, chunks)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            tracker.close()
