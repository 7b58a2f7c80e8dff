"""numpy arrays <-> KServe v2 tensors, with no per-element Python work on the numeric fast path.

Requests always carry `raw_input_contents` (one `tobytes()` copy: protobuf's `bytes` fields accept nothing else).
Responses are decoded with `np.frombuffer(...).reshape(...)`, a read-only view of the response bytes. Typed
`contents` are decoded too, for servers that answer that way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from nnserve.client.datatypes import to_datatype, to_numpy_dtype
from nnserve.client.errors import InferenceError, InvalidInputError
from nnserve.protos import grpc_service_pb2 as pb

_LENGTH = struct.Struct("<I")

# Typed-contents field of InferTensorContents for each datatype (FP16 has none: it only travels raw).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def as_array(name: str, value: object) -> np.ndarray:
    """Accept arrays and array-likes (nested lists); reject what numpy would silently turn into an object array."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype == object and array.size and not all(isinstance(x, bytes | str) for x in array.flat):
        raise InvalidInputError(f"input {name!r}: elements must be numbers, or bytes/str for BYTES tensors")
    return array


def encode(name: str, array: np.ndarray) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """The tensor header and its raw little-endian bytes."""
    datatype = to_datatype(array.dtype)
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
    if datatype == "BYTES":
        return tensor, _encode_bytes(array)
    wire = to_numpy_dtype(datatype)
    return tensor, np.ascontiguousarray(array, dtype=wire).tobytes()


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """A read-only view of raw output bytes with the declared shape; a size mismatch is the server's error."""
    if datatype == "BYTES":
        return _decode_bytes(raw).reshape(shape)
    dtype = to_numpy_dtype(datatype)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise InferenceError(
            f"output {name!r}: {len(raw)} raw bytes do not match shape {list(shape)} of {datatype} "
            f"({expected} bytes expected)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_contents(name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> np.ndarray:
    """An array from typed contents (the slow, portable encoding some servers use)."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InferenceError(f"output {name!r}: datatype {datatype} cannot travel as typed contents")
    values = getattr(contents, field)
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    else:
        array = np.array(values, dtype=to_numpy_dtype(datatype))
    count = int(np.prod(shape, dtype=np.int64))
    if array.size != count:
        raise InferenceError(f"output {name!r}: {array.size} values do not match shape {list(shape)}")
    return array.reshape(shape)


def _encode_bytes(array: np.ndarray) -> bytes:
    """BYTES elements, each prefixed with its 4-byte little-endian length; `str` elements are UTF-8 encoded."""
    parts: list[bytes] = []
    for item in array.flat:
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_bytes(raw: bytes) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InferenceError("BYTES output is truncated inside an element length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InferenceError(f"BYTES output is truncated: an element of {length} bytes, {len(raw) - offset} left")
        items.append(raw[offset : offset + length])
        offset += length
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array
