"""The GRPCInferenceService servicer: KServe v2 gRPC (and Triton's extensions) <-> the protocol-neutral data plane.

Each RPC translates its protobuf request onto `DataPlane`, and a `ServingError` onto a status code through
`frontends.status`. Responses that only change when a model is (re)loaded (metadata, config) are built once per
loaded version and reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from nnserve import __version__
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.protos import model_config_pb2 as mc
from nnserve.server import bytes_tensors
from nnserve.server.dataplane import (
    DataPlane,
    InferenceRequest,
    InferenceResult,
    InputTensor,
    ParameterValue,
    RawData,
)
from nnserve.server.errors import InvalidInputError, QueueFullError, ServingError
from nnserve.server.frontends.grpc_payload import ZERO_COPY_MIN_BYTES, ParsedInferRequest, RawInferResponse
from nnserve.server.frontends.status import grpc_status
from nnserve.server.limits import MIN_RETRY_AFTER_MS, client_message, clip, retry_trailers
from nnserve.server.model_view import PLATFORM, config_parameters, model_config_view
from nnserve.server.providers import CUDA
from nnserve.server.repository import ServedVersion
from nnserve.server.tensors import TensorSpec, shape_text
from nnserve.server.timing import TIMING_PARAMETER, RequestTiming, timing_requested, write_timing

log = logging.getLogger(__name__)

SERVER_NAME = "nnserve"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy", "binary_tensor_data")
_INTERNAL_MESSAGE = "internal error in nnserve; the server log has the details"
_STREAM_WINDOW = 256  # requests of one stream in flight at once before reading pauses (back-pressure)

# Protocol datatype -> field of InferTensorContents carrying it (FP16 travels only as raw bytes).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_CONTENTS_DTYPES: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_ALL_CONTENTS_FIELDS = tuple(_CONTENTS_DTYPES)


# -- requests and responses --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypedContents:
    """An input sent in `InferTensorContents` (the typed, non-raw form)."""

    contents: Any

    def to_array(self, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
        field_name = CONTENTS_FIELDS.get(spec.datatype)
        if field_name is None:
            raise InvalidInputError(
                f"input '{spec.name}' is {spec.datatype}, which has no typed contents field; "
                "send it in raw_input_contents"
            )
        values = getattr(self.contents, field_name)
        if len(values) != count:
            others = [n for n in _ALL_CONTENTS_FIELDS if n != field_name and len(getattr(self.contents, n))]
            hint = f" (data was found in contents.{others[0]}, which does not carry {spec.datatype})" if others else ""
            raise InvalidInputError(
                f"input '{spec.name}' has {len(values)} values in contents.{field_name}, but shape "
                f"{shape_text(shape)} needs {count}{hint}"
            )
        array = np.asarray(values, dtype=_CONTENTS_DTYPES[field_name])
        target = spec.dtype
        if array.dtype != target:
            info = np.iinfo(target)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise InvalidInputError(
                    f"input '{spec.name}' has values outside the {spec.datatype} range [{info.min}, {info.max}]"
                )
            array = array.astype(target)
        return array.reshape(shape)


    def bytes_elements(self) -> tuple[Any, str]:
        """A BYTES input's elements (`nnserve.server.bytes_tensors` checks and decodes them)."""
        return self.contents.bytes_contents, "contents.bytes_contents"


