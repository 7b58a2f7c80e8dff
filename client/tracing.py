"""Trace context for the SDK's calls: a traced application's current span continues into the server.

When OpenTelemetry's API is installed (the application traces), every call carries the current context in its gRPC
metadata (`traceparent`, `tracestate`, through the globally configured propagator: W3C trace context by default),
so the server's spans join the caller's trace. Without the package, or without a current span, the metadata is
left as it was; the SDK itself never starts spans.
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import propagate as _propagate
except ImportError:  # the application does not trace
    _propagate = None  # type: ignore[assignment]

Metadata = tuple[tuple[str, str], ...]


def with_trace_context(metadata: Metadata) -> Metadata:
    """`metadata` plus the current trace context, if there is one to propagate."""
    if _propagate is None:
        return metadata
    carrier: dict[str, Any] = {}
    _propagate.inject(carrier)
    if not carrier:
        return metadata
    return (*metadata, *((key.lower(), str(value)) for key, value in carrier.items()))


__all__ = ["with_trace_context"]
