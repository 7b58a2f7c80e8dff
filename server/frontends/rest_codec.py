"""KServe v2 REST bodies <-> the data plane's request and result, JSON tensors and Triton's binary tensor extension.

A request body is JSON, or (when the `Inference-Header-Content-Length` header says how long its JSON header is) a
JSON header followed by the raw bytes of the inputs that declare `"parameters": {"binary_data_size": N}`, in the
order of `inputs`. Binary inputs are viewed in the body (no copy); JSON `data`, flat or nested in row-major
order, goes straight to numpy (one conversion, checked for the element kind and, for integers, the range).
A response carries an output as raw bytes when the request asked for it (the output's `binary_data` parameter,
else the request's `binary_data_output`), else as flat JSON `data`. Every error is an InvalidInputError naming
what was wrong and where.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import orjson

from nnserve.server import bytes_tensors
from nnserve.server.dataplane import (
    InferenceRequest,
    InferenceResult,
    InputTensor,
    ParameterValue,
    RawData,
)
from nnserve.server.errors import InvalidInputError
from nnserve.server.limits import RequestLimits, clip
from nnserve.server.tensors import TensorSpec, shape_text
from nnserve.server.timing import TIMING_PARAMETER, RequestTiming, timing_parameters

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
_TRUE_STRINGS = frozenset(("1", "true", "yes", "on"))

# Which JSON element kinds (numpy's kind of the parsed list) each datatype accepts.
_ACCEPTED_KINDS: dict[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


@dataclass(frozen=True, slots=True)
class JsonData:
    """An input's JSON `data`: a flat or nested list in row-major order."""

    values: Any
    held_bytes_per_value: ClassVar[int] = 32
    """What the parsed values hold until the request is answered, beside the array (a Python number and its list
    slot), for the in-flight budget (`dataplane.RawData`)."""

    def to_array(self, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
        try:
            parsed = np.asarray(self.values)
        except (ValueError, TypeError):
            raise InvalidInputError(
                f"input '{spec.name}': 'data' must be a list of numbers, flat or nested in row-major order with "
                f"every row the same length"
            ) from None
        if parsed.size != count:
            raise InvalidInputError(
                f"input '{spec.name}' has {parsed.size} values in 'data', but shape {shape_text(shape)} needs {count}"
            )
        target = spec.dtype
        accepted = _ACCEPTED_KINDS.get(target.kind, "")
        if parsed.size and parsed.dtype.kind not in accepted:
            found = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers with fractions",
                     "U": "strings", "O": "mixed values or nested lists of unequal length"}.get(parsed.dtype.kind,
                                                                                      parsed.dtype.kind)
            raise InvalidInputError(
                f"input '{spec.name}' is {spec.datatype}, but its 'data' holds {found}"
            )
        if target.kind in "iu" and parsed.size:
            info = np.iinfo(target)
            if parsed.min() < info.min or parsed.max() > info.max:
                raise InvalidInputError(
                    f"input '{spec.name}' has values outside the {spec.datatype} range [{info.min}, {info.max}]"
                )
        return parsed.astype(target, copy=False).reshape(shape)


    def bytes_elements(self) -> tuple[list[Any], str]:
        """A BYTES input's strings, flattened in row-major order (`nnserve.server.bytes_tensors` checks them)."""
        return _flatten(self.values), "'data'"


def _flatten(values: Any) -> list[Any]:
    """Nested lists flattened in row-major order without numpy (which would copy strings into a fixed-width
    array as wide as the longest one); a non-list is one element, for the element check to name."""
    if not isinstance(values, list):
        return [values]
    flat: list[Any] = []
    stack: list[Any] = [iter(values)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """How the response carries each output: raw bytes (binary extension) or JSON `data`."""

    binary: dict[str, bool]
    """Per requested output, when the request said."""
    default_binary: bool
    """For outputs the request did not name or did not say about (`binary_data_output`)."""

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.default_binary)


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str, limits: RequestLimits,
    deadline: float | None,
) -> tuple[InferenceRequest, OutputChoice]:
    """The data plane's request and the output choice for an infer body; InvalidInputError for a malformed one."""
    json_part: bytes | memoryview = body
    tail = memoryview(body)[0:0]
    if header_length is not None:
        length = _header_length(header_length, len(body))
        json_part, tail = memoryview(body)[:length], memoryview(body)[length:]
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        where = "the JSON header (its length from Inference-Header-Content-Length)" if header_length else "the body"
        raise InvalidInputError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInputError(f"the request must be a JSON object, got {type(document).__name__}")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInputError("the request needs 'inputs': a list of tensors")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects")
    limits.check_counts(len(inputs), 0, len(outputs))
    parameters = _parameters(document.get("parameters"), "the request's 'parameters'")
    tensors, used = _inputs(inputs, tail)
    if used != len(tail):
        raise InvalidInputError(
            f"the body has {len(tail)} bytes after the JSON header, but the inputs' binary_data_size add up to "
            f"{used}; they must be equal"
        )
    names, choice = _outputs(outputs, parameters)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string")
    timing = TIMING_PARAMETER in parameters and _truthy(parameters[TIMING_PARAMETER])
    return InferenceRequest(model, version, tensors, names, request_id, parameters, deadline, timing), choice