@dataclass(frozen=True, slots=True)
class Refused:
    """An input whose data cannot be used as sent; refused when the data plane reaches it."""

    reason: str

    def to_array(self, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
        raise InvalidInputError(self.reason)


def _has_contents(tensor: Any) -> bool:
    if not tensor.HasField("contents"):
        return False
    contents = tensor.contents
    return any(len(getattr(contents, name)) for name in _ALL_CONTENTS_FIELDS) or len(contents.bytes_contents) > 0


def inference_request(
    request: pb.ModelInferRequest | ParsedInferRequest, dataplane: DataPlane, deadline: float | None
) -> InferenceRequest:
    """The protocol-neutral form of a ModelInferRequest: raw contents (one entry per input) or typed contents.

    Problems only this wire form can have are carried to the data plane, which reports them in the same order as
    every other check (names first, then each input's datatype and shape, then its data)."""
    tensors = request.inputs
    raw = request.raw_input_contents
    invalid = None
    try:
        dataplane.limits.check_counts(len(tensors), len(raw), len(request.outputs))
    except InvalidInputError as exc:
        return InferenceRequest(request.model_name, request.model_version, (), id=request.id, deadline=deadline,
                                invalid=str(exc))
    if raw and tensors and len(raw) != len(tensors):  # without tensors, the names check says what is missing
        invalid = (f"raw_input_contents has {len(raw)} entries but the request has {len(tensors)} inputs; "
                   "send exactly one raw entry per input, in the order of `inputs`")
    inputs = []
    raw_bytes = 0
    for index, tensor in enumerate(tensors):
        data: Any
        if not raw:
            data = TypedContents(tensor.contents)
        elif _has_contents(tensor):
            data = Refused(f"input '{clip(tensor.name)}' has both typed `contents` and raw_input_contents; send one "
                           "or the other")
        elif index < len(raw):
            entry = raw[index]
            raw_bytes += len(entry)
            data = RawData(entry)
        else:
            data = Refused(invalid or "")
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    parameters = request.parameters
    # What the request holds: a large message once (grpc_payload); a small one's raw bytes three times (grpc's
    # bytes, the parsed message, and each entry read out of it).
    wire_bytes = request.wire_bytes if type(request) is ParsedInferRequest else _PROTOBUF_COPIES * raw_bytes
    return InferenceRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=inputs,
        outputs=[o.name for o in request.outputs],
        id=request.id,
        parameters=plain_parameters(parameters) if parameters else {},
        deadline=deadline,
        timing=TIMING_PARAMETER in parameters and timing_requested(parameters),
        invalid=invalid,
        wire_bytes=wire_bytes,
    )


def plain_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    """A protobuf parameter map as plain Python values (an unset parameter is left out)."""
    plain: dict[str, ParameterValue] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            plain[key] = getattr(value, choice)
    return plain


def response_header(result: InferenceResult, **fields: Any) -> pb.ModelInferResponse:
    """The ModelInferResponse of a result: names, version, id and each output's name, datatype and shape."""
    return pb.ModelInferResponse(
        model_name=result.model,
        model_version=result.version,
        id=result.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.array.shape)
                 for t in result.outputs],
        **fields,
    )


class ProtobufEncoder:
    """Builds a ModelInferResponse with every output as raw contents."""

    def encode(self, result: InferenceResult) -> pb.ModelInferResponse:
        return response_header(
            result,
            raw_output_contents=[bytes_tensors.encode(t.array) if t.datatype == "BYTES" else t.array.tobytes()
                                 for t in result.outputs],
        )

    def add_timing(self, response: pb.ModelInferResponse, timing: RequestTiming, provider: str) -> None:
        write_timing(response.parameters, timing, provider)


_ENCODER = ProtobufEncoder()


class UnaryEncoder:
    """ModelInfer's encoder: large outputs stay arrays until grpc serializes the response (`grpc_payload`), which
    writes them into the wire bytes directly instead of through two intermediate copies."""

    def encode(self, result: InferenceResult) -> pb.ModelInferResponse | RawInferResponse:
        if sum(t.array.nbytes for t in result.outputs) < ZERO_COPY_MIN_BYTES:
            return _ENCODER.encode(result)
        return RawInferResponse(response_header(result), [t.array for t in result.outputs])

    def add_timing(self, response: pb.ModelInferResponse | RawInferResponse, timing: RequestTiming,
                   provider: str) -> None:
        write_timing(response.parameters, timing, provider)


_UNARY_ENCODER = UnaryEncoder()
_PROTOBUF_COPIES = 3


