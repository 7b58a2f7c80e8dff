"""ModelInfer messages without copies of their tensor bytes: the request deserializer and the response serializer.

What protobuf costs a large request (measured with `benchmarks/memory_per_byte.py`): grpc hands the handler the
message as one `bytes` object and keeps it until the call ends; `ModelInferRequest.FromString` copies every raw
input into the message's arena; reading `raw_input_contents[i]` copies it once more into a new `bytes`. A queued
51 MB request thus held three copies of its tensor. On the way out, `tobytes()` copied each output, the message
constructor copied it into an arena and `SerializeToString` once more.

Here, a message of at least ZERO_COPY_MIN_BYTES is parsed in two parts: its top-level fields are walked (a handful
of length-prefixed fields) and every `raw_input_contents` entry becomes a memoryview into grpc's own bytes, which
`np.frombuffer` views in turn; only the rest (names, shapes, parameters: small) goes through protobuf. The queued
request holds its message once. A response with large outputs is written in one join: the small header through
protobuf, each output appended as field 6 (`raw_output_contents`) straight from its array, which is dropped as soon
as the bytes exist. The bytes on the wire are the same either way (protobuf parses fields in any order and merges
repeated ones), and small messages take protobuf's own path, which is faster for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from nnserve.protos import grpc_service_pb2 as pb
from nnserve.server import bytes_tensors

ZERO_COPY_MIN_BYTES = 64 * 1024
"""Messages (and outputs) below this take protobuf's own path: for them the copies are cheap and its C parser is
faster than walking the fields in Python."""
_MAX_TOP_LEVEL_FIELDS = 4096
"""A message with more top-level fields than this is left to protobuf (a hostile one could have millions of tiny
fields, each a step of a Python loop); it parses them in C and the request is then refused for its counts."""
_RAW_INPUT_FIELD = 7
_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # raw_output_contents, length-delimited
_INFER = "ModelInfer"
_STREAM = "ModelStreamInfer"


class ParsedInferRequest:
    """A ModelInferRequest whose raw inputs are views into the received bytes; reads like the protobuf message."""

    __slots__ = ("message", "raw_input_contents", "wire_bytes")

    def __init__(self, message: pb.ModelInferRequest, raw: list[memoryview], wire_bytes: int) -> None:
        self.message = message
        """Every field except raw_input_contents."""
        self.raw_input_contents = raw
        self.wire_bytes = wire_bytes
        """The received message and its parsed header: what the request holds."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def parse_infer_request(data: bytes) -> pb.ModelInferRequest | ParsedInferRequest:
    """The request message: large ones with their raw inputs as views into `data` (DecodeError when malformed)."""
    if len(data) < ZERO_COPY_MIN_BYTES:
        return pb.ModelInferRequest.FromString(data)
    split = _split_raw_fields(data)
    if split is None:
        return pb.ModelInferRequest.FromString(data)  # raises DecodeError for what is not protobuf
    spans, raw = split
    view = memoryview(data)
    header = view[spans[0][0]:spans[0][1]] if len(spans) == 1 else b"".join(view[a:b] for a, b in spans)
    message = pb.ModelInferRequest.FromString(header)
    return ParsedInferRequest(message, raw, len(data) + len(header))


def _split_raw_fields(data: bytes) -> tuple[list[tuple[int, int]], list[memoryview]] | None:
    """Byte ranges of the fields other than raw_input_contents, and views of those entries; None where the walk
    cannot tell (not protobuf, unusual wire types, too many fields), for protobuf to decide."""
    try:
        return _walk(data)
    except DecodeError:
        return None


def _walk(data: bytes) -> tuple[list[tuple[int, int]], list[memoryview]] | None:
    view = memoryview(data)
    spans: list[tuple[int, int]] = []
    raw: list[memoryview] = []
    position, end, fields = 0, len(data), 0
    while position < end:
        fields += 1
        if fields > _MAX_TOP_LEVEL_FIELDS:
            return None
        start = position
        key, position = _varint(data, position)
        wire_type = key & 7
        if wire_type == 2:
            length, position = _varint(data, position)
            stop = position + length
            if stop > end:
                return None
            if key >> 3 == _RAW_INPUT_FIELD:
                raw.append(view[position:stop])
                position = stop
                continue
            position = stop
        elif wire_type == 0:
            _value, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        else:
            return None
        if position > end or key >> 3 == 0:
            return None
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], position)
        else:
            spans.append((start, position))
    return (spans or [(0, 0)]), raw


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


# -- responses -------------------------------------------------------------------------------------------------


class RawInferResponse:
    """A ModelInferResponse still in parts: the header message and the output arrays its raw contents will be."""

    __slots__ = ("arrays", "message")

    def __init__(self, message: pb.ModelInferResponse, arrays: Sequence[np.ndarray]) -> None:
        self.message = message
        self.arrays = arrays

    @property
    def parameters(self) -> Any:
        return self.message.parameters

    def serialize(self) -> bytes:
        """The wire bytes, made once; the arrays are dropped, so only these bytes are left to send."""
        parts: list[bytes | memoryview] = [self.message.SerializeToString()]
        for array in self.arrays:
            if array.dtype.kind == "O":  # BYTES: length-prefixed UTF-8, made here
                encoded = bytes_tensors.encode(array)
                parts.append(_RAW_OUTPUT_TAG + _varint_bytes(len(encoded)))
                parts.append(encoded)
                continue
            contiguous = np.ascontiguousarray(array)
            parts.append(_RAW_OUTPUT_TAG + _varint_bytes(contiguous.nbytes))
            parts.append(contiguous.reshape(-1).view(np.uint8).data if contiguous.size else b"")
        self.arrays = ()
        return b"".join(parts)


def serialize_infer_response(response: pb.ModelInferResponse | RawInferResponse) -> bytes:
    """ModelInfer's response serializer: either form of the response."""
    if type(response) is RawInferResponse:
        return response.serialize()
    return response.SerializeToString()  # type: ignore[union-attr]


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- registering the codecs ----------------------------------------------------------------------------------------


class PayloadCodecs:
    """Stands in for the server (or a registrar) while GRPCInferenceService registers: ModelInfer and
    ModelStreamInfer get `parse_infer_request`, ModelInfer's responses `serialize_infer_response`."""

    def __init__(self, registrar: Any, service: str) -> None:
        self._registrar = registrar
        self._service = service

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._registrar.add_generic_rpc_handlers(tuple(_CodecGenericHandler(h, self._service) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        if service == self._service:
            handlers = {name: with_codecs(name, handler) for name, handler in handlers.items()}
        self._registrar.add_registered_method_handlers(service, handlers)


class _CodecGenericHandler:
    def __init__(self, inner: Any, service: str) -> None:
        self._inner = inner
        self._prefix = f"/{service}/"

    def service(self, handler_call_details: Any) -> Any:
        handler = self._inner.service(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        return with_codecs(method[len(self._prefix):], handler)


def with_codecs(method: str, handler: Any) -> Any:
    """The method handler with this module's request parsing (and, for ModelInfer, response serialization)."""
    replace: dict[str, Callable[..., Any]] = {}
    if method in (_INFER, _STREAM):
        replace["request_deserializer"] = parse_infer_request
    if method == _INFER:
        replace["response_serializer"] = serialize_infer_response
    return handler._replace(**replace) if replace else handler


__all__ = [
    "ZERO_COPY_MIN_BYTES",
    "ParsedInferRequest",
    "PayloadCodecs",
    "RawInferResponse",
    "parse_infer_request",
    "serialize_infer_response",
]
