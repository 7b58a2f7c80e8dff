"""Whether tracing is on, and how, from the standard OpenTelemetry environment variables (no OpenTelemetry import).

Read once at start. Nothing nnserve-specific turns tracing on: a cluster's collector set-up (an OpenTelemetry
operator, a sidecar, a Helm chart) configures nnserve with the same `OTEL_*` variables as every other service. The
one deliberate difference from the SDK: its default exporter is `otlp`, so an SDK-instrumented process with no
variable set still tries to send spans to localhost:4317; nnserve traces only when an OTLP endpoint or an exporter
is named. Parsing lives apart from `tracing` so that a misconfiguration, or `OTEL_*` set without the packages of
`nnserve[tracing]`, fails the start with one clear line before anything is loaded.

What the SDK reads itself (headers, timeout, compression, certificates, the batch processor's delays, resource
attributes) is left to it; the README's Tracing section lists every variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnserve.server.tracing import Tracing

DEFAULT_ROOT_RATIO = 0.01
"""The share of requests arriving without a sampled trace context that start a trace of their own (when no
`OTEL_TRACES_SAMPLER` is set). Requests whose caller sampled them are always traced (parent-based)."""

DEFAULT_QUEUE_SIZE = 2048
"""The SDK's default OTEL_BSP_MAX_QUEUE_SIZE: ended spans waiting for export; beyond it new spans are dropped."""

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
_TRUE = frozenset(("true", "1", "yes", "on"))
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class TracingConfigError(ValueError):
    """An `OTEL_*` variable has a value nnserve cannot honour; the message names it and what is accepted."""


@dataclass(frozen=True)
class TracingConfig:
    """How spans are sampled and exported; `tracing_config` returns None when tracing is off."""

    exporters: tuple[str, ...]
    """`otlp` and/or `console`, from OTEL_TRACES_EXPORTER (`otlp` when only an endpoint is set)."""

    protocol: str = "grpc"
    """OTLP transport: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL, else grpc."""

    endpoint: str = ""
    """Where OTLP spans go, as the SDK's exporter will resolve it (for the start-up log; the exporter reads the
    variables itself)."""

    sampler: str = "parentbased_traceidratio"
    """OTEL_TRACES_SAMPLER."""

    ratio: float = DEFAULT_ROOT_RATIO
    """OTEL_TRACES_SAMPLER_ARG of the ratio samplers."""

    max_queue_size: int = DEFAULT_QUEUE_SIZE
    """OTEL_BSP_MAX_QUEUE_SIZE: spans held for export; more are dropped (and counted)."""

    def describe(self) -> str:
        """One line for the start-up log."""
        sinks = [f"OTLP/{self.protocol} to {self.endpoint}" if e == "otlp" else "console" for e in self.exporters]
        ratio = f" {self.ratio:g}" if self.sampler.endswith("traceidratio") else ""
        return f"{' and '.join(sinks)}, sampler {self.sampler}{ratio}"