# -- the servicer -------------------------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 gRPC service over a DataPlane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self._metadata_cache: weakref.WeakKeyDictionary[ServedVersion, pb.ModelMetadataResponse] = (
            weakref.WeakKeyDictionary()
        )
        self._config_cache: weakref.WeakKeyDictionary[ServedVersion, pb.ModelConfigResponse] = (
            weakref.WeakKeyDictionary()
        )
        self._server_metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    # -- health and metadata ------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

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
            served = self.dataplane.statistics(request.name, request.version)
        except ServingError as exc:
            await context.abort(grpc_status(exc), client_message(str(exc)))
        return pb.ModelStatisticsResponse(model_stats=[_statistics_proto(s) for s in served])

    # -- repository ----------------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        rows = self.dataplane.index(ready_only=request.ready)
        models = [
            pb.RepositoryIndexResponse.ModelIndex(name=r.name, version=r.version, state=r.state, reason=r.reason)
            for r in rows
        ]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self.dataplane.load(request.model_name, list(request.parameters))
        except ServingError as exc:
            await context.abort(grpc_status(exc), client_message(str(exc)))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.dataplane.unload(request.model_name, list(request.parameters))
        except ServingError as exc:
            await context.abort(grpc_status(exc), client_message(str(exc)))
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest | ParsedInferRequest, context: Any
    ) -> pb.ModelInferResponse | RawInferResponse:
        started = time.perf_counter_ns()
        remaining = context.time_remaining()
        try:
            neutral = inference_request(request, self.dataplane,
                                        None if remaining is None else time.monotonic() + remaining)
            neutral.on_answered = context.add_done_callback  # the budget holds a large response until it is sent
            tracing = self.dataplane.tracing
            if tracing is not None:
                neutral.trace = tracing.start_grpc(context.invocation_metadata(), "ModelInfer", started)
            return await self.dataplane.infer(neutral, _UNARY_ENCODER, started)
        except QueueFullError as exc:
            hint = getattr(exc, "retry_after_ms", MIN_RETRY_AFTER_MS)
            await context.abort(grpc_status(exc), client_message(f"{exc} (retry after ~{hint} ms)"),
                                retry_trailers(hint))
        except ServingError as exc:
            await context.abort(grpc_status(exc), client_message(str(exc)))
        except Exception:
            log.exception("ModelInfer for model %r failed unexpectedly", request.model_name[:64])
            await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they can share batches); responses keep request order."""
        pending: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None] = asyncio.Queue(_STREAM_WINDOW)
        # Tracing: every request of the stream is a span of its own, in the trace the stream's metadata carries.
        metadata = context.invocation_metadata() if self.dataplane.tracing is not None else None

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_one(request, metadata)))
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

    async def _stream_one(self, request: pb.ModelInferRequest | ParsedInferRequest,
                          metadata: Any = None) -> pb.ModelStreamInferResponse:
        started = time.perf_counter_ns()
        try:
            neutral = inference_request(request, self.dataplane, None)
            tracing = self.dataplane.tracing
            if metadata is not None and tracing is not None:
                neutral.trace = tracing.start_grpc(metadata, "ModelStreamInfer", started)
            response: pb.ModelInferResponse = await self.dataplane.infer(neutral, _ENCODER, started)
            return pb.ModelStreamInferResponse(infer_response=response)
        except QueueFullError as exc:
            hint = getattr(exc, "retry_after_ms", MIN_RETRY_AFTER_MS)
            return _stream_error(request, client_message(f"{exc} (retry after ~{hint} ms)"))
        except ServingError as exc:
            return _stream_error(request, client_message(str(exc)))
        except Exception:
            log.exception("ModelStreamInfer for model %r failed unexpectedly", request.model_name[:64])
            return _stream_error(request, _INTERNAL_MESSAGE)

    # -- helpers -----------------------------------------------------------------------------------------------

    async def _lookup(self, name: str, version: str, context: Any, rpc: str) -> ServedVersion:
        try:
            return self.dataplane.lookup(name, version, rpc)
        except ServingError as exc:
            await context.abort(grpc_status(exc), client_message(str(exc)))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _build_metadata(self, served: ServedVersion) -> pb.ModelMetadataResponse:
        entry = self.dataplane.entry(served.name)
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
    view = model_config_view(served)
    config = mc.ModelConfig(
        name=view.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=view.max_batch_size,
        default_model_filename=view.default_model_filename,
    )
    policy = served.config.version_policy
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.versions)
    else:
        config.version_policy.latest.num_versions = policy.latest
    for name, datatype, dims in view.inputs:
        config.input.add(name=name, data_type=_data_type(datatype), dims=dims)
    for name, datatype, dims in view.outputs:
        config.output.add(name=name, data_type=_data_type(datatype), dims=dims)
    batching = served.batching
    if view.dynamic_batching:
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size.extend(batching.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = batching.max_queue_delay_us
        dynamic.preserve_ordering = True
        dynamic.default_queue_policy.max_queue_size = batching.max_queue_size
    runner = served.runner
    on_gpu = runner.provider == CUDA
    group = config.instance_group.add(
        name=f"{served.name}_0", count=batching.instances, kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else
        mc.ModelInstanceGroup.KIND_CPU,
    )
    if on_gpu:
        group.gpus.append(runner.device_id)
    for key, value in config_parameters(runner, served.version_text, batching).items():
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


def _stream_error(request: pb.ModelInferRequest | ParsedInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
