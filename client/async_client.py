"""`AsyncInferenceClient`: the asyncio client (grpc.aio), for load generators and async services.

Same constructor, methods and results as `InferenceClient`; every call is a coroutine. The channel is created on the
first call, inside the running event loop that will use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nnserve.client import _chunks, _codec
from nnserve.client._base import DEFAULT_READY_TIMEOUT_S, SERVER, ClientBase, health_word
from nnserve.client._codec import Inputs, ParameterValue, Rpc
from nnserve.client.errors import InferenceError, InvalidInputError, ModelNotFoundError, from_rpc_error
from nnserve.client.progress import Progress, ProgressCallback
from nnserve.client.retry import Attempts
from nnserve.client.tracing import with_trace_context
from nnserve.client.types import InferResult, ModelMetadata, RepositoryModel, ServerMetadata, StatisticsSnapshot
from nnserve.protos import grpc_service_pb2_grpc, model_config_pb2

_RECONNECT_PAUSE_S = 0.05

T = TypeVar("T")


class AsyncInferenceClient(ClientBase):
    """asyncio KServe v2 gRPC client with numpy in and out.

    Example:
        async with AsyncInferenceClient("127.0.0.1:8001") as client:
            probabilities = await client.infer("two_layer_softmax", np.array([[1.5, -0.5]], dtype=np.float32))

    Use one client per event loop. See `InferenceClient` for the semantics of each method.
    """

    _channels: list[grpc.aio.Channel] | None = None
    _stubs: list[grpc_service_pb2_grpc.GRPCInferenceServiceStub] | None = None

    # -- connection ---------------------------------------------------------------------------------------------

    def _connect(self) -> tuple[list[grpc.aio.Channel], list[grpc_service_pb2_grpc.GRPCInferenceServiceStub]]:
        if self._channels is None or self._stubs is None:
            self._channels = [self._new_channel() for _ in range(self._connections)]
            self._stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self._channels]
        return self._channels, self._stubs

    def _new_channel(self) -> grpc.aio.Channel:
        settings = self._settings
        if self._credentials is None:
            return grpc.aio.insecure_channel(settings.target(), options=settings.options(),
                                             compression=settings.compression())
        return grpc.aio.secure_channel(settings.target(), self._credentials, settings.options(),
                                       settings.compression())

    def _get_stub(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        return self._connect()[1][self._next_index()]

    async def _invoke(self, rpc: Rpc[T], timeout: float | None, wait_for_ready: bool | None = None) -> T:
        """Call with the client's metadata, retrying per the policy within one overall deadline."""
        method = getattr(self._get_stub(), rpc.method)
        attempts = Attempts(self._retry, self._timeout(timeout))
        waits = self._waits(wait_for_ready)
        while True:
            try:
                reply = await method(rpc.request, timeout=attempts.remaining_s(),
                                     metadata=with_trace_context(self._metadata),
                                     wait_for_ready=waits)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, tls=self._settings.uses_tls)
                delay = attempts.next_delay_s(error)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
            else:
                return rpc.decode(reply)

    async def close(self) -> None:
        """Close the connections; calls in flight are cancelled. The client reconnects if used again."""
        channels, self._channels, self._stubs = self._channels, None, None
        for channel in channels or ():
            await channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_until_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S, *, models: Sequence[str] = ()) -> None:
        """Wait until the server and every model named are ready; see `InferenceClient.wait_until_ready`."""
        deadline = time.monotonic() + timeout
        health = health_pb2_grpc.HealthStub(self._connect()[0][0])
        services = [SERVER, *models]
        seen: dict[str, str] = {}
        for service in services:
            if not await self._watch_until_serving(health, service, deadline, seen):
                await self._describe(health, services, seen)
                raise self._not_ready_error(timeout, services, seen)

    async def _watch_until_serving(
        self, health: health_pb2_grpc.HealthStub, service: str, deadline: float, seen: dict[str, str]
    ) -> bool:
        while (remaining := deadline - time.monotonic()) > 0:
            call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=remaining,
                                metadata=self._metadata, wait_for_ready=True)
            try:
                async for response in call:
                    seen[service] = health_word(response.status)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        call.cancel()
                        return True
            except grpc.RpcError as rpc_error:
                code = rpc_error.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return False
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(rpc_error, tls=self._settings.uses_tls) from None
            await asyncio.sleep(min(_RECONNECT_PAUSE_S, max(0.0, deadline - time.monotonic())))
        return False

    async def _describe(
        self, health: health_pb2_grpc.HealthStub, services: Sequence[str], seen: dict[str, str]
    ) -> None:
        if not seen:
            return
        for service in services:
            if service not in seen:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0,
                                               metadata=self._metadata)
                except grpc.RpcError as rpc_error:
                    if rpc_error.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        return
                    seen[service] = "SERVICE_UNKNOWN"
                else:
                    seen[service] = health_word(reply.status)

    # -- health and metadata ------------------------------------------------------------------------------------

    async def is_server_live(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> bool:
        """Whether the server process answers (the liveness probe)."""
        return await self._invoke(_codec.server_live(), timeout, wait_for_ready)

    async def is_server_ready(self, *, timeout: float | None = None, wait_for_ready: bool | None = None) -> bool:
        """Whether the server is ready to run inference (the readiness probe)."""
        return await self._invoke(_codec.server_ready(), timeout, wait_for_ready)

    async def is_model_ready(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> bool:
        """Whether the model (a specific version, or the server's default choice) can run inference now."""
        return await self._invoke(_codec.model_ready(model, version), timeout, wait_for_ready)

    async def server_metadata(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> ServerMetadata:
        """Server name, version and protocol extensions."""
        return await self._invoke(_codec.server_metadata(), timeout, wait_for_ready)

    async def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> ModelMetadata:
        """Versions, platform and input/output signatures; also refreshes the cache `infer` uses to name inputs."""
        return self._remember(
            model, version, await self._invoke(_codec.model_metadata(model, version), timeout, wait_for_ready)
        )

    async def model_config(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> model_config_pb2.ModelConfig:
        """The model's configuration as Triton's `ModelConfig` message (max_batch_size, batching, parameters)."""
        return await self._invoke(_codec.model_config(model, version), timeout, wait_for_ready)

    async def model_statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> StatisticsSnapshot:
        """Cumulative server-side statistics, one entry per model version (every model when `model` is empty);
        `after - before` gives what happened in between."""
        return await self._invoke(_codec.model_statistics(model, version), timeout, wait_for_ready)

    # -- repository ---------------------------------------------------------------------------------------------

    async def repository_index(
        self, *, ready_only: bool = False, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[RepositoryModel]:
        """Every model (version) the repository knows, with its state and the reason when not ready."""
        return await self._invoke(_codec.repository_index(ready_only), timeout, wait_for_ready)

    async def load_model(
        self, model: str, *, config: str | None = None, timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> None:
        """Load or reload a model (server must allow repository control); `config` is a JSON config override."""
        self._forget(model)
        await self._invoke(_codec.load_model(model, config), timeout, wait_for_ready)

    async def unload_model(
        self, model: str, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> None:
        """Unload a model (server must allow repository control)."""
        self._forget(model)
        await self._invoke(_codec.unload_model(model), timeout, wait_for_ready)

    # -- inference ----------------------------------------------------------------------------------------------

    async def infer(
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
        """Run one request; see `InferenceClient.infer`."""
        result = await self.infer_result(
            model,
            inputs,
            version=version,
            outputs=outputs,
            timeout=timeout,
            parameters=parameters,
            request_id=request_id,
            wait_for_ready=wait_for_ready,
        )
        return result.value

    async def infer_result(
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
            metadata = self._cached(model, version) or await self.model_metadata(
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
            return await self._invoke(rpc, timeout, wait_for_ready)
        except (InvalidInputError, ModelNotFoundError):
            self._forget(model)
            raise

    async def infer_many(
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
        """Infer a large array in requests of at most `batch_size` rows (and the model's max_batch_size),
        `concurrency` in flight (tasks), results in order; see `InferenceClient.infer_many`."""
        metadata = None if isinstance(inputs, Mapping) else await self.model_metadata(
            model, version, timeout=timeout, wait_for_ready=wait_for_ready
        )
        named = _codec.name_inputs(inputs, metadata)
        try:
            config = await self.model_config(model, version, timeout=timeout, wait_for_ready=wait_for_ready)
        except InferenceError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            config = None
        chunks = _chunks.split(named, _chunks.request_rows(batch_size, config))
        results: list[np.ndarray | dict[str, np.ndarray] | None] = [None] * len(chunks)
        tracker = Progress(f"infer {model}", sum(_chunks.row_count(chunk) for chunk in chunks), progress)
        pending: Iterator[int] = iter(range(len(chunks)))

        async def worker() -> None:
            for index in pending:  # the shared iterator hands each chunk to exactly one worker
                results[index] = await self.infer(
                    model, chunks[index], version=version, outputs=outputs, timeout=timeout,
                    wait_for_ready=wait_for_ready,
                )
                tracker.advance(_chunks.row_count(chunks[index]))

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, len(chunks))))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            tracker.close()
        return _chunks.assemble(results)  # type: ignore[arg-type]
