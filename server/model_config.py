"""Per-model serving configuration: `<repository>/<model>/config.json`.

Every key is optional; a missing file means all defaults. Unknown keys and wrong types are
errors that name the file and the key, so a typo never silently falls back to a default.

Schema (JSON)::

    {
      "name": "mlp",                        # optional; must equal the directory name
      "description": "free text",           # optional, ignored
      "max_batch_size": 64,                 # rows per request/batch; 0 = no batch dimension handling
      "version_policy": {"latest": 1},      # or {"all": true} or {"specific": [1, 3]}
      "device": "auto",                     # auto | cuda | cpu (default: the server's --device)
      "device_id": 0,                       # CUDA ordinal (default: the server's --device-id)
      "intra_op_threads": 0,                # onnxruntime threads (0: every CPU the cgroup quota allows)
      "inter_op_threads": 0,
      "graph_optimization_level": "all",    # disable | basic | extended | all
      "instances": 1,                       # sessions executing concurrently
      "dynamic_batching": {
        "enabled": true,
        "max_queue_delay_us": 500,
        "preferred_batch_sizes": [8, 16],
        "max_queue_size": 1024,
        "delay_mode": "adaptive",           # adaptive | fixed (default: the server's --batch-delay-mode)
        "inline_max_compute_us": 50         # run batches on the event loop below this compute time; 0: never
      }
    }
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnserve.server.settings import DEVICES, OPTIMIZATION_LEVELS

CONFIG_FILENAME = "config.json"
MAX_CONFIG_BYTES = 1 * 1024 * 1024

_TOP_KEYS = (
    "name",
    "description",
    "max_batch_size",
    "version_policy",
    "device",
    "device_id",
    "intra_op_threads",
    "inter_op_threads",
    "graph_optimization_level",
    "instances",
    "dynamic_batching",
)
_BATCHING_KEYS = (
    "enabled", "max_queue_delay_us", "preferred_batch_sizes", "max_queue_size", "delay_mode", "inline_max_compute_us"
)


class ModelConfigError(ValueError):
    """A model's config.json is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directories are served: the newest `latest`, all, or a specific list."""

    kind: str = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to load, newest first."""
        newest_first = sorted(set(available), reverse=True)
        if self.kind == "all":
            return newest_first
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in newest_first if v in wanted]
        return newest_first[: self.latest]

    def describe(self) -> str:
        if self.kind == "all":
            return "all versions"
        if self.kind == "specific":
            return f"versions {list(self.versions)}"
        return f"latest {self.latest}"


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """Batching overrides; None leaves the server's (or the batcher's) default."""

    enabled: bool | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_size: int | None = None
    delay_mode: str | None = None
    inline_max_compute_us: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A model's serving config; None fields fall back to the server's settings."""

    max_batch_size: int | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    device: str | None = None
    device_id: int | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    graph_optimization_level: str | None = None
    instances: int = 1
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read `<model_dir>/config.json`; defaults when the file does not exist."""
    path = model_dir / CONFIG_FILENAME
    if not path.exists():
        return ModelConfig()
    source = f"{model_dir.name}/{CONFIG_FILENAME}"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelConfigError(f"{source}: file is larger than {MAX_CONFIG_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{source}: cannot be read: {exc}") from None
    return parse_model_config(data, source=source, model_name=model_dir.name)


def parse_model_config(data: Any, *, source: str = CONFIG_FILENAME, model_name: str | None = None) -> ModelConfig:
    """Validate a decoded config.json object."""
    if not isinstance(data, Mapping):
        raise ModelConfigError(f"{source}: expected a JSON object at the top level, found {type(data).__name__}")
    _reject_unknown(data, _TOP_KEYS, source, "")
    if "name" in data and (not isinstance(data["name"], str) or (model_name and data["name"] != model_name)):
        raise ModelConfigError(
            f"{source}: key 'name': must equal the model directory name {model_name!r}, found {data['name']!r}"
        )
    if "description" in data and not isinstance(data["description"], str):
        raise ModelConfigError(f"{source}: key 'description': expected a string")
    device = data.get("device")
    if device is not None and device not in DEVICES:
        raise ModelConfigError(f"{source}: key 'device': expected one of {list(DEVICES)}, found {device!r}")
    level = data.get("graph_optimization_level")
    if level is not None and level not in OPTIMIZATION_LEVELS:
        raise ModelConfigError(
            f"{source}: key 'graph_optimization_level': expected one of {list(OPTIMIZATION_LEVELS)}, found {level!r}"
        )
    return ModelConfig(
        max_batch_size=_int(data, "max_batch_size", source, minimum=0, maximum=1 << 20),
        version_policy=_version_policy(data.get("version_policy"), source),
        device=device,
        device_id=_int(data, "device_id", source, minimum=0),
        intra_op_threads=_int(data, "intra_op_threads", source, minimum=0, maximum=1024),
        inter_op_threads=_int(data, "inter_op_threads", source, minimum=0, maximum=1024),
        graph_optimization_level=level,
        instances=_int(data, "instances", source, minimum=1, maximum=64) or 1,
        dynamic_batching=_batching(data.get("dynamic_batching"), source),
    )


def _reject_unknown(data: Mapping[str, Any], allowed: Sequence[str], source: str, prefix: str) -> None:
    for key in data:
        if key not in allowed:
            raise ModelConfigError(
                f"{source}: unknown key '{prefix}{key}'; allowed keys are {', '.join(allowed)}"
            )


def _int(
    data: Mapping[str, Any], key: str, source: str, *, minimum: int, maximum: int | None = None, prefix: str = ""
) -> int | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{source}: key '{prefix}{key}': expected an integer, found {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ModelConfigError(f"{source}: key '{prefix}{key}': expected an integer {bound}, found {value}")
    return value


def _version_policy(value: Any, source: str) -> VersionPolicy:
    if value is None:
        return VersionPolicy()
    where = f"{source}: key 'version_policy"
    shape = 'expected exactly one of {"latest": N}, {"all": true}, {"specific": [versions]}'
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ModelConfigError(f"{where}': {shape}, found {value!r}")
    (kind, arg), = value.items()
    if kind == "latest":
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            raise ModelConfigError(f"{where}.latest': expected an integer >= 1, found {arg!r}")
        return VersionPolicy("latest", latest=arg)
    if kind == "all":
        if arg is not True:
            raise ModelConfigError(f"{where}.all': expected true, found {arg!r}")
        return VersionPolicy("all")
    if kind == "specific":
        if (
            not isinstance(arg, list)
            or not arg
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in arg)
        ):
            raise ModelConfigError(f"{where}.specific': expected a non-empty list of integers >= 1, found {arg!r}")
        return VersionPolicy("specific", versions=tuple(sorted(set(arg))))
    raise ModelConfigError(f"{where}': unknown policy {kind!r}; {shape}")


def _batching(value: Any, source: str) -> DynamicBatchingConfig:
    if value is None:
        return DynamicBatchingConfig()
    if not isinstance(value, Mapping):
        raise ModelConfigError(f"{source}: key 'dynamic_batching': expected a JSON object, found {value!r}")
    _reject_unknown(value, _BATCHING_KEYS, source, "dynamic_batching.")
    enabled = value.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ModelConfigError(f"{source}: key 'dynamic_batching.enabled': expected true or false, found {enabled!r}")
    preferred = value.get("preferred_batch_sizes")
    if preferred is not None:
        if not isinstance(preferred, list) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in preferred
        ):
            raise ModelConfigError(
                f"{source}: key 'dynamic_batching.preferred_batch_sizes': expected a list of integers >= 1, "
                f"found {preferred!r}"
            )
        preferred = tuple(sorted(set(preferred)))
    return DynamicBatchingConfig(
        enabled=enabled,
        max_queue_delay_us=_int(value, "max_queue_delay_us", source, minimum=0, maximum=10_000_000,
                                prefix="dynamic_batching."),
        preferred_batch_sizes=preferred,
        max_queue_size=_int(value, "max_queue_size", source, minimum=1, maximum=1 << 20, prefix="dynamic_batching."),
        delay_mode=_delay_mode(value.get("delay_mode"), source),
        inline_max_compute_us=_int(value, "inline_max_compute_us", source, minimum=0, maximum=1_000_000,
                                   prefix="dynamic_batching."),
    )


def _delay_mode(value: Any, source: str) -> str | None:
    if value is None or value in ("fixed", "adaptive"):
        return value
    raise ModelConfigError(
        f"{source}: key 'dynamic_batching.delay_mode': expected one of ['adaptive', 'fixed'], found {value!r}"
    )
