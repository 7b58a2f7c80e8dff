"""The GRPCInferenceService servicer: protobuf <-> domain, and the one table of domain errors -> status codes.

Everything below the servicer (repository, runner, executors, tensors) raises ServingError
subclasses and never imports grpc. Responses that only change when a model is (re)loaded
(metadata, config) are built once per loaded version and reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Collection
from typing import Any

import grpc

from nnserve import __version__
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.protos import model_config_pb2 as mc
from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    RepositoryControlError,
    RequestCancelledError,
    ServerUnavailableError,
    ServingError,
)
from nnserve.server.limits import MIN_RETRY_AFTER_MS, RequestLimits, client_message, retry_after_ms, retry_trailers
from nnserve.server.model_facts import config_parameters
from nnserve.server.providers import CUDA
from nnserve.server.repository import ModelRepository, ServedVersion
from nnserve.server.runner import MODEL_FILENAME, PLATFORM
from nnserve.server.settings import ServerSettings
from nnserve.server.statistics import UnroutedRequests, unrouted_labels
from nnserve.server.tensors import decode_inputs, encode_outputs, requested_outputs
from nnserve.server.timing import TIMING_PARAMETER, RequestTiming, timing_requested, write_timing

log = logging.getLogger(__name__)

SERVER_NAME = "nnserve"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy")

# The one place where domain errors become gRPC status codes (most specific class first).
STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestCancelledError: grpc.StatusCode.CANCELLED,
    ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    RepositoryControlError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ExecutionError: grpc.StatusCode.INTERNAL,
}
# Failure labels for statistics (and the metrics issue's `reason` label).
FAILURE_REASONS: dict[type[ServingError], str] = {
    InvalidInputError: "invalid",
    ModelNotFoundError: "not_found",
    ModelNotReadyError: "not_ready",
    QueueFullError: "rejected",
    DeadlineExpiredError: "deadline",
    RequestCancelledError: "cancelled",
    ServerUnavailableError: "unavailable",
    ExecutionError: "internal",
}
_INTERNAL_MESSAGE = "internal error in nnserve; the server log has the details"
_SHUTTING_DOWN = "the server is shutting down and accepts no new requests; retry on another replica"
_STREAM_WINDOW = 256  # requests of one stream in flight at once before reading pauses (back-pressure)


def status_code(exc: ServingError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def failure_reason(exc: ServingError) -> str:
    for cls in type(exc).__mro__:
        reason = FAILURE_REASONS.get(cls)  # type: ignore[call-overload]
        if reason is not None:
            return reason
    return "internal"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 service over a ModelRepository."""

    def __init__(self, repository: ModelRepository, settings: ServerSettings) -> None:
        self._repository = repository
        self._settings = settings
        self._limits = RequestLimits.from_settings(settings)
        self.unrouted = UnroutedRequests()
        """Requests that failed before reaching a served version (for the metrics)."""
        self._draining = False
        self._inflight = 0
        self.accepted_total = 0
        """Inference requests accepted since the start (past the drain check); logged at shutdown."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._metadata_cache: weakref.WeakKeyDictionary[ServedVersion, pb.ModelMetadataResponse] = (
            weakref.WeakKeyDictionary()
        )
        self._config_cache: weakref.WeakKeyDictionary[ServedVersion, pb.ModelConfigResponse] = (
            weakref.WeakKeyDictionary()
        )
        self._server_metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Inference requests accepted and not yet answered."""
        return self._inflight

    def begin_drain(self) -> None:
        """Refuse new inference requests with UNAVAILABLE; those already accepted carry on."""
        self._draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no accepted request is left; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def is_ready(self) -> bool:
        if self._draining or not self._repository.startup_complete:
            return False
        return self._repository.all_ready() if self._settings.strict_readiness else True

    # -- health and metadata ------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if self._draining:
            return pb.ModelReadyResponse(ready=False)
        try:
            self._repository.get(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        served = await self._lookup(request.name, request.version, context, "ModelMetadata")
        response = self._metadata_cache.get(served)
        if response is None:
            response = self._metadata_cache[served] = self._build_metadata(served)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        served = await self._lookup(request.name, request.version, context, "ModelConfig")
        response = self._config_cache.get(served)
        if response is None:
            response = self._config_cache[served] = pb.ModelConfigResponse(config=build_model_config(served))
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                entries = [self._repository.entry(request.name)]
            else:
                entries = self._repository.entries()
                if request.version:
                    raise InvalidInputError("a version was given without a model name")
            served = [s for entry in entries for s in sorted(entry.served_versions, key=lambda s: s.version)]
            if request.version:
                served = [s for s in served if s.version_text == request.version]
                if not served:
                    raise ModelNotFoundError(f"model '{request.name}' has no ready version {request.version!r}")
        except ServingError as exc:
            await context.abort(status_code(exc), client_message(str(exc)))
        return pb.ModelStatisticsResponse(model_stats=[_statistics_proto(s) for s in served])

    # -- repository ----------------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        rows = self._repository.index(ready_only=request.ready)
        models = [
            pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state, reason=r.reason)
            for r in rows
        ]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._check_repository_control("load", request.parameters, allowed=())
            await self._repository.load(request.model_name)
        except ServingError as exc:
            await context.abort(status_code(exc), client_message(str(exc)))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._check_repository_control("unload", request.parameters, allowed=("unload_dependents",))
            await self._repository.unload(request.model_name)
        except ServingError as exc:
            await context.abort(status_code(exc), client_message(str(exc)))
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        if self._draining:
            self._record_unrouted(request, "unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        self._enter()
        try:
            return await self._infer(request, context.time_remaining(), started)
        except QueueFullError as exc:
            hint = self._retry_after_ms(request)
            await context.abort(status_code(exc), client_message(f"{exc} (retry after ~{hint} ms)"),
                                retry_trailers(hint))
        except ServingError as exc:
            await context.abort(status_code(exc), client_message(str(exc)))
        except Exception:
            log.exception("ModelInfer for model %r failed unexpectedly", request.model_name)
            await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE)
        finally:
            self._leave()
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they can share batches); responses keep request order."""
        pending: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None] = asyncio.Queue(_STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_one(request)))
            except asyncio.CancelledError:
                raise  # the writer has gone away; nobody waits for the end marker
            except Exception as exc:
                log.debug("ModelStreamInfer: reading the request stream ended: %s", exc)
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (future := await pending.get()) is not None:
                yield await future
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        started = time.perf_counter_ns()
        if self._draining:
            self._record_unrouted(request, "unavailable")
            return _stream_error(request, _SHUTTING_DOWN)
        self._enter()
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, None, started))
        except QueueFullError as exc:
            return _stream_error(request, client_message(f"{exc} (retry after ~{self._retry_after_ms(request)} ms)"))
        except ServingError as exc:
            return _stream_error(request, client_message(str(exc)))
        except Exception:
            log.exception("ModelStreamInfer for model %r failed unexpectedly", request.model_name)
            return _stream_error(request, _INTERNAL_MESSAGE)
        finally:
            self._leave()

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None, started: int
    ) -> pb.ModelInferResponse:
        """The request path shared by unary and streaming inference; records statistics."""
        expires = None if time_remaining is None else time.monotonic() + time_remaining
        try:
            served = self._repository.get(request.model_name, request.model_version)
        except ServingError as exc:
            self._record_unrouted(request, failure_reason(exc))
            raise
        stats = served.stats
        signature = served.runner.signature
        try:
            inputs, rows = decode_inputs(request, signature, self._limits)
            names = requested_outputs(request, signature, self._limits)
            decoded = time.perf_counter_ns()
            outcome = await served.executor.submit(inputs, deadline=expires)
            computed = time.perf_counter_ns()
            tensors, raw = encode_outputs(outcome.outputs, names, signature)
            response = pb.ModelInferResponse(
                model_name=served.name,
                model_version=served.version_text,
                id=request.id,
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)
                    for name, datatype, shape in tensors
                ],
                raw_output_contents=raw,
            )
        except ServingError as exc:
            stats.record_failure(failure_reason(exc), time.perf_counter_ns() - started)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller's deadline passes, often before the batcher's timer fires.
            expired = expires is not None and time.monotonic() >= expires
            stats.record_failure("deadline" if expired else "cancelled", time.perf_counter_ns() - started)
            raise
        except Exception:
            stats.record_failure("internal", time.perf_counter_ns() - started)
            raise
        done = time.perf_counter_ns()
        timing = RequestTiming(
            total_ns=done - started,
            queue_ns=int(outcome.queue_seconds * 1e9),
            input_ns=decoded - started,
            infer_ns=int(outcome.compute_seconds * 1e9),
            output_ns=done - computed,
            batch_rows=outcome.batch_rows,
            batch_requests=outcome.batch_requests,
        )
        stats.record_success(rows or 1, timing)
        if TIMING_PARAMETER in request.parameters and timing_requested(request.parameters):
            write_timing(response.parameters, timing, served.runner.provider)
        return response

    # -- helpers -----------------------------------------------------------------------------------------------

    def _enter(self) -> None:
        self._inflight += 1
        self.accepted_total += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def _record_unrouted(self, request: pb.ModelInferRequest, reason: str) -> None:
        """Count a request that never reached a version, under label values the repository bounds."""
        self.unrouted.record(*self._bounded_labels(request.model_name, request.model_version), reason)

    def _bounded_labels(self, model: str, version: str) -> tuple[str, str]:
        try:
            versions: Collection[int] | None = self._repository.entry(model).versions
        except ServingError:
            versions = None
        return unrouted_labels(model, version, versions)

    async def _lookup(self, name: str, version: str, context: Any, rpc: str) -> ServedVersion:
        try:
            return self._repository.get(name, version)
        except ServingError as exc:
            self.unrouted.record_lookup(*self._bounded_labels(name, version), rpc, failure_reason(exc))
            await context.abort(status_code(exc), client_message(str(exc)))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _retry_after_ms(self, request: pb.ModelInferRequest) -> int:
        """The retry hint for a request its model's full queue refused (see `limits.retry_after_ms`)."""
        try:
            return retry_after_ms(self._repository.get(request.model_name, request.model_version))
        except ServingError:
            return MIN_RETRY_AFTER_MS

    def _check_repository_control(self, action: str, parameters: Any, allowed: tuple[str, ...]) -> None:
        if self._settings.model_control != "explicit":
            raise RepositoryControlError(
                f"model {action} is disabled: the server runs with --model-control "
                f"{self._settings.model_control}; start it with --model-control explicit to {action} models"
            )
        unsupported = sorted(key for key in parameters if key not in allowed)
        if unsupported:
            raise InvalidInputError(f"{action} parameters {unsupported} are not supported by nnserve")

    def _build_metadata(self, served: ServedVersion) -> pb.ModelMetadataResponse:
        entry = self._repository.entry(served.name)
        signature = served.runner.signature
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=[str(v) for v in entry.ready_versions],
            platform=PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in signature.outputs],
        )


