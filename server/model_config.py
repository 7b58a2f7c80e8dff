"""Per-model serving configuration: `<repository>/<model>/config.json`.

Every key is optional; a missing file means all defaults. Unknown keys and wrong types are
errors that name the file and the key, so a typo never silently falls back to a default; every
bad key of a file is reported in one message, so one edit fixes them all.

Schema (JSON)::

    {
      "name": "mlp",                        # optional; must equal the directory name (guards against a copied file)
      "description": "free text",           # optional, for people; must be a string, the server ignores it
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
      },
      "warmup": {                           # or false: no warm-up for this model (default: the server's --warmup)
        "batch_sizes": [1, 8, 64],          # default: preferred_batch_sizes and powers of two up to max_batch_size
        "dims": {"input": [224]}            # per input, the dims after the batch one, for dynamic ones (-1)
      }
    }
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnserve.server.batching_settings import DELAY_MODES
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
    "warmup",
)
_WARMUP_KEYS = ("batch_sizes", "dims")
_BATCHING_KEYS = (
    "enabled", "max_queue_delay_us", "preferred_batch_sizes", "max_queue_size", "delay_mode", "inline_max_compute_us"
)


class ModelConfigError(ValueError):
    """A model's config.json is invalid; the message names the file and every bad key (`problems` lists them)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            numbered = "; ".join(f"({i}) {problem}" for i, problem in enumerate(self.problems, 1))
            text = f"{source}: {len(self.problems)} problems: {numbered}"
        super().__init__(text)


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
class WarmupConfig:
    """Warm-up overrides: `enabled` None leaves the server's --warmup; None sizes: the default set."""

    enabled: bool | None = None
    batch_sizes: tuple[int, ...] | None = None
    dims: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


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
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


def load_model_config(model_dir: Path, *, source_name: str | None = None, check_name: bool = True) -> ModelConfig:
    """Read `<model_dir>/config.json`; defaults when the file does not exist.

    `source_name` names the file in messages (default: the folder's name); `check_name` False accepts any `name` key
    (a single-model layout serves the model under a name given to the server, not its folder's)."""
    path = model_dir / CONFIG_FILENAME
    if not path.exists():
        return ModelConfig()
    source = f"{source_name or model_dir.name}/{CONFIG_FILENAME}"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelConfigError(source, [f"file is larger than {MAX_CONFIG_BYTES} bytes"])
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        raise ModelConfigError(source, [problem]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(source, [f"cannot be read: {exc}"]) from None
    return parse_model_config(data, source=source, model_name=model_dir.name if check_name else None)


def parse_model_config(data: Any, *, source: str = CONFIG_FILENAME, model_name: str | None = None) -> ModelConfig:
    """Validate a decoded config.json object; one ModelConfigError names every bad key, so one edit fixes them."""
    if not isinstance(data, Mapping):
        raise ModelConfigError(source, [f"expected a JSON object at the top level, found {type(data).__name__}"])
    problems: list[str] = []
    _reject_unknown(data, _TOP_KEYS, "", problems)
    if "name" in data and (not isinstance(data["name"], str) or (model_name and data["name"] != model_name)):
        problems.append(f"key 'name': must equal the model directory name {model_name!r}, found {data['name']!r}")
    if "description" in data and not isinstance(data["description"], str):
        problems.append(f"key 'description': expected a string, found {data['description']!r}")
    device = data.get("device")
    if device is not None and device not in DEVICES:
        problems.append(f"key 'device': expected one of {list(DEVICES)}, found {device!r}")
    level = data.get("graph_optimization_level")
    if level is not None and level not in OPTIMIZATION_LEVELS:
        problems.append(
            f"key 'graph_optimization_level': expected one of {list(OPTIMIZATION_LEVELS)}, found {level!r}"
        )
    config = ModelConfig(
        max_batch_size=_int(data, "max_batch_size", problems, minimum=0, maximum=1 << 20),
        version_policy=_version_policy(data.get("version_policy"), problems),
        device=device,
        device_id=_int(data, "device_id", problems, minimum=0),
        intra_op_threads=_int(data, "intra_op_threads", problems, minimum=0, maximum=1024),
        inter_op_threads=_int(data, "inter_op_threads", problems, minimum=0, maximum=1024),
        graph_optimization_level=level,
        instances=_int(data, "instances", problems, minimum=1, maximum=64) or 1,
        dynamic_batching=_batching(data.get("dynamic_batching"), problems),
        warmup=_warmup(data.get("warmup"), problems),
    )
    if problems:
        raise ModelConfigError(source, problems)
    return config


def _reject_unknown(data: Mapping[str, Any], allowed: Sequence[str], prefix: str, problems: list[str]) -> None:
    unknown = [f"'{prefix}{key}'" for key in data if key not in allowed]
    if unknown:
        keys = f"unknown key {unknown[0]}" if len(unknown) == 1 else f"unknown keys {', '.join(unknown)}"
        problems.append(f"{keys} (allowed keys: {', '.join(allowed)})")


def _int(
    data: Mapping[str, Any],
    key: str,
    problems: list[str],
    *,
    minimum: int,
    maximum: int | None = None,
    prefix: str = "",
) -> int | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"key '{prefix}{key}': expected an integer, found {value!r}")
        return None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        problems.append(f"key '{prefix}{key}': expected an integer {bound}, found {value}")
        return None
    return value


