"""Request tensors <-> numpy, with the strict validation that keeps one bad request from reaching a batch.

Raw contents are viewed with `np.frombuffer` (no copy, no per-element Python work); typed
`contents` go through `np.asarray` on the repeated field. Every error is an InvalidInputError
whose message names the input and says what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnserve.protos.datatypes import NUMPY_BY_DATATYPE
from nnserve.server.errors import InvalidInputError
from nnserve.server.limits import DEFAULT_LIMITS, RequestLimits, clip

# Protocol datatype -> numpy dtype (little-endian, as the protocol's raw contents are); BYTES is not served.
DATATYPES: dict[str, np.dtype[Any]] = {name: dtype for name, dtype in NUMPY_BY_DATATYPE.items() if name != "BYTES"}

# onnxruntime type strings -> protocol datatypes (BYTES/BF16 are not served).
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
}

# Protocol datatype -> field of InferTensorContents carrying it (FP16 travels only as raw bytes).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_CONTENTS_DTYPES: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_ALL_CONTENTS_FIELDS = tuple(_CONTENTS_DTYPES)
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


def decode_inputs(
    request: Any, signature: Signature, limits: RequestLimits = DEFAULT_LIMITS
) -> tuple[dict[str, np.ndarray], int]:
    """Validated numpy arrays for a ModelInferRequest's inputs, and the batch rows (0 when not batching)."""
    tensors = request.inputs
    raw = request.raw_input_contents
    model = signature.model
    limits.check_counts(len(tensors), len(raw), len(request.outputs))
    if len(tensors) != len(signature.inputs) or any(t.name not in signature.inputs_by_name for t in tensors):
        _explain_input_names(tensors, signature)
    if raw and len(raw) != len(tensors):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has {len(tensors)} inputs; "
            "send exactly one raw entry per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    for index, tensor in enumerate(tensors):
        spec = signature.inputs_by_name[tensor.name]
        if tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input '{spec.name}' of model '{model}' has datatype {spec.datatype}, "
                f"but the request says {clip(tensor.datatype) or '(empty)'}"
            )
        shape = tuple(tensor.shape)
        count = _check_shape(spec, shape, signature, limits)
        if raw:
            if _has_contents(tensor):
                raise InvalidInputError(
                    f"input '{spec.name}' has both typed `contents` and raw_input_contents; send one or the other"
                )
            array = _from_raw(raw[index], spec, shape, count)
        else:
            array = _from_contents(tensor, spec, shape, count)
        if signature.max_batch_size:
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInputError(
                    f"inputs disagree on the batch size: '{spec.name}' has {shape[0]} rows, others have {rows}; "
                    "every input of a request must carry the same number of rows"
                )
        arrays[spec.name] = array
    return arrays, max(rows, 0)


def requested_outputs(request: Any, signature: Signature, limits: RequestLimits = DEFAULT_LIMITS) -> tuple[str, ...]:
    """Names of the outputs to return: the request's selection (validated), else all."""
    if not request.outputs:
        return signature.output_names
    limits.check_counts(0, 0, len(request.outputs))
    names = tuple(o.name for o in request.outputs)
    for name in names:
        if name not in signature.outputs_by_name:
            raise InvalidInputError(
                f"unknown output {clip(name)!r} requested; model '{signature.model}' has outputs "
                f"{list(signature.output_names)}"
            )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"output names requested more than once: {[clip(n) for n in names]}")
    return names


def encode_outputs(
    outputs: Mapping[str, np.ndarray], names: Sequence[str], signature: Signature
) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[bytes]]:
    """(name, datatype, shape) per selected output and their raw little-endian bytes."""
    tensors = []
    raw = []
    specs = signature.outputs_by_name
    for name in names:
        array = outputs[name]
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        tensors.append((name, specs[name].datatype, array.shape))
        raw.append(array.tobytes())
    return tensors, raw


def datatype_of(dtype: np.dtype[Any]) -> str:
    """Protocol datatype name of a numpy dtype (InvalidInputError if it has none)."""
    for name, candidate in DATATYPES.items():
        if candidate == dtype.newbyteorder("<") or candidate == dtype:
            return name
    raise InvalidInputError(f"numpy dtype {dtype} has no protocol datatype")


def _explain_input_names(tensors: Sequence[Any], signature: Signature) -> None:
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


def _check_shape(
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


def _has_contents(tensor: Any) -> bool:
    if not tensor.HasField("contents"):
        return False
    contents = tensor.contents
    return any(len(getattr(contents, name)) for name in _ALL_CONTENTS_FIELDS) or len(contents.bytes_contents) > 0


def _from_raw(data: bytes, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
    dtype = spec.dtype
    needed = count * dtype.itemsize
    if len(data) != needed:
        raise InvalidInputError(
            f"raw contents of input '{spec.name}' have {len(data)} bytes, but shape {shape_text(shape)} of "
            f"{spec.datatype} needs {needed} bytes ({count} elements x {dtype.itemsize})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_contents(tensor: Any, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
    field_name = CONTENTS_FIELDS.get(spec.datatype)
    if field_name is None:
        raise InvalidInputError(
            f"input '{spec.name}' is {spec.datatype}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field_name)
    if len(values) != count:
        others = [n for n in _ALL_CONTENTS_FIELDS if n != field_name and len(getattr(tensor.contents, n))]
        hint = f" (data was found in contents.{others[0]}, which does not carry {spec.datatype})" if others else ""
        raise InvalidInputError(
            f"input '{spec.name}' has {len(values)} values in contents.{field_name}, but shape "
            f"{shape_text(shape)} needs {count}{hint}"
        )
    array = np.asarray(values, dtype=_CONTENTS_DTYPES[field_name])
    target = spec.dtype
    if array.dtype != target:
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInputError(
                f"input '{spec.name}' has values outside the {spec.datatype} range [{info.min}, {info.max}]"
            )
        array = array.astype(target)
    return array.reshape(shape)
