"""Server-wide settings: one frozen, validated object built once at start.

Every field has a command-line flag and an `NNSERVE_*` environment variable (see
`nnserve.server.cli`); per-model values in a repository's `config.json` override the
model-related defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Device = Literal["auto", "cuda", "cpu"]
ModelControl = Literal["none", "explicit"]
OptimizationLevel = Literal["disable", "basic", "extended", "all"]

DEVICES: tuple[str, ...] = get_args(Device)
MODEL_CONTROLS: tuple[str, ...] = get_args(ModelControl)
OPTIMIZATION_LEVELS: tuple[str, ...] = get_args(OptimizationLevel)

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Everything `nnserve serve` needs to know; validated in `__post_init__`."""

    model_repository: Path
    """Directory holding `<model>/<version>/model.onnx` (and optional `<model>/config.json`)."""

    host: str = "0.0.0.0"
    """Interface the gRPC (and metrics) listeners bind; `127.0.0.1` keeps them local."""

    grpc_port: int = 8001
    """gRPC port of the KServe v2 service, health and reflection (Triton's default); 0 picks a free port."""

    metrics_port: int | None = 8002
    """Prometheus `/metrics` HTTP port (Triton's default); None disables it, 0 picks a free port."""

    device: Device = "auto"
    """Default execution device: `auto` uses CUDA only when a session really gets it, else CPU."""

    device_id: int = 0
    """Default CUDA device ordinal."""

    model_control: ModelControl = "none"
    """`explicit` enables the RepositoryModelLoad/Unload RPCs; off by default so clients cannot change the server."""

    strict_readiness: bool = True
    """As Triton: ServerReady (and health "") are true only when every model in the repository is ready."""

    grace_period_s: float = 25.0
    """On SIGTERM/SIGINT, how long accepted requests may take to finish before the process exits.
    Keep it below Kubernetes' terminationGracePeriodSeconds (30 s by default)."""

    max_message_bytes: int = 64 * MiB
    """Largest gRPC message received or sent; larger ones fail with RESOURCE_EXHAUSTED."""

    intra_op_threads: int = 0
    """Default onnxruntime intra-op threads per session (0: onnxruntime's choice)."""

    inter_op_threads: int = 0
    """Default onnxruntime inter-op threads per session (0: onnxruntime's choice)."""

    graph_optimization_level: OptimizationLevel = "all"
    """Default onnxruntime graph optimization level."""

    dynamic_batching: bool = True
    """Default for models whose config.json does not say: merge concurrent requests into batches."""

    max_batch_size: int = 64
    """Default rows per request and per batch for models with a dynamic batch dimension and no config value."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        _check_choice("device", self.device, DEVICES)
        _check_choice("model_control", self.model_control, MODEL_CONTROLS)
        _check_choice("graph_optimization_level", self.graph_optimization_level, OPTIMIZATION_LEVELS)
        _check_port("grpc_port", self.grpc_port)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        for name in ("device_id", "intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.max_batch_size, int) and 1 <= self.max_batch_size <= 1 << 20):
            raise ValueError(f"max_batch_size must be an integer in [1, 1048576], got {self.max_batch_size!r}")
        if not self.grace_period_s >= 0:
            raise ValueError(f"grace_period_s must be >= 0 seconds, got {self.grace_period_s!r}")
        if not (isinstance(self.max_message_bytes, int) and 1024 <= self.max_message_bytes <= 2**31 - 1):
            raise ValueError(
                f"max_message_bytes must be an integer in [1024, 2147483647], got {self.max_message_bytes!r}"
            )
        if not self.host:
            raise ValueError("host must not be empty (use 0.0.0.0 for every interface)")

    @property
    def grpc_address(self) -> str:
        """`host:port` in the form grpc's add_insecure_port accepts (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.grpc_port}"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_port(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a port number in [0, 65535], got {value!r}")
