"""`nnserve models`: every model the server's repository knows, one line per version.

State and reason come from RepositoryIndex; provider, parameter count and batching from ModelConfig (its
`parameters` map, `max_batch_size`, `dynamic_batching`, `instance_group`). A model that is not loaded has no config:
its columns show "-" instead of failing the listing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from nnserve.client.cli_common import EXIT_OK, add_connection_arguments, format_table, make_client, report_error
from nnserve.client.errors import InferenceError
from nnserve.client.sync_client import InferenceClient
from nnserve.protos import model_config_pb2

# Keys a server may use in ModelConfig.parameters; the first present wins.
PROVIDER_KEYS = ("provider", "execution_provider", "providers")
PARAMETER_COUNT_KEYS = ("parameter_count", "parameters", "num_parameters")


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One model version as `nnserve models` shows it; None where the server did not say."""

    name: str
    version: str
    state: str
    reason: str
    platform: str | None = None
    provider: str | None = None
    parameter_count: int | None = None
    max_batch_size: int | None = None
    dynamic_batching: bool | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_size: int | None = None
    instances: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `nnserve models`."""
    parser.add_argument("--ready", action="store_true", help="list only models that are ready")
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
        print(_table(rows))
    return EXIT_OK


def collect(client: InferenceClient, *, ready_only: bool = False) -> list[ModelRow]:
    """Join the repository index with each model's config (fetched once per model name)."""
    configs: dict[str, model_config_pb2.ModelConfig | None] = {}
    rows = []
    for entry in sorted(
        client.repository_index(ready_only=ready_only), key=lambda e: (e.name, _version_key(e.version))
    ):
        if entry.name not in configs:
            configs[entry.name] = _config_or_none(client, entry.name)
        rows.append(_row(entry.name, entry.version, entry.state, entry.reason, configs[entry.name]))
    return rows


def _config_or_none(client: InferenceClient, name: str) -> model_config_pb2.ModelConfig | None:
    try:
        return client.model_config(name)
    except InferenceError:
        return None  # not loaded (or failed to load): the index row still says why


def _row(name: str, version: str, state: str, reason: str, config: model_config_pb2.ModelConfig | None) -> ModelRow:
    if config is None:
        return ModelRow(name, version, state, reason)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
    return ModelRow(
        name=name,
        version=version,
        state=state,
        reason=reason,
        platform=config.platform or config.backend or None,
        provider=_first(parameters, PROVIDER_KEYS),
        parameter_count=_int_or_none(_first(parameters, PARAMETER_COUNT_KEYS)),
        max_batch_size=config.max_batch_size,
        dynamic_batching=batching is not None,
        max_queue_delay_us=batching.max_queue_delay_microseconds if batching else None,
        preferred_batch_sizes=tuple(batching.preferred_batch_size) if batching else None,
        max_queue_size=(batching.default_queue_policy.max_queue_size or None) if batching else None,
        instances=sum(group.count for group in config.instance_group) or None,
    )


def _table(rows: list[ModelRow]) -> str:
    headers = ["MODEL", "VERSION", "STATE", "PROVIDER", "PARAMS", "MAX BATCH", "BATCHING", "INSTANCES", "REASON"]
    body = [
        [
            row.name,
            row.version or "-",
            row.state or "-",
            row.provider,
            f"{row.parameter_count:,}" if row.parameter_count is not None else None,
            row.max_batch_size,
            _batching_text(row),
            row.instances,
            row.reason or "",
        ]
        for row in rows
    ]
    return format_table(headers, body, right=[False, True, False, False, True, True, False, True])


def _batching_text(row: ModelRow) -> str | None:
    if row.dynamic_batching is None:
        return None
    if not row.dynamic_batching:
        return "off"
    parts = [f"delay {row.max_queue_delay_us}us"]
    if row.preferred_batch_sizes:
        parts.append("preferred " + "/".join(map(str, row.preferred_batch_sizes)))
    if row.max_queue_size:
        parts.append(f"queue {row.max_queue_size}")
    return "on: " + ", ".join(parts)


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