def _header_length(text: str, body_length: int) -> int:
    try:
        length = int(text)
    except ValueError:
        length = -1
    if not 0 <= length <= body_length:
        raise InvalidInputError(
            f"{HEADER_LENGTH} is {clip(text)!r}, but it must be the length of the JSON header: a whole number from 0 "
            f"to the body's {body_length} bytes"
        )
    return length


def _inputs(inputs: list[Any], tail: memoryview) -> tuple[list[InputTensor], int]:
    tensors = []
    offset = 0
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise InvalidInputError(f"inputs[{index}] must be an object with name, shape, datatype and data")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInputError(f"inputs[{index}] needs a 'name' (a string)")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInputError(f"input '{clip(name)}' needs a 'shape': a list of whole numbers")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInputError(f"input '{clip(name)}' needs a 'datatype' (a string such as \"FP32\")")
        parameters = _parameters(item.get("parameters"), f"input '{clip(name)}' 'parameters'")
        size = parameters.get(BINARY_DATA_SIZE)
        data: Any
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInputError(f"input '{clip(name)}': binary_data_size must be a whole number of bytes")
            if "data" in item:
                raise InvalidInputError(f"input '{clip(name)}' has both 'data' and binary_data_size; send one")
            if offset + size > len(tail):
                raise InvalidInputError(
                    f"input '{clip(name)}' declares binary_data_size {size}, but only {len(tail) - offset} bytes of "
                    "binary data are left in the body"
                )
            data = RawData(tail[offset:offset + size])
            offset += size
        elif "data" in item:
            data = JsonData(item["data"])
        else:
            raise InvalidInputError(f"input '{clip(name)}' has no 'data' (or binary_data_size parameter)")
        tensors.append(InputTensor(name, datatype, tuple(shape), data))
    return tensors, offset


def _outputs(outputs: list[Any], parameters: Mapping[str, ParameterValue]) -> tuple[list[str], OutputChoice]:
    names = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"outputs[{index}] must be an object with a 'name' (a string)")
        names.append(item["name"])
        own = _parameters(item.get("parameters"), f"output '{clip(item['name'])}' 'parameters'")
        if BINARY_DATA in own:
            binary[item["name"]] = _truthy(own[BINARY_DATA])
    return names, OutputChoice(binary, _truthy(parameters.get(BINARY_DATA_OUTPUT, False)))


def _parameters(value: Any, where: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, bool | int | float | str) for v in value.values()):
        raise InvalidInputError(f"{where} must be an object of string, number or boolean values")
    return value


def _truthy(value: ParameterValue) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_STRINGS
    return bool(value)


# -- responses ------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RestResponse:
    """An encoded infer response: the JSON part, the binary tails (possibly none) and its timing parameters."""

    document: dict[str, Any]
    tails: list[memoryview]

    def body(self) -> tuple[bytes, int | None]:
        """The body, and the JSON header's length when binary tails follow (for Inference-Header-Content-Length)."""
        header = orjson.dumps(self.document, option=orjson.OPT_SERIALIZE_NUMPY)
        if not self.tails:
            return header, None
        return b"".join([header, *self.tails]), len(header)


class RestEncoder:
    """Encodes the data plane's result as a v2 REST response, raw where the request asked for binary data."""

    def __init__(self, choice: OutputChoice) -> None:
        self._choice = choice

    def encode(self, result: InferenceResult) -> RestResponse:
        outputs = []
        tails: list[memoryview] = []
        for tensor in result.outputs:
            array = np.ascontiguousarray(tensor.array)
            entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape)}
            if self._choice.is_binary(tensor.name):
                if tensor.datatype == "BYTES":
                    view = memoryview(bytes_tensors.encode(array))
                else:
                    view = array.data.cast("B") if array.size else memoryview(b"")
                entry["parameters"] = {BINARY_DATA_SIZE: len(view)}
                tails.append(view)
            elif tensor.datatype == "BYTES":
                entry["data"] = bytes_tensors.as_text_list(array)
            else:
                entry["data"] = array.reshape(-1)
            outputs.append(entry)
        document: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
        document["id"] = result.id  # always, "" when the request gave none (kserve's InferenceResponse requires it)
        document["outputs"] = outputs
        return RestResponse(document, tails)

    def add_timing(self, response: RestResponse, timing: RequestTiming, provider: str) -> None:
        response.document["parameters"] = timing_parameters(timing, provider)


def json_body(document: Any) -> bytes:
    """Any other response (metadata, config, statistics, errors) as JSON bytes."""
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


__all__ = ["HEADER_LENGTH", "OutputChoice", "RestEncoder", "RestResponse", "json_body", "parse_infer_request"]
