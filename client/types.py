"""Plain, frozen result types returned by both clients.

Small dataclasses instead of protobuf messages where users mostly read a few fields (metadata, repository index,
statistics): they are typed, printable, comparable and independent of the generated code. `model_config` is the one
exception and returns the `ModelConfig` protobuf message, because its schema is Triton's and large, and Triton users
already know how to read it (`google.protobuf.json_format.MessageToDict` turns it into a dict).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """Name, protocol datatype and shape of a model input or output; -1 marks a variable dimension (the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A model's versions, platform and tensor signatures, as the ModelMetadata RPC reports them."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        """Input names in the order the model declares them."""
        return tuple(tensor.name for tensor in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Output names in the order the model declares them."""
        return tuple(tensor.name for tensor in self.outputs)


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """Server name, version and the protocol extensions it implements."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    """One model (version) listed by the RepositoryIndex RPC; `reason` says why it is not READY."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class Duration:
    """A cumulative count of events and their total time, as the ModelStatistics RPC reports it."""

    count: int = 0
    ns: int = 0

    @property
    def mean_ms(self) -> float | None:
        """Average time per event in milliseconds, or None when nothing was counted."""
        return self.ns / self.count / 1e6 if self.count else None

    def __sub__(self, other: Duration) -> Duration:
        return Duration(self.count - other.count, self.ns - other.ns)


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """Cumulative server-side statistics of one model version.

    Subtracting two snapshots (`after - before`) gives what happened in between, which is how `nnserve bench`
    separates queueing from compute time for one measurement.
    """

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    """Rows (batch items) inferred."""
    execution_count: int = 0
    """Model executions: a merged batch counts once."""
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def __sub__(self, other: ModelStatistics) -> ModelStatistics:
        values: dict[str, object] = {}
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name in ("name", "version", "last_inference_ms"):
                values[item.name] = mine
            else:
                values[item.name] = mine - theirs
        return ModelStatistics(**values)  # type: ignore[arg-type]


class StatisticsSnapshot(tuple[ModelStatistics, ...]):
    """What `model_statistics` returns: one `ModelStatistics` per model version, in the server's order.

    A tuple (index it, iterate it, `len` it) that also subtracts: `after - before` pairs the entries by model name
    and version and subtracts each pair, so two snapshots give what happened in between; a version that is new in
    `after` is kept as it is (it started from zero), one that is gone from `after` is left out.
    """

    __slots__ = ()

    def get(self, model: str, version: str | int | None = None) -> ModelStatistics:
        """The entry of one model (and version; the newest when None); KeyError naming the entries there are."""
        matches = [s for s in self if s.name == model and (version is None or s.version == str(version))]
        if not matches:
            there = ", ".join(f"{s.name}:{s.version}" for s in self) or "none"
            raise KeyError(f"no statistics for model {model!r} version {version!r}; entries: {there}")
        return max(matches, key=lambda s: int(s.version) if s.version.isdigit() else -1)

    def __sub__(self, other: tuple[ModelStatistics, ...]) -> StatisticsSnapshot:  # type: ignore[override]
        if not isinstance(other, tuple):
            return NotImplemented
        earlier = {(s.name, s.version): s for s in other}
        return StatisticsSnapshot(
            s - earlier[(s.name, s.version)] if (s.name, s.version) in earlier else s for s in self
        )


@dataclass(frozen=True, slots=True)
class InferResult:
    """A whole inference response: the decoded outputs plus what the server echoed about the request.

    `outputs` maps output names to numpy arrays in the server's order. Arrays decoded from raw contents are
    read-only views of the response bytes (no copy); call `.copy()` before writing into one.
    """

    model_name: str
    model_version: str
    id: str
    outputs: Mapping[str, np.ndarray]
    parameters: Mapping[str, bool | int | float | str]

    def as_numpy(self, name: str) -> np.ndarray:
        """One output by name (tritonclient's spelling); KeyError names the outputs that exist."""
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r} in the response; outputs: {', '.join(self.outputs)}") from None

    @property
    def value(self) -> np.ndarray | dict[str, np.ndarray]:
        """The single output array, or a dict of every output when there are several (what `infer` returns)."""
        if len(self.outputs) == 1:
            return next(iter(self.outputs.values()))
        return dict(self.outputs)
