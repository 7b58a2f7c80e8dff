"""Per-request timing: where one request's time went, recorded for statistics and, when asked, sent back to it.

A request opts in with the request parameter `nnserve.timing` (bool `true`, a non-zero integer, or the string
`"true"`); its response then carries, as response parameters (integers, microseconds unless said otherwise):

- `nnserve.queue_us`: from submission to the model's queue until its batch started executing;
- `nnserve.compute_input_us`: decoding the request into arrays (the input copy);
- `nnserve.compute_infer_us`: running the batch the request executed in;
- `nnserve.compute_output_us`: encoding its rows of the outputs into the response (the output copy);
- `nnserve.compute_us`: the sum of the three compute parts;
- `nnserve.total_us`: from the servicer receiving the request until its response was ready;
- `nnserve.batch_rows`, `nnserve.batch_requests`: size of the batch it ran in, in rows and in requests;
- `nnserve.provider` (string): the onnxruntime execution provider that ran it.

The parts are disjoint intervals inside the total, each rounded down while the total is rounded up, so
`queue_us + compute_us <= total_us` always holds; the remainder is transport inside the server (event loop hand-offs,
the executor thread hand-off, merging the batch). Opt-in because most callers do not want nine extra map entries
on every response; the same numbers feed ModelStatistics and the Prometheus histograms either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TIMING_PARAMETER = "nnserve.timing"
"""The request parameter that asks for timing parameters in the response."""

_PREFIX = "nnserve."
_TRUE_STRINGS = frozenset(("1", "true", "yes", "on"))


@dataclass(slots=True)
class RequestTiming:
    """One successful request's time split, in integer nanoseconds, and the batch it ran in.

    Not frozen: a frozen dataclass costs twice as much to build, and one is built per request."""

    total_ns: int
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    batch_rows: int
    batch_requests: int

    @property
    def compute_ns(self) -> int:
        return self.input_ns + self.infer_ns + self.output_ns


def timing_requested(parameters: Mapping[str, Any]) -> bool:
    """Whether a request's parameters (a protobuf map of InferParameter) ask for timing."""
    if TIMING_PARAMETER not in parameters:
        return False
    parameter = parameters[TIMING_PARAMETER]
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        return False
    value = getattr(parameter, kind)
    if kind == "string_param":
        return str(value).strip().lower() in _TRUE_STRINGS
    return bool(value)


def timing_parameters(timing: RequestTiming, provider: str) -> dict[str, int | str]:
    """The timing response parameters (see the module docstring) as plain values, keys with their prefix."""
    parts: dict[str, int] = {
        "queue_us": timing.queue_ns // 1000,
        "compute_input_us": timing.input_ns // 1000,
        "compute_infer_us": timing.infer_ns // 1000,
        "compute_output_us": timing.output_ns // 1000,
    }
    parts["compute_us"] = parts["compute_input_us"] + parts["compute_infer_us"] + parts["compute_output_us"]
    parts["total_us"] = -(-timing.total_ns // 1000)  # rounded up, so that the parts never exceed it
    parts["batch_rows"] = timing.batch_rows
    parts["batch_requests"] = timing.batch_requests
    values: dict[str, int | str] = {_PREFIX + key: value for key, value in parts.items()}
    values[_PREFIX + "provider"] = provider
    return values


def write_timing(parameters: Any, timing: RequestTiming, provider: str) -> None:
    """Set the timing response parameters on a protobuf response's parameter map."""
    for key, value in timing_parameters(timing, provider).items():
        if isinstance(value, str):
            parameters[key].string_param = value
        else:
            parameters[key].int64_param = value


def read_timing(parameters: Mapping[str, Any]) -> dict[str, int | str]:
    """The timing parameters of a response as plain values (keys without the `nnserve.` prefix); {} if none."""
    timing: dict[str, int | str] = {}
    for key, value in parameters.items():
        if not key.startswith(_PREFIX):
            continue
        kind = value.WhichOneof("parameter_choice") if hasattr(value, "WhichOneof") else None
        timing[key.removeprefix(_PREFIX)] = getattr(value, kind) if kind else value
    return timing
