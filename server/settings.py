"""Server-wide settings: one frozen, validated object built once at start.

Every field has a command-line flag and an `NNSERVE_*` environment variable (see
`nnserve.server.cli`); per-model values in a repository's `config.json` override the
model-related defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from nnserve.server.repository_layout import LAYOUT_KINDS
from nnserve.server.statistics import DEFAULT_LATENCY_BUCKETS_S, validate_buckets

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
    """Directory holding `<model>/<version>/model.onnx` (and optional `<model>/config.json`), or a single model in
    one of the layouts of `repository_layout`."""

    repository_layout: str = "auto"
    """What `model_repository` holds (`nnserve.server.repository_layout`): `repository` (a folder per model),
    `model-folder` (one model: `<version>/model.onnx`), `model-file` (one model: a single `.onnx` file, version 1),
    or `auto` (told apart by what is there). KServe's storage initializer leaves any of the three at /mnt/models."""

    model_name: str | None = None
    """The served name of the model of a single-model layout (KServe passes the InferenceService's name); a
    repository keeps its folders' names."""

    host: str = "0.0.0.0"
    """Interface the gRPC (and metrics) listeners bind; `127.0.0.1` keeps them local."""

    grpc_port: int = 8001
    """gRPC port of the KServe v2 service, health and reflection (Triton's default); 0 picks a free port."""

    http_port: int | None = 8000
    """HTTP/REST port of the KServe v2 REST protocol and Triton's HTTP extensions (Triton's default); None disables
    it, 0 picks a free port."""

    http_host: str | None = None
    """Interface the HTTP/REST listener binds; None: the same as `host`."""

    metrics_port: int | None = 8002
    """Prometheus `/metrics` HTTP port (Triton's default); None disables it, 0 picks a free port."""

    metrics_host: str | None = None
    """Interface the `/metrics` listener binds; None: the same as `host` (e.g. gRPC public, metrics on 127.0.0.1)."""

    metrics_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_S
    """Upper bounds in seconds of the latency histograms (request, stages, batch collection); the default spans
    10 us to 10 s. Every replica of a deployment should use the same bounds, so that their histograms add up."""

    port_file: Path | None = None
    """When set, where the server reports the ports it bound once they are all bound and before the models load:
    JSON `{"pid": ..., "host": ..., "grpc": ..., "http": ..., "metrics": ...}` (`http`, `metrics` null when off),
    written atomically and removed when the server stops; the way to learn the ports that 0 picked.
    With workers > 1 the supervisor writes it."""

    device: Device = "auto"
    """Default execution device: `auto` uses CUDA only when a session really gets it, else CPU."""

    device_id: int = 0
    """Default CUDA device ordinal."""

    model_control: ModelControl = "none"
    """`explicit` enables the RepositoryModelLoad/Unload RPCs; off by default so clients cannot change the server."""

    strict_readiness: bool = True
    """As Triton: ServerReady (and health "") are true only when every model the server is meant to serve is ready:
    those loaded at start or by a load request, and not unloaded since. A model that failed to load counts against
    readiness; one unloaded by a RepositoryModelUnload request does not. False: ready once start-up loading is done."""

    grace_period_s: float = 25.0
    """On SIGTERM/SIGINT, how long accepted requests may take to finish before the process exits.
    Keep it below Kubernetes' terminationGracePeriodSeconds (30 s by default)."""

    max_message_bytes: int | None = None
    """Largest gRPC message received or sent (and HTTP body); larger ones fail with RESOURCE_EXHAUSTED (413). None:
    derived at start so that 100 of them fit a quarter of the memory (per worker), 1 to 64 MiB
    (`inflight_budget.transport_limits`): 64 MiB from 25.6 GiB of memory up."""

    max_request_rows: int = 1 << 16
    """Most rows (dimension 0) of one request to a batched model, whatever a model's max_batch_size allows."""

    max_tensor_dims: int = 16
    """Most dimensions of one request tensor's shape."""

    max_tensor_elements: int = 1 << 26
    """Most elements of one request tensor, and the largest single dimension (64 Mi: a 64 MiB message of bytes)."""

    max_inputs_per_request: int = 64
    """Most inputs (and raw_input_contents entries, and requested outputs) in one request."""

    max_bytes_elements: int = 1 << 20
    """Most elements of one BYTES (string) request tensor: each becomes a Python `str` of about 50 bytes plus its
    text, and onnxruntime copies it again, so a million short strings hold about 100 MiB."""

    max_bytes_element_size: int = 1 << 20
    """Longest element (in bytes, as sent) of a BYTES request tensor."""

    max_bytes_tensor_size: int = 1 << 26
    """Most bytes of one BYTES request tensor as sent (its elements and their 4-byte lengths)."""

    max_concurrent_streams: int | None = None
    """Most calls in flight on one client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); clients queue the
    excess (gRPC's overload protection, which reset calls while finished streams were being freed, is off: see
    `app.create_server`). gRPC receives a unary message whole
    before any handler runs, so one connection can hold max_message_bytes x this many bytes that no budget has
    seen yet. None: derived at start so that this product fits a quarter of the memory (per worker): memory / 4 /
    max_message_bytes, within [100, 1024] (`inflight_budget.transport_limits`)."""

    max_inflight_bytes: int | None = None
    """Server-wide budget (per worker) for the bytes of inference requests accepted and not yet answered: their
    messages or bodies, decoded inputs, batch copies and outputs (`nnserve.server.inflight_budget`). A request
    that does not fit is refused at once with RESOURCE_EXHAUSTED (HTTP 429) and a retry hint. None: half of the
    memory the container may use (cgroup memory.max / memory.limit_in_bytes, else the host's), per worker, after
    the loaded models' measured resident size, at least 32 MiB."""

    cgroup_root: Path = Path("/sys/fs/cgroup")
    """Where the cgroup filesystem is read for the container's memory limit (the default max_inflight_bytes and
    max_concurrent_streams); the CPU quota is always read from /sys/fs/cgroup."""

    memory_limit_bytes: int | None = None
    """The memory this server process may use; None: the cgroup limit under cgroup_root, else the host's memory.
    Set by the supervisor of `--workers N` for its workers (each gets 1/N of the container)."""

    tls_cert: Path | None = None
    """PEM certificate (chain) of the server; with tls_key, the gRPC port speaks TLS only."""

    tls_key: Path | None = None
    """PEM private key of tls_cert."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""

    auth_token_file: Path | None = None
    """File of `token scopes [name]` lines; when set (or auth_tokens), calls need `authorization: Bearer <token>`."""

    auth_tokens: str | None = field(default=None, repr=False)
    """The same lines inline (environment NNSERVE_AUTH_TOKENS only, `;` separates entries); never shown in repr."""

    intra_op_threads: int = 0
    """Default onnxruntime intra-op threads per session (0: every CPU the container's cgroup quota allows)."""

    inter_op_threads: int = 0
    """Default onnxruntime inter-op threads per session (0: onnxruntime's choice)."""

    gil_switch_interval_us: int = 500
    """How long the event loop may hold the GIL while an onnxruntime thread waits for it (`sys.setswitchinterval`).
    Python's 5 ms default lets a busy loop delay the start and the end of every batch by up to 5 ms; 500 us
    measured +2.5 % rows/s on the 25M-parameter benchmark (README, Performance) and costs nothing while only the
    loop runs."""

    graph_optimization_level: OptimizationLevel = "all"
    """Default onnxruntime graph optimization level."""

    dynamic_batching: bool = True
    """Default for models whose config.json does not say: merge concurrent requests into batches."""

    warmup: bool = True
    """Default for models whose config.json does not say: run each new version at the batch sizes it will see, on
    zeroed inputs, before it is READY (`nnserve.server.warmup`)."""

    warmup_timeout_s: float = 60.0
    """Most seconds one version's warm-up may take; the sizes left are skipped (logged), never failed."""

    max_batch_size: int = 64
    """Default rows per request and per batch for models with a dynamic batch dimension and no config value."""

    batch_delay_mode: str = "adaptive"
    """Default `dynamic_batching.delay_mode` for models whose config.json does not say: `adaptive` (wait for more
    rows only while measurements say it pays, within max_queue_delay_us) or `fixed` (Triton's fixed window)."""

    grpc_transport: str = "aio"
    """How gRPC calls are served. `aio`: grpc.aio on the event loop, every call a task there (the higher request
    rate under concurrency). `threads`: grpc's synchronous thread-pool server in front of the same services, a call
    driven from its pool thread through the loop bridge, so a lone request runs from the socket to the response on
    that thread and the loop only takes what waits (the lower latency for few callers). Both serve the same
    services with the same guarantees (`frontends/grpc_threads`; README: Performance, for the measurements)."""

    grpc_threads: int = 64
    """Threads of the `threads` transport's pool: the most gRPC calls inside the server at once (a call holds its
    thread until it is answered, also while it waits for a batch); beyond it calls wait for a thread, before they
    reach the batcher. 64 = the default max_batch_size, so 1-row calls can still fill a batch."""

    workers: int = 1
    """Server processes sharing the gRPC port (SO_REUSEPORT), each loading every model and batching on its own.
    1 serves from this process; N > 1 makes this process a supervisor of N workers (`nnserve.server.workers`)."""

    reuse_port: bool = False
    """Bind the gRPC port with SO_REUSEPORT, sharing it with the other workers; set by the supervisor for its
    workers only, so that a lone server fails loudly when another process holds its port."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        _check_choice("device", self.device, DEVICES)
        _check_choice("repository_layout", self.repository_layout, LAYOUT_KINDS)
        _check_choice("model_control", self.model_control, MODEL_CONTROLS)
        _check_choice("graph_optimization_level", self.graph_optimization_level, OPTIMIZATION_LEVELS)
        _check_port("grpc_port", self.grpc_port)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        if self.http_port is not None:
            _check_port("http_port", self.http_port)
        if self.http_host is not None and not self.http_host:
            raise ValueError("http_host must not be empty (leave it unset to use host)")
        if self.metrics_host is not None and not self.metrics_host:
            raise ValueError("metrics_host must not be empty (leave it unset to use host)")
        object.__setattr__(self, "metrics_buckets", validate_buckets(self.metrics_buckets))
        for name in ("device_id", "intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.max_batch_size, int) and 1 <= self.max_batch_size <= 1 << 20):
            raise ValueError(f"max_batch_size must be an integer in [1, 1048576], got {self.max_batch_size!r}")
        if not self.warmup_timeout_s >= 0:
            raise ValueError(f"warmup_timeout_s must be >= 0 seconds, got {self.warmup_timeout_s!r}")
        if not self.grace_period_s >= 0:
            raise ValueError(f"grace_period_s must be >= 0 seconds, got {self.grace_period_s!r}")
        if self.max_message_bytes is not None and not (
            isinstance(self.max_message_bytes, int) and 1024 <= self.max_message_bytes <= 2**31 - 1
        ):
            raise ValueError(
                f"max_message_bytes must be an integer in [1024, 2147483647], got {self.max_message_bytes!r}"
            )
        if not self.host:
            raise ValueError("host must not be empty (use 0.0.0.0 for every interface)")
        self._check_limits_and_security()
        _check_choice("batch_delay_mode", self.batch_delay_mode, ("fixed", "adaptive"))
        _check_choice("grpc_transport", self.grpc_transport, GRPC_TRANSPORTS)
        if isinstance(self.grpc_threads, bool) or not isinstance(self.grpc_threads, int) or not (
            1 <= self.grpc_threads <= 4096
        ):
            raise ValueError(f"grpc_threads must be an integer in [1, 4096], got {self.grpc_threads!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= 256:
            raise ValueError(f"workers must be an integer in [1, 256], got {self.workers!r}")

    def _check_limits_and_security(self) -> None:
        for name, low, high in (
            ("max_request_rows", 1, 1 << 40),
            ("max_tensor_dims", 1, 1024),
            ("max_tensor_elements", 1, 1 << 50),
            ("max_inputs_per_request", 1, 1 << 16),
            ("max_bytes_elements", 1, 1 << 40),
            ("max_bytes_element_size", 0, 1 << 40),
            ("max_bytes_tensor_size", 0, 1 << 50),
            ("max_concurrent_streams", 1, 2**31 - 1),
            ("max_inflight_bytes", 1024, 1 << 62),
            ("memory_limit_bytes", 1 << 20, 1 << 62),
            ("gil_switch_interval_us", 1, 1_000_000),
        ):
            value = getattr(self, name)
            if value is None and name in _DERIVED:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        object.__setattr__(self, "cgroup_root", Path(self.cgroup_root))
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
        if self.auth_token_file is not None and self.auth_tokens is not None:
            raise ValueError("set auth_token_file (--auth-token-file) or auth_tokens (NNSERVE_AUTH_TOKENS), not both")

    @property
    def http_address(self) -> str:
        """Where the HTTP listener binds (its host: `http_host`, else `host`)."""
        return f"{self.http_host or self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        """`host:port` in the form grpc's add_insecure_port accepts (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.grpc_port}"


GRPC_TRANSPORTS = ("aio", "threads")
"""`ServerSettings.grpc_transport`: grpc.aio on the event loop, or grpc's synchronous thread-pool server."""

_DERIVED = frozenset({"max_concurrent_streams", "max_inflight_bytes", "memory_limit_bytes"})
"""Settings whose None means "derived at start from the memory the container may use"."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_port(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a port number in [0, 65535], got {value!r}")
