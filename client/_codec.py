"""Every RPC the clients make, described once: the stub method, the request message and how to decode the reply.

`InferenceClient` and `AsyncInferenceClient` differ only in how they wait (blocking vs `await`); both turn an
`Rpc` from this module into a call through their own retrying `_invoke`. Keeping request building and response
decoding here means the two clients cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import Message

from nnserve.client import _tensors
from nnserve.client.errors import InferenceError, InvalidInputError
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
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import model_config_pb2

T = TypeVar("T")

ParameterValue = bool | int | float | str
"""A request parameter: the protocol's `InferParameter` oneof, chosen from the Python type."""

Inputs = np.ndarray | Mapping[str, Any]
"""What `infer` takes: one array (the model's only input) or a dict of input name -> array."""


@dataclass(frozen=True, slots=True)
class Rpc(Generic[T]):
    """One unary call: `method` is the attribute of `GRPCInferenceServiceStub`; `decode` turns its reply into T."""

    method: str
    request: Message
    decode: Callable[[Any], T]


def server_live() -> Rpc[bool]:
    return Rpc("ServerLive", pb.ServerLiveRequest(), lambda reply: bool(reply.live))


def server_ready() -> Rpc[bool]:
    return Rpc("ServerReady", pb.ServerReadyRequest(), lambda reply: bool(reply.ready))


def model_ready(model: str, version: str | int | None) -> Rpc[bool]:
    request = pb.ModelReadyRequest(name=model, version=_version(version))
    return Rpc("ModelReady", request, lambda reply: bool(reply.ready))


def server_metadata() -> Rpc[ServerMetadata]:
    def decode(reply: pb.ServerMetadataResponse) -> ServerMetadata:
        return ServerMetadata(reply.name, reply.version, tuple(reply.extensions))

    return Rpc("ServerMetadata", pb.ServerMetadataRequest(), decode)


def model_metadata(model: str, version: str | int | None) -> Rpc[ModelMetadata]:
    def tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)

    def decode(reply: pb.ModelMetadataResponse) -> ModelMetadata:
        return ModelMetadata(
            reply.name, tuple(reply.versions), reply.platform, tensors(reply.inputs), tensors(reply.outputs)
        )

    return Rpc("ModelMetadata", pb.ModelMetadataRequest(name=model, version=_version(version)), decode)


def model_config(model: str, version: str | int | None) -> Rpc[model_config_pb2.ModelConfig]:
    request = pb.ModelConfigRequest(name=model, version=_version(version))
    return Rpc("ModelConfig", request, lambda reply: reply.config)


def model_statistics(model: str, version: str | int | None) -> Rpc[StatisticsSnapshot]:
    def duration(value: pb.StatisticDuration) -> Duration:
        return Duration(value.count, value.ns)

    def decode(reply: pb.ModelStatisticsResponse) -> StatisticsSnapshot:
        return StatisticsSnapshot(
            ModelStatistics(
                name=s.name,
                version=s.version,
                last_inference_ms=s.last_inference,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                success=duration(s.inference_stats.success),
                fail=duration(s.inference_stats.fail),
                queue=duration(s.inference_stats.queue),
                compute_input=duration(s.inference_stats.compute_input),
                compute_infer=duration(s.inference_stats.compute_infer),
                compute_output=duration(s.inference_stats.compute_output),
            )
            for s in reply.model_stats
        )

    return Rpc("ModelStatistics", pb.ModelStatisticsRequest(name=model, version=_version(version)), decode)


def repository_index(ready_only: bool) -> Rpc[list[RepositoryModel]]:
    def decode(reply: pb.RepositoryIndexResponse) -> list[RepositoryModel]:
        return [RepositoryModel(m.name, m.version, m.state, m.reason) for m in reply.models]

    return Rpc("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only), decode)


def load_model(model: str, config: str | None) -> Rpc[None]:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        request.parameters["config"].string_param = config
    return Rpc("RepositoryModelLoad", request, lambda _reply: None)


def unload_model(model: str) -> Rpc[None]:
    return Rpc("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), lambda _reply: None)


def infer(
    model: str,
    inputs: Mapping[str, Any],
    *,
    version: str | int | None,
    outputs: Sequence[str] | None,
    parameters: Mapping[str, ParameterValue] | None,
    request_id: str | None,
) -> Rpc[InferResult]:
    """A ModelInfer call with every input as raw contents; `inputs` must already be keyed by input name."""
    request = pb.ModelInferRequest(model_name=model, model_version=_version(version), id=request_id or "")
    for name, value in inputs.items():
        tensor, raw = _tensors.encode(name, _tensors.as_array(name, value))
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        _set_parameter(request.parameters[key], key, value)
    return Rpc("ModelInfer", request, decode_infer_response)


def decode_infer_response(reply: pb.ModelInferResponse) -> InferResult:
    """Decode every output; raw contents when the server sent them, typed contents otherwise."""
    raw = reply.raw_output_contents
    if raw and len(raw) != len(reply.outputs):
        raise InferenceError(f"response has {len(reply.outputs)} outputs but {len(raw)} raw contents")
    arrays: dict[str, np.ndarray] = {}
    for index, out in enumerate(reply.outputs):
        if raw:
            arrays[out.name] = _tensors.decode_raw(out.name, out.datatype, out.shape, raw[index])
        else:
            arrays[out.name] = _tensors.decode_contents(out.name, out.datatype, out.shape, out.contents)
    parameters = {key: _get_parameter(value) for key, value in reply.parameters.items()}
    return InferResult(reply.model_name, reply.model_version, reply.id, arrays, parameters)


def name_inputs(inputs: Inputs, metadata: ModelMetadata | None) -> Mapping[str, Any]:
    """Key a bare array by the model's only input name (from metadata); pass dicts through unchanged."""
    if isinstance(inputs, Mapping):
        return inputs
    if metadata is None:  # pragma: no cover - callers fetch metadata for bare arrays
        raise InvalidInputError("a bare array needs the model's metadata to name its input")
    if len(metadata.inputs) != 1:
        raise InvalidInputError(
            f"model {metadata.name!r} has {len(metadata.inputs)} inputs ({', '.join(metadata.input_names)}); "
            "pass a dict of input name -> array"
        )
    return {metadata.inputs[0].name: inputs}


def _version(version: str | int | None) -> str:
    return "" if version is None else str(version)


def _set_parameter(target: pb.InferParameter, key: str, value: ParameterValue) -> None:
    if isinstance(value, bool):  # before int: bool is an int to Python
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInputError(f"parameter {key!r}: expected bool, int, float or str, got {type(value).__name__}")


def _get_parameter(value: pb.InferParameter) -> ParameterValue:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else ""
