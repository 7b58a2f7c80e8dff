"""BYTES tensors: the v2 wire form of string elements <-> the numpy object arrays of `str` onnxruntime takes.

On the wire (gRPC raw contents, HTTP binary tensor data) a BYTES tensor is its elements in row-major order, each a
4-byte little-endian unsigned length followed by that many bytes; gRPC's typed form is `bytes_contents` and
REST's JSON form a list of strings. onnxruntime's `tensor(string)` holds UTF-8 text: it turns every element it is
given into `str` (a Python `bytes` element would become the text "b'...'"), and hands strings back as `str`. So
the rule is UTF-8 both ways: an input element that is not valid UTF-8 is refused with INVALID_ARGUMENT naming the
input and the element, and outputs are sent as the UTF-8 bytes of onnxruntime's strings.

Decoded strings weigh far more than their wire form (a Python `str` is about 50 bytes before its first
character, and onnxruntime copies each into a `std::string` again), so `held_bytes` gives what an array really
holds, for the in-flight byte budget; the limits (elements, element length, tensor bytes) are checked while the
buffer is walked, before any string is made.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnserve.server.errors import InvalidInputError
from nnserve.server.limits import RequestLimits

LENGTH_PREFIX = struct.Struct("<I")
BYTES_DTYPE = np.dtype(object)
_POINTER = 8
_NATIVE_COPY_OVERHEAD = 32
"""onnxruntime's std::string per element (its inline buffer holds short strings; longer ones add their length)."""


def _check_tensor(name: str, total: int, count: int, limits: RequestLimits) -> None:
    if count > limits.max_bytes_elements:
        raise InvalidInputError(
            f"BYTES input '{name}' has {count} elements; this server accepts at most {limits.max_bytes_elements} "
            "per BYTES tensor (--max-bytes-elements)"
        )
    if total > limits.max_bytes_tensor_size:
        raise InvalidInputError(
            f"BYTES input '{name}' carries {total} bytes; this server accepts at most {limits.max_bytes_tensor_size} "
            "per BYTES tensor (--max-bytes-tensor-size)"
        )


def _element_too_long(name: str, index: int, length: int, limits: RequestLimits) -> InvalidInputError:
    return InvalidInputError(
        f"BYTES input '{name}' element {index} is {length} bytes long; this server accepts at most "
        f"{limits.max_bytes_element_size} bytes per element (--max-bytes-element-size)"
    )


def _text(name: str, index: int, data: bytes | memoryview) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"BYTES input '{name}' element {index} is not valid UTF-8 (byte 0x{bytes(data)[exc.start]:02x} at "
            f"offset {exc.start}); the model's string tensors hold UTF-8 text, so send text encoded as UTF-8"
        ) from None


def decode_raw(name: str, buffer: bytes | bytearray | memoryview, shape: tuple[int, ...], count: int,
               limits: RequestLimits) -> np.ndarray:
    """The elements of a length-prefixed buffer as an object array of `str`; InvalidInputError for a buffer that
    does not hold exactly `count` whole elements, an element over the limit, or one that is not UTF-8."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    end = len(view)
    _check_tensor(name, end, count, limits)
    longest = limits.max_bytes_element_size
    values: list[str] = []
    append = values.append
    position = 0
    unpack = LENGTH_PREFIX.unpack_from
    for index in range(count):
        if position + 4 > end:
            found = f"ends inside the length of element {index}" if position < end else f"ends after {index}"
            raise InvalidInputError(
                f"BYTES input '{name}' has {count} elements in shape {_shape(shape)}, but its raw contents {found} "
                "(each element is a 4-byte little-endian length, then that many bytes)"
            )
        (length,) = unpack(view, position)
        position += 4
        if length > longest:
            raise _element_too_long(name, index, length, limits)
        stop = position + length
        if stop > end:
            raise InvalidInputError(
                f"BYTES input '{name}' element {index} declares {length} bytes, but only {end - position} are left "
                "in its raw contents (a truncated element, or a length that is not 4-byte little-endian)"
            )
        append(_text(name, index, view[position:stop]))
        position = stop
    if position != end:
        raise InvalidInputError(
            f"BYTES input '{name}' raw contents have {end - position} bytes after its {count} elements (shape "
            f"{_shape(shape)}): more elements than the shape, or a wrong length prefix"
        )
    return _object_array(values, shape)


def decode_elements(name: str, elements: Sequence[Any], shape: tuple[int, ...], count: int,
                    limits: RequestLimits, *, where: str) -> np.ndarray:
    """Typed elements (gRPC `bytes_contents`: bytes; REST JSON: str) as an object array of `str`."""
    if len(elements) != count:
        raise InvalidInputError(
            f"BYTES input '{name}' has {len(elements)} elements in {where}, but shape {_shape(shape)} needs {count}"
        )
    _check_tensor(name, 0, count, limits)
    longest = limits.max_bytes_element_size
    values: list[str] = []
    total = 0
    for index, element in enumerate(elements):
        if isinstance(element, str):
            length = len(element) if element.isascii() else _utf8_length(name, index, element)
        elif isinstance(element, bytes | bytearray):
            length = len(element)
        else:
            raise InvalidInputError(
                f"BYTES input '{name}' element {index} in {where} is {_kind(element)}; BYTES elements are strings"
            )
        if length > longest:
            raise _element_too_long(name, index, length, limits)
        text = element if isinstance(element, str) else _text(name, index, element)
        total += length
        if total > limits.max_bytes_tensor_size:
            _check_tensor(name, total, count, limits)
        values.append(text)
    return _object_array(values, shape)


def _utf8_length(name: str, index: int, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): not text that UTF-8 or onnxruntime can hold
        raise InvalidInputError(
            f"BYTES input '{name}' element {index} holds a lone UTF-16 surrogate, which is not text"
        ) from None


def held_bytes(array: np.ndarray) -> int:
    """What an object array of strings holds: its pointers, each Python `str`, and onnxruntime's copy of each."""
    total = array.size * (_POINTER + _NATIVE_COPY_OVERHEAD)
    getsizeof = sys.getsizeof
    for value in array.flat:
        total += getsizeof(value) + len(value)
    return total


def encode(array: np.ndarray) -> bytes:
    """An array of `str` (or `bytes`) elements as length-prefixed UTF-8, in row-major order."""
    pack = LENGTH_PREFIX.pack
    parts: list[bytes] = []
    append = parts.append
    for value in np.ravel(array, order="C"):
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        append(pack(len(data)))
        append(data)
    return b"".join(parts)


def as_text_list(array: np.ndarray) -> list[str]:
    """The elements as JSON strings, row-major (REST's JSON form of a BYTES output)."""
    return [value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
            for value in np.ravel(array, order="C")]


def encoded_size(array: np.ndarray) -> int:
    """Bytes of `encode(array)` without making them (for the response's size before it is written)."""
    total = 4 * array.size
    for value in np.ravel(array, order="C"):
        total += len(value) if isinstance(value, bytes) or value.isascii() else len(value.encode("utf-8"))
    return total


def fill(shape: tuple[int, ...]) -> np.ndarray:
    """An array of empty strings (what a warm-up run feeds a string input)."""
    array = np.empty(shape, dtype=BYTES_DTYPE)
    array.fill("")
    return array


def _object_array(values: list[str], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=BYTES_DTYPE)
    array[:] = values
    return array.reshape(shape)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__) if value is not None else "null"


__all__ = [
    "BYTES_DTYPE",
    "as_text_list",
    "decode_elements",
    "decode_raw",
    "encode",
    "encoded_size",
    "fill",
    "held_bytes",
]