def build_model_config(served: ServedVersion) -> mc.ModelConfig:
    """Triton's ModelConfig for a loaded version: dims exclude the batch dimension when max_batch_size > 0."""
    runner = served.runner
    signature = runner.signature
    batched = signature.max_batch_size > 0
    config = mc.ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=signature.max_batch_size,
        default_model_filename=MODEL_FILENAME,
    )
    policy = served.config.version_policy
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.versions)
    else:
        config.version_policy.latest.num_versions = policy.latest
    for spec in signature.inputs:
        config.input.add(
            name=spec.name, data_type=_data_type(spec.datatype), dims=spec.shape[1:] if batched else spec.shape
        )
    for spec in signature.outputs:
        config.output.add(
            name=spec.name, data_type=_data_type(spec.datatype), dims=spec.shape[1:] if batched else spec.shape
        )
    batching = served.batching
    if batched and batching.enabled:
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size.extend(batching.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = batching.max_queue_delay_us
        dynamic.preserve_ordering = True
        dynamic.default_queue_policy.max_queue_size = batching.max_queue_size
    on_gpu = runner.provider == CUDA
    group = config.instance_group.add(
        name=f"{served.name}_0", count=batching.instances, kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else
        mc.ModelInstanceGroup.KIND_CPU,
    )
    if on_gpu:
        group.gpus.append(runner.device_id)
    parameters = config_parameters(runner, served.version_text, served.batching)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _statistics_proto(served: ServedVersion) -> pb.ModelStatistics:
    s = served.stats
    runner = served.runner
    on_gpu = runner.provider == CUDA
    # Triton reports the memory a model took at load; nnserve knows its weights, a lower bound.
    memory = pb.MemoryUsage(type="GPU" if on_gpu else "CPU", id=runner.device_id if on_gpu else 0,
                            byte_size=runner.facts.weight_bytes)

    def duration(d: Any) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=s.model,
        version=str(s.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(s.success),
            fail=duration(s.fail),
            queue=duration(s.queue),
            compute_input=duration(s.compute_input),
            compute_infer=duration(s.compute_infer),
            compute_output=duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(b.compute_input),
                compute_infer=duration(b.compute_infer),
                compute_output=duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
        memory_usage=[memory],
    )


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
