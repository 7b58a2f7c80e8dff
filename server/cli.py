"""`nnserve serve`: flags, their NNSERVE_* environment variables, and running the server.

Precedence: a flag on the command line, else its environment variable, else the default
of `ServerSettings`. Every flag's help names its variable and default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnserve.server.errors import ServingError
from nnserve.server.repository_layout import LAYOUT_KINDS
from nnserve.server.settings import DEVICES, GRPC_TRANSPORTS, MODEL_CONTROLS, OPTIMIZATION_LEVELS, ServerSettings
from nnserve.server.statistics import validate_buckets

log = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_AUTH_TOKENS_ENV = "NNSERVE_AUTH_TOKENS"


# Parsers of flag and variable text. Each raises ValueError saying what was expected; `settings_from` puts the flag
# or variable and the value in front, e.g. "NNSERVE_GRPC_PORT: invalid value 'abc': expected a port number (0-65535)"
# (never Python's own "invalid literal for int() with base 10"). Ranges are checked by ServerSettings.


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false (or 1/0, yes/no, on/off)")


def _whole(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected {what}") from None

    return parse


_count = _whole("a whole number")
_port = _whole("a port number (0-65535)")


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("expected a number of seconds, e.g. 25 or 2.5") from None


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("expected a path, got an empty value")
    return Path(text)


def _buckets(text: str) -> tuple[float, ...]:
    try:
        bounds = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError("expected increasing numbers of seconds separated by commas, e.g. 0.001,0.01,0.1") from None
    return validate_buckets(bounds)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])i?)?b?")
_SIZE_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int | None:
    """Bytes, optionally with a binary unit (512Mi, 2GiB, 4G: all powers of 1024); `auto` for the derived default."""
    value = text.strip().lower()
    if value == "auto":
        return None
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError("expected a number of bytes, optionally with a unit (e.g. 1073741824, 512Mi, 2GiB), or auto")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _optional_count(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    return _count(text)


def _optional_port(text: str) -> int | None:
    if text.strip().lower() in ("off", "none", "disabled", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected a port number (0-65535) or off") from None


@dataclass(frozen=True)
class _Option:
    field: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None
    """What --help says the default is, where the settings default does not read well."""

    @property
    def env(self) -> str:
        return "NNSERVE_" + self.field.upper().removesuffix("_S")


OPTIONS: tuple[_Option, ...] = (
    _Option("model_repository", "--model-repository", _path, "model repository: <dir>/<model>/<version>/model.onnx",
            "DIR"),
    _Option("repository_layout", "--repository-layout", str,
            "what --model-repository holds: repository (a folder per model), model-folder (one model: "
            "<version>/model.onnx), model-file (one model: a single .onnx file), or auto",
            choices=LAYOUT_KINDS),
    _Option("model_name", "--model-name", str,
            "served name of the model of a model-folder or model-file layout (KServe: the InferenceService's name)",
            "NAME"),
    _Option("host", "--host", str, "interface to listen on", "HOST"),
    _Option("grpc_port", "--grpc-port", _port, "gRPC port (inference, health, reflection); 0 picks a free one",
            "PORT"),
    _Option("http_port", "--http-port", _optional_port,
            "HTTP/REST port (KServe v2 REST, Triton's HTTP extensions); 'off' disables it, 0 picks a free one", "PORT"),
    _Option("http_host", "--http-host", str, "interface the HTTP/REST port listens on", "HOST",
            default_text="the same as --host"),
    _Option("metrics_port", "--metrics-port", _optional_port,
            "Prometheus /metrics port; 'off' disables it, 0 picks a free one", "PORT"),
    _Option("port_file", "--port-file", _path,
            "once every port is bound (before the models load), write {\"pid\", \"host\", \"grpc\", \"http\", "
            "\"metrics\"} "
            "as JSON to FILE (atomically; removed at exit): how to learn the ports that 0 picked", "FILE"),
    _Option("metrics_host", "--metrics-host", str, "interface the /metrics port listens on", "HOST",
            default_text="the same as --host"),
    _Option("metrics_buckets", "--metrics-buckets", _buckets,
            "upper bounds in seconds of the latency histograms, comma-separated and increasing", "S,S,...",
            default_text="10us to 10s in 1-2.5-5 steps"),
    _Option("device", "--device", str, "execution device: auto (CUDA if it really works, else CPU), cuda, cpu",
            choices=DEVICES),
    _Option("device_id", "--device-id", _count, "CUDA device ordinal", "N"),
    _Option("model_control", "--model-control", str,
            "'explicit' enables the RepositoryModelLoad/Unload RPCs", choices=MODEL_CONTROLS),
    _Option("strict_readiness", "--strict-readiness", _bool,
            "ready only when every model is ready (true/false)", "BOOL"),
    _Option("grace_period_s", "--grace-period", _seconds,
            "seconds to finish accepted requests after SIGTERM/SIGINT", "SECONDS"),
    _Option("max_message_bytes", "--max-message-bytes", _size,
            "largest gRPC message received or sent, and HTTP body (larger: RESOURCE_EXHAUSTED, 413)", "BYTES",
            default_text="auto: 100 of them fit a quarter of the memory per worker, 1Mi to 64Mi"),
    _Option("max_request_rows", "--max-request-rows", _count,
            "most rows in one request to a batched model, whatever its max_batch_size", "ROWS"),
    _Option("max_tensor_dims", "--max-tensor-dims", _count, "most dimensions of one request tensor", "N"),
    _Option("max_tensor_elements", "--max-tensor-elements", _count,
            "most elements of one request tensor (and largest single dimension)", "N"),
    _Option("max_inputs_per_request", "--max-inputs-per-request", _count,
            "most inputs (and raw contents entries, and requested outputs) in one request", "N"),
    _Option("max_bytes_elements", "--max-bytes-elements", _count,
            "most elements of one BYTES (string) request tensor", "N"),
    _Option("max_bytes_element_size", "--max-bytes-element-size", _size,
            "longest element of a BYTES request tensor, as sent", "BYTES"),
    _Option("max_bytes_tensor_size", "--max-bytes-tensor-size", _size,
            "most bytes of one BYTES request tensor as sent (elements and their 4-byte lengths)", "BYTES"),
    _Option("max_concurrent_streams", "--max-concurrent-streams", _optional_count,
            "most calls in flight on one client connection (HTTP/2; clients queue the excess); gRPC receives each "
            "message whole before a handler runs, so a connection holds up to this x --max-message-bytes", "N",
            default_text="auto: a quarter of the memory per worker / --max-message-bytes, 100 to 1024"),
    _Option("max_inflight_bytes", "--max-inflight-bytes", _size,
            "budget for the bytes of accepted, unanswered inference requests (messages, decoded inputs, batch "
            "copies, outputs), per worker; beyond it requests get RESOURCE_EXHAUSTED (HTTP 429) at once", "BYTES",
            default_text="auto: half the container's memory per worker after the models' resident size, "
                         "at least 32Mi"),
    _Option("cgroup_root", "--cgroup-root", _path,
            "where the cgroup files giving the container's memory limit are read (memory.max, v1 "
            "memory.limit_in_bytes), for the auto defaults", "DIR"),
    _Option("tls_cert", "--tls-cert", _path, "PEM server certificate (chain): serve gRPC over TLS (with --tls-key)",
            "FILE"),
    _Option("tls_key", "--tls-key", _path, "PEM private key of --tls-cert", "FILE"),
    _Option("tls_client_ca", "--tls-client-ca", _path,
            "PEM CA bundle: require client certificates it signed (mutual TLS)", "FILE"),
    _Option("auth_token_file", "--auth-token-file", _path,
            "require 'authorization: Bearer <token>': file of 'TOKEN SCOPES [NAME]' lines, scopes "
            "infer,metadata,repository or *; grpc.health.v1 stays open (inline alternative: env NNSERVE_AUTH_TOKENS)",
            "FILE"),
    _Option("intra_op_threads", "--intra-op-threads", _count,
            "default onnxruntime intra-op threads per session (0: every CPU the cgroup quota allows)", "N"),
    _Option("inter_op_threads", "--inter-op-threads", _count,
            "default onnxruntime inter-op threads per session (0: onnxruntime's choice)", "N"),
    _Option("gil_switch_interval_us", "--gil-switch-interval-us", _count,
            "longest the event loop holds the GIL while an onnxruntime thread waits for it (Python's default: 5000)",
            "US"),
    _Option("graph_optimization_level", "--graph-optimization-level", str,
            "default onnxruntime graph optimization level", choices=OPTIMIZATION_LEVELS),
    _Option("warmup", "--warmup", _bool,
            "default for models whose config.json does not say: run each new version at its batch sizes on zeroed "
            "inputs before it reports READY (true/false)", "BOOL"),
    _Option("warmup_timeout_s", "--warmup-timeout", _seconds,
            "most seconds one version's warm-up may take; sizes left are skipped", "SECONDS"),
    _Option("dynamic_batching", "--dynamic-batching", _bool,
            "default for models whose config.json does not say: merge concurrent requests (true/false)", "BOOL"),
    _Option("max_batch_size", "--max-batch-size", _count,
            "default max_batch_size for batchable models whose config.json does not set one", "ROWS"),
    _Option("batch_delay_mode", "--batch-delay-mode", str,
            "default dynamic_batching.delay_mode: adaptive (wait only when measured to pay, within "
            "max_queue_delay_us) or fixed (Triton's fixed window)", choices=("adaptive", "fixed")),
    _Option("grpc_transport", "--grpc-transport", str,
            "how gRPC calls are served: aio (grpc.aio on the event loop: the higher rate under concurrency) or "
            "threads (grpc's thread-pool server: a lone request never waits for the loop, the lower latency for "
            "few callers)", choices=GRPC_TRANSPORTS),
    _Option("grpc_threads", "--grpc-threads", _count,
            "threads of --grpc-transport threads: the most gRPC calls handled at once (each holds one until "
            "answered)", "N"),
    _Option("workers", "--workers", _count,
            "server processes sharing the gRPC port (SO_REUSEPORT), each batching on its own; N > 1 runs a "
            "supervisor that forwards SIGTERM and serves the merged metrics", "N"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags; defaults are resolved later so that environment variables can fill them."""
    parser.epilog = (
        "Each flag can also be set with the environment variable shown; a flag given on the command line wins. "
        "Per-model settings (max_batch_size, version_policy, device, threads, instances, dynamic_batching) go in "
        "<repository>/<model>/config.json."
    )
    for option in OPTIONS:
        default = _DEFAULTS[option.field]
        if default is dataclasses.MISSING:
            suffix = " (required)"
        elif option.default_text is not None:
            suffix = f" (default: {option.default_text})"
        else:
            suffix = f" (default: {'off' if default is None else default})"
        parser.add_argument(
            option.flag,
            dest=option.field,
            default=None,
            metavar=option.metavar,
            choices=option.choices,
            help=f"{option.help}; env {option.env}{suffix}",
        )


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """ServerSettings from parsed flags over NNSERVE_* variables; ValueError naming the flag or variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        given = getattr(args, option.field, None)
        source = option.flag
        if given is None and option.env in environ:
            given, source = environ[option.env], option.env
        if given is None:
            continue
        try:
            value = option.parse(given) if isinstance(given, str) else given
        except ValueError as exc:
            raise ValueError(f"{source}: invalid value {given!r}: {exc}") from None
        if option.choices is not None and value not in option.choices:
            raise ValueError(f"{source}: expected one of {', '.join(option.choices)}, got {value!r}")
        values[option.field] = value
        sources[option.field] = source
    if "model_repository" not in values:
        raise ValueError("--model-repository (or NNSERVE_MODEL_REPOSITORY) is required")
    if _AUTH_TOKENS_ENV in environ:  # environment only: a secret on the command line is visible to `ps`
        values["auth_tokens"] = environ[_AUTH_TOKENS_ENV]
    try:
        return ServerSettings(**values)
    except ValueError as exc:
        # ServerSettings names its field ("grpc_port must be ..."); say which flag or variable set it.
        field = str(exc).split(" ", 1)[0]
        if field in sources:
            raise ValueError(f"{sources[field]}: {exc}") from None
        raise


def run(args: argparse.Namespace) -> int:
    """Entry point of `nnserve serve`."""
    from nnserve.server.app import StartupError, serve

    try:
        settings = settings_from(args)
    except ValueError as exc:
        sys.stderr.write(f"nnserve serve: error: {exc}\n")
        return 2
    if settings.workers > 1:
        from nnserve.server.tracing_config import TracingConfigError, check_tracing
        from nnserve.server.workers import SupervisorError, supervise

        try:
            check_tracing(os.environ)  # each worker traces on its own; a bad OTEL_* setting stops the start here
        except TracingConfigError as exc:
            log.critical("%s", exc)
            return 1
        try:
            return supervise(settings)
        except SupervisorError as exc:
            log.critical("%s", exc)
            return 1
    try:
        return asyncio.run(serve(settings))
    except (StartupError, ServingError) as exc:
        log.critical("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