def _version_policy(value: Any, problems: list[str]) -> VersionPolicy:
    if value is None:
        return VersionPolicy()
    where = "key 'version_policy"
    shape = 'expected exactly one of {"latest": N}, {"all": true}, {"specific": [versions]}'
    if not isinstance(value, Mapping) or len(value) != 1:
        problems.append(f"{where}': {shape}, found {value!r}")
        return VersionPolicy()
    (kind, arg), = value.items()
    if kind == "latest":
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            problems.append(f"{where}.latest': expected an integer >= 1, found {arg!r}")
            return VersionPolicy()
        return VersionPolicy("latest", latest=arg)
    if kind == "all":
        if arg is not True:
            problems.append(f"{where}.all': expected true, found {arg!r}")
        return VersionPolicy("all")
    if kind == "specific":
        if (
            not isinstance(arg, list)
            or not arg
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in arg)
        ):
            problems.append(f"{where}.specific': expected a non-empty list of integers >= 1, found {arg!r}")
            return VersionPolicy()
        return VersionPolicy("specific", versions=tuple(sorted(set(arg))))
    problems.append(f"{where}': unknown policy {kind!r}; {shape}")
    return VersionPolicy()


def _warmup(value: Any, problems: list[str]) -> WarmupConfig:
    if value is None:
        return WarmupConfig()
    if isinstance(value, bool):
        return WarmupConfig(enabled=value)
    if not isinstance(value, Mapping):
        problems.append(f"key 'warmup': expected false, true or a JSON object, found {value!r}")
        return WarmupConfig()
    _reject_unknown(value, _WARMUP_KEYS, "warmup.", problems)
    sizes = value.get("batch_sizes")
    if sizes is not None and (not isinstance(sizes, list) or not sizes
                              or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes)):
        problems.append(f"key 'warmup.batch_sizes': expected a non-empty list of integers >= 1, found {sizes!r}")
        sizes = None
    dims: dict[str, tuple[int, ...]] = {}
    given = value.get("dims", {})
    if not isinstance(given, Mapping):
        problems.append(f"key 'warmup.dims': expected an object of input name -> list of dims, found {given!r}")
        given = {}
    for name, shape in given.items():
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            problems.append(f"key 'warmup.dims.{name}': expected a list of integers >= 1 (the dims after the batch "
                            f"one), found {shape!r}")
            continue
        dims[str(name)] = tuple(shape)
    return WarmupConfig(True, tuple(sorted(set(sizes))) if sizes else None, dims)


def _batching(value: Any, problems: list[str]) -> DynamicBatchingConfig:
    if value is None:
        return DynamicBatchingConfig()
    if not isinstance(value, Mapping):
        problems.append(f"key 'dynamic_batching': expected a JSON object, found {value!r}")
        return DynamicBatchingConfig()
    prefix = "dynamic_batching."
    _reject_unknown(value, _BATCHING_KEYS, prefix, problems)
    enabled = value.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        problems.append(f"key 'dynamic_batching.enabled': expected true or false, found {enabled!r}")
        enabled = None
    preferred = value.get("preferred_batch_sizes")
    if preferred is not None:
        if not isinstance(preferred, list) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in preferred
        ):
            problems.append(
                f"key 'dynamic_batching.preferred_batch_sizes': expected a list of integers >= 1, found {preferred!r}"
            )
            preferred = None
        else:
            preferred = tuple(sorted(set(preferred)))
    delay_mode = value.get("delay_mode")
    if delay_mode is not None and delay_mode not in DELAY_MODES:
        problems.append(f"key 'dynamic_batching.delay_mode': expected one of {list(DELAY_MODES)}, found {delay_mode!r}")
        delay_mode = None
    return DynamicBatchingConfig(
        enabled=enabled,
        max_queue_delay_us=_int(value, "max_queue_delay_us", problems, minimum=0, maximum=10_000_000, prefix=prefix),
        preferred_batch_sizes=preferred,
        max_queue_size=_int(value, "max_queue_size", problems, minimum=1, maximum=1 << 20, prefix=prefix),
        delay_mode=delay_mode,
        inline_max_compute_us=_int(value, "inline_max_compute_us", problems, minimum=0, maximum=1_000_000,
                                   prefix=prefix),
    )