def tracing_config(environ: Mapping[str, str]) -> TracingConfig | None:
    """The tracing configuration the environment asks for; None when tracing is off.

    Off unless OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is set; off whatever else is set when
    OTEL_SDK_DISABLED is true or OTEL_TRACES_EXPORTER is `none`. Raises TracingConfigError for values that cannot be
    honoured (an exporter, protocol or sampler the SDK packages do not provide, a ratio outside [0, 1]).
    """
    if _get(environ, "OTEL_SDK_DISABLED").lower() in _TRUE:
        return None
    named = [e.strip().lower() for e in _get(environ, "OTEL_TRACES_EXPORTER").split(",") if e.strip()]
    if not named:
        if not any(_get(environ, name) for name in _ENDPOINTS):
            return None
        named = ["otlp"]
    if "none" in named:
        if len(named) > 1:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER={_get(environ, 'OTEL_TRACES_EXPORTER')!r}: 'none' "
                                     "cannot be combined with other exporters")
        return None
    unknown = [e for e in named if e not in EXPORTERS]
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter {unknown[0]!r}; nnserve exports "
                                 f"with {', '.join(EXPORTERS)} or none (a collector can forward OTLP anywhere)")
    protocol = _get(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _get(environ, "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol.lower() or "grpc"
    if protocol not in PROTOCOLS:
        which = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if _get(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        raise TracingConfigError(f"{which}={protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}")
    sampler, ratio = _sampler(environ)
    return TracingConfig(
        exporters=tuple(dict.fromkeys(named)),
        protocol=protocol,
        endpoint=_endpoint(environ, protocol),
        sampler=sampler,
        ratio=ratio,
        max_queue_size=_queue_size(environ),
    )


def _get(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _sampler(environ: Mapping[str, str]) -> tuple[str, float]:
    """The sampler and its ratio: parent-based at DEFAULT_ROOT_RATIO unless OTEL_TRACES_SAMPLER says otherwise."""
    name = _get(environ, "OTEL_TRACES_SAMPLER").lower()
    argument = _get(environ, "OTEL_TRACES_SAMPLER_ARG")
    if not name:
        name, default = "parentbased_traceidratio", DEFAULT_ROOT_RATIO
    elif name not in SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER: unsupported sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    else:
        default = 1.0  # the specification's default ratio for an explicitly named ratio sampler
    if not name.endswith("traceidratio") or not argument:
        return name, default
    try:
        ratio = float(argument)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG={argument!r}: the sampling ratio must be a number "
                                 "in [0, 1] (0.01: one root request in a hundred)")
    return name, ratio


def _endpoint(environ: Mapping[str, str], protocol: str) -> str:
    """The traces endpoint as the SDK's OTLP exporter for `protocol` resolves it."""
    specific = _get(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if specific:
        return specific
    base = _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if protocol == "grpc":
        return base or "http://localhost:4317"
    return (base.rstrip("/") + "/v1/traces") if base else "http://localhost:4318/v1/traces"


def _queue_size(environ: Mapping[str, str]) -> int:
    text = _get(environ, "OTEL_BSP_MAX_QUEUE_SIZE")
    if not text:
        return DEFAULT_QUEUE_SIZE
    if not text.isdigit() or int(text) < 1:
        raise TracingConfigError(f"OTEL_BSP_MAX_QUEUE_SIZE={text!r} must be a positive integer")
    return int(text)


MISSING_PACKAGES = ("tracing is on ({why}), but the OpenTelemetry packages are not installed ({error}): install "
                    "nnserve[tracing] (pip install 'nnserve[tracing]'), or turn tracing off (unset the OTEL_* "
                    "variables, or set OTEL_SDK_DISABLED=true)")


def check_tracing(environ: Mapping[str, str]) -> TracingConfig | None:
    """`tracing_config`, and when tracing is on, whether the packages it needs are installed (TracingConfigError
    if not): what a start checks before anything else is done."""
    config = tracing_config(environ)
    if config is None:
        return None
    try:
        import nnserve.server.tracing  # noqa: F401
    except ImportError as exc:
        raise TracingConfigError(MISSING_PACKAGES.format(why=_why_on(environ), error=exc)) from None
    return config


def load_tracing(environ: Mapping[str, str]) -> Tracing | None:
    """The process's tracing as the environment configures it; None when off. Raises TracingConfigError."""
    config = check_tracing(environ)
    if config is None:
        return None
    from nnserve.server.tracing import Tracing

    return Tracing(config)


def _why_on(environ: Mapping[str, str]) -> str:
    for name in ("OTEL_TRACES_EXPORTER", *_ENDPOINTS):
        if _get(environ, name):
            return f"{name} is set"
    return "OTEL_* is set"


__all__ = ["DEFAULT_ROOT_RATIO", "TracingConfig", "TracingConfigError", "check_tracing", "load_tracing",
           "tracing_config"]
