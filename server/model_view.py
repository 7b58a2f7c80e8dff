"""What a client is told about a loaded version beyond its signature: Triton's ModelConfig facts in protocol-neutral
form, shared by the gRPC frontend (a `ModelConfig` message) and the HTTP one (its JSON).

Sizes, provider and builder facts travel as string `parameters`, as Triton's clients read them; dims exclude the
batch dimension when the version batches (max_batch_size > 0), as Triton's config does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.repository import ServedVersion
from nnserve.server.runner import MODEL_FILENAME, PLATFORM, ModelRunner

__all__ = ["MODEL_FILENAME", "PLATFORM", "ModelConfigView", "config_parameters", "model_config_view"]


@dataclass(frozen=True, slots=True)
class ModelConfigView:
    name: str
    max_batch_size: int
    default_model_filename: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    """(name, datatype, dims) of each input."""
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    dynamic_batching: bool
    """Whether requests of this version are merged (it batches and batching is on)."""


def model_config_view(served: ServedVersion) -> ModelConfigView:
    signature = served.runner.signature
    batched = signature.max_batch_size > 0

    def dims(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[1:] if batched else shape

    return ModelConfigView(
        name=served.name,
        max_batch_size=signature.max_batch_size,
        default_model_filename=MODEL_FILENAME,
        inputs=tuple((t.name, t.datatype, dims(t.shape)) for t in signature.inputs),
        outputs=tuple((t.name, t.datatype, dims(t.shape)) for t in signature.outputs),
        dynamic_batching=batched and served.batching.enabled,
    )


def config_parameters(
    runner: ModelRunner, version: str, batching: BatchingSettings | None = None
) -> dict[str, str]:
    """Facts of a loaded version as ModelConfig `parameters` (string values, as Triton's clients read them).

    `batching` adds `delay_mode` (fixed or adaptive) for a version that batches: Triton's ModelDynamicBatching has
    no field for it, and without it a client cannot tell whether `max_queue_delay_microseconds` is a fixed window
    or an adaptive budget.
    """
    facts = runner.facts
    parameters = {
        "execution_provider": runner.provider,
        "requested_device": runner.requested_device,
        "provider_fallback": "true" if runner.provider_fallback else "false",
        "parameter_count": str(facts.parameter_count),
        "weight_bytes": str(facts.weight_bytes),
        "version": version,
    }
    if runner.provider_fallback:
        parameters["provider_fallback_reason"] = runner.provider_fallback
    optional = {
        "flops_per_sample": facts.flops_per_sample,
        "opset": facts.opset,
        "ir_version": facts.ir_version,
        "dtype": facts.dtype or None,
        "spec_sha256": facts.spec_sha256 or None,
        "builder_version": facts.builder_version or None,
    }
    parameters.update({key: str(value) for key, value in optional.items() if value is not None})
    if batching is not None and batching.enabled and runner.batched:
        parameters["delay_mode"] = batching.delay_mode
    if facts.layers:
        parameters["layers"] = json.dumps(list(facts.layers), separators=(",", ":"))
    return parameters
