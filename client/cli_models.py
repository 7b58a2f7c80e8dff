"""`nnserve models`: every model the server's repository knows, one line per version, with its facts.

State and reason come from RepositoryIndex; provider, size facts, dtype and batching from each ready version's
ModelConfig (its `parameters` map, `max_batch_size`, `dynamic_batching`, `instance_group`). A version that is not
loaded has no config: its columns show "-" instead of failing the listing.

The dtype is the builder's (`dtype` parameter: float32, float16, float64); a model the builder did not make has
none, so its input datatypes from ModelMetadata stand in (`FP32`, or `FP32,INT8` when mixed): what a client must
send is the first thing to know about a model, and an fp16 version answers float32 requests with an error.

A CPU fallback (a version that could have used CUDA but runs on another provider, see the server's
`provider_fallback` parameter) is marked in the PROVIDER column and explained under the table, because a model
silently running on CPU is the most expensive mistake a GPU deployment can make.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from nnserve.client.cli_common import EXIT_OK, add_connection_arguments, format_table, make_client, report_error
from nnserve.client.errors import InferenceError
from nnserve.client.sync_client import InferenceClient
from nnserve.protos import model_config_pb2

# Keys a server may use in ModelConfig.parameters; the first present wins.
PROVIDER_KEYS = ("provider", "execution_provider", "providers")
PARAMETER_COUNT_KEYS = ("parameter_count", "parameters", "num_parameters")
FALLBACK_MARK = " (fallback!)"
READY = "READY"


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One model version as `nnserve models` shows it; None where the server did not say."""

    name: str
    version: str
    state: str
    reason: str
    platform: str | None = None
    provider: str | None = None
    requested_device: str | None = None
    provider_fallback: bool | None = None
    provider_fallback_reason: str | None = None
    parameter_count: int | None = None
    weight_bytes: int | None = None
    flops_per_sample: int | None = None
    dtype: str | None = None
    """The builder's dtype, else the input datatypes of the signature (comma-separated, in input order)."""
    opset: int | None = None
    layers: tuple[dict[str, Any], ...] | None = None
    max_batch_size: int | None = None
    dynamic_batching: bool | None = None
    max_queue_delay_us: int | None = None
    delay_mode: str | None = None
    """`fixed` (every batch waits the full delay) or `adaptive` (the delay is a budget); None where not said."""
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_size: int | None = None
    instances: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nnserve models`."""
    parser.add_argument("--ready", action="store_true", help="list only models that are ready")
    parser.add_argument("--layers", action="store_true", help="also list each version's layers under the table")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run `nnserve models`; exit codes per `nnserve.client.cli_common`."""
    try:
        with make_client(args) as client:
            rows = collect(client, ready_only=args.ready)
    except (InferenceError, OSError, ValueError) as error:
        return report_error("models", error)
    if args.json:
        print(json.dumps(as_dicts(rows), indent=2))
    elif not rows:
        print("no models")
    else:
        print(render(rows, layers=getattr(args, "layers", False)))
    return EXIT_OK


def collect(client: InferenceClient, *, ready_only: bool = False) -> list[ModelRow]:
    """Join the repository index with each ready version's own config (versions of one model may differ)."""
    rows = []
    for entry in sorted(
        client.repository_index(ready_only=ready_only), key=lambda e: (e.name, _version_key(e.version))
    ):
        config = _config_or_none(client, entry.name, entry.version) if entry.state == READY else None
        row = _row(entry.name, entry.version, entry.state, entry.reason, config)
        if config is not None and row.dtype is None:
            row = replace(row, dtype=_input_datatypes(client, entry.name, entry.version))
        rows.append(row)
    return rows


def render(rows: list[ModelRow], *, layers: bool = False) -> str:
    """The table, then one line per CPU fallback, then (with `layers`) each version's layers."""
    lines = [_table(rows)]
    fallbacks: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        if row.provider_fallback:
            reason = row.provider_fallback_reason or "no reason given"
            cause = (row.requested_device or "?", row.provider or "?", reason)
            fallbacks.setdefault(cause, []).append(f"{row.name}:{row.version}")
    if fallbacks:
        lines.append("")
    for (device, provider, reason), versions in fallbacks.items():
        lines.append(f"CPU fallback: {', '.join(versions)} asked for device '{device}' but run on {provider}: {reason}")
    if layers:
        described = [row for row in rows if row.layers]
        if described:
            lines.append("")
        for row in described:
            lines.append(f"{row.name}:{row.version}  " + " | ".join(_layer_text(layer) for layer in row.layers or ()))
    return "\n".join(lines)


def _config_or_none(client: InferenceClient, name: str, version: str) -> model_config_pb2.ModelConfig | None:
    try:
        return client.model_config(name, version or None)
    except InferenceError:
        return None  # unloaded since the index was read: the index row still says why


def _input_datatypes(client: InferenceClient, name: str, version: str) -> str | None:
    """`FP32`, or `FP32,INT8` for mixed inputs: the signature's datatypes, each once, in input order."""
    try:
        metadata = client.model_metadata(name, version or None)
    except InferenceError:
        return None
    datatypes = list(dict.fromkeys(tensor.datatype for tensor in metadata.inputs))
    return ",".join(datatypes) or None


def _row(name: str, version: str, state: str, reason: str, config: model_config_pb2.ModelConfig | None) -> ModelRow:
    if config is None:
        return ModelRow(name, version, state, reason)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
    fallback = parameters.get("provider_fallback")
    return ModelRow(
        name=name,
        version=version,
        state=state,
        reason=reason,
        platform=config.platform or config.backend or None,
        provider=_first(parameters, PROVIDER_KEYS),
        requested_device=parameters.get("requested_device") or None,
        provider_fallback=None if fallback is None else fallback.lower() == "true",
        provider_fallback_reason=parameters.get("provider_fallback_reason") or None,
        parameter_count=_int_or_none(_first(parameters, PARAMETER_COUNT_KEYS)),
        weight_bytes=_int_or_none(parameters.get("weight_bytes")),
        flops_per_sample=_int_or_none(parameters.get("flops_per_sample")),
        dtype=parameters.get("dtype") or None,
        opset=_int_or_none(parameters.get("opset")),
        layers=_layers_or_none(parameters.get("layers")),
        max_batch_size=config.max_batch_size,
        dynamic_batching=batching is not None,
        max_queue_delay_us=batching.max_queue_delay_microseconds if batching else None,
        delay_mode=(parameters.get("delay_mode") or None) if batching else None,
        preferred_batch_sizes=tuple(batching.preferred_batch_size) if batching else None,
        max_queue_size=(batching.default_queue_policy.max_queue_size or None) if batching else None,
        instances=sum(group.count for group in config.instance_group) or None,
    )


def _table(rows: list[ModelRow]) -> str:
    headers = ["MODEL", "VERSION", "STATE", "PROVIDER", "PARAMS", "WEIGHTS", "FLOPS/ROW", "OPSET", "DTYPE",
               "MAX BATCH", "BATCHING", "INSTANCES", "REASON"]
    body = [
        [
            row.name,
            row.version or "-",
            row.state or "-",
            (row.provider + FALLBACK_MARK) if row.provider and row.provider_fallback else row.provider,
            f"{row.parameter_count:,}" if row.parameter_count is not None else None,
            _bytes_text(row.weight_bytes),
            f"{row.flops_per_sample:,}" if row.flops_per_sample is not None else None,
            row.opset,
            row.dtype,
            row.max_batch_size,
            _batching_text(row),
            row.instances,
            row.reason or "",
        ]
        for row in rows
    ]
    right = [False, True, False, False, True, True, True, True, False, True, False, True]
    return format_table(headers, body, right=right)


def _batching_text(row: ModelRow) -> str | None:
    if row.dynamic_batching is None:
        return None
    if not row.dynamic_batching:
        return "off"
    mode = f" ({row.delay_mode})" if row.delay_mode else ""
    parts = [f"delay {row.max_queue_delay_us}us{mode}"]
    if row.preferred_batch_sizes:
        parts.append("preferred " + "/".join(map(str, row.preferred_batch_sizes)))
    if row.max_queue_size:
        parts.append(f"queue {row.max_queue_size}")
    return "on: " + ", ".join(parts)


def _bytes_text(count: int | None) -> str | None:
    if count is None:
        return None
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover


def _layer_text(layer: dict[str, Any]) -> str:
    shape = f"{layer.get('in', '?')}->{layer.get('out', '?')}"
    return f"{layer.get('name', '?')} {shape} {layer.get('activation', '?')} ({layer.get('parameters', '?')})"


def _layers_or_none(text: str | None) -> tuple[dict[str, Any], ...] | None:
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return tuple(item for item in parsed if isinstance(item, dict)) if isinstance(parsed, list) else None


def _first(parameters: dict[str, str], keys: tuple[str, ...]) -> str | None:
    return next((parameters[key] for key in keys if parameters.get(key)), None)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value.replace(",", "")) if value is not None else None
    except ValueError:
        return None


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def as_dicts(rows: list[ModelRow]) -> list[dict[str, Any]]:
    """Rows as plain dicts (what `--json` prints)."""
    return [asdict(row) for row in rows]
