"""Model signatures and the checks of a request's tensors against them, whatever protocol carried the request.

Datatype tables, the signature of a version, and the strict shape and name checks that keep one bad request from
reaching a batch; turning each protocol's data into numpy is the frontends' part (`nnserve.server.dataplane`
has the raw-bytes form both protocols share). Every error is an InvalidInputError whose message names the input
and says what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnserve.protos.datatypes import NUMPY_BY_DATATYPE
from nnserve.server.errors import InvalidInputError
from nnserve.server.limits import DEFAULT_LIMITS, RequestLimits, clip

# Protocol datatype -> numpy dtype (little-endian, as the protocol's raw contents are); BYTES tensors are object
# arrays of `str` (`nnserve.server.bytes_tensors`).
DATATYPES: dict[str, np.dtype[Any]] = dict(NUMPY_BY_DATATYPE)

# onnxruntime type strings -> protocol datatypes (BF16 has no numpy dtype and is not served).
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# A single tensor may not claim more elements than this (far above any message size limit).
_MAX_ELEMENTS = 1 << 40


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, protocol datatype and full shape (-1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]


@dataclass(frozen=True)
class Signature:
    """A model version's tensors and batching facts, precomputed once for the request path."""

    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    """0: shapes are full shapes and are not batched; > 0: dimension 0 is the batch, at most this many rows."""
    inputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    output_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    outputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "outputs_by_name", {t.name: t for t in self.outputs})
        object.__setattr__(self, "output_names", tuple(t.name for t in self.outputs))


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def datatype_of(dtype: np.dtype[Any]) -> str:
    """Protocol datatype name of a numpy dtype (InvalidInputError if it has none)."""
    for name, candidate in DATATYPES.items():
        if candidate == dtype.newbyteorder("<") or candidate == dtype:
            return name
    raise InvalidInputError(f"numpy dtype {dtype} has no protocol datatype")


def explain_input_names(tensors: Sequence[Any], signature: Signature) -> None:
    """Raise the InvalidInputError that says what is wrong with a request's input names (duplicate, unknown,
    missing), for tensors with a `.name`."""
    expected = [t.name for t in signature.inputs]
    given = [t.name for t in tensors]
    model = signature.model
    duplicates = sorted({n for n in given if given.count(n) > 1})
    if duplicates:
        raise InvalidInputError(f"input {clip(duplicates[0])!r} appears more than once in the request")
    unknown = [n for n in given if n not in signature.inputs_by_name]
    missing = [n for n in expected if n not in given]
    if unknown and missing:
        raise InvalidInputError(
            f"unknown input {clip(unknown[0])!r} and missing input {missing[0]!r}; model '{model}' expects inputs "
            f"{expected}"
        )
    if unknown:
        raise InvalidInputError(f"unknown input {clip(unknown[0])!r}; model '{model}' expects inputs {expected}")
    if missing:
        raise InvalidInputError(f"missing input {missing[0]!r}; model '{model}' expects inputs {expected}")
    raise InvalidInputError(f"model '{model}' expects inputs {expected}, the request has {[clip(n) for n in given]}")


def check_input_shape(
    spec: TensorSpec, shape: tuple[int, ...], signature: Signature, limits: RequestLimits = DEFAULT_LIMITS
) -> int:
    """Validate `shape` against the signature; return its element count."""
    limits.check_shape(spec.name, shape)
    expected = spec.shape
    if len(shape) != len(expected):
        raise InvalidInputError(
            f"input '{spec.name}' must have {len(expected)} dimensions {shape_text(expected)} "
            f"(-1: any size), got {len(shape)}: {shape_text(shape)}"
        )
    for axis, (got, want) in enumerate(zip(shape, expected, strict=True)):
        if got < 0:
            raise InvalidInputError(f"input '{spec.name}' has a negative dimension {got} in shape {shape_text(shape)}")
        if want >= 0 and got != want:
            raise InvalidInputError(
                f"input '{spec.name}' dimension {axis} must be {want} (shape {shape_text(expected)}, -1: any size), "
                f"got shape {shape_text(shape)}"
            )
    if signature.max_batch_size:
        rows = shape[0]
        if rows == 0:
            raise InvalidInputError(
                f"input '{spec.name}' has an empty batch (dimension 0 is 0); send at least one row"
            )
        if rows > signature.max_batch_size:
            raise InvalidInputError(
                f"input '{spec.name}' has {rows} rows, more than max_batch_size {signature.max_batch_size} "
                f"of model '{signature.model}'; split it into several requests"
            )
        limits.check_rows(spec.name, rows, signature.model)
    count = 1
    for dim in shape:
        count *= dim
        if count > _MAX_ELEMENTS:
            raise InvalidInputError(f"input '{spec.name}' shape {shape_text(shape)} has too many elements")
    return count
