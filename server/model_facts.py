"""What a served model is and where it runs: opset and IR version, and the provider fallback check (the facts' wire
form is `nnserve.server.model_view`).

Size facts (parameters, bytes, FLOPs, layers) come from the builder's `metadata_props` (see `runner.ModelFacts`);
this module adds what the graph file and the session say, cheaply: the opset is read from the file's top-level
protobuf fields without parsing the (possibly gigabyte) graph.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnxruntime as ort

from nnserve.server.providers import CUDA, cuda_unavailable_reason, gpu_visible

log = logging.getLogger(__name__)

# ModelProto field numbers (onnx.proto): ir_version = 1, graph = 7, opset_import = 8; OperatorSetIdProto: domain = 1,
# version = 2.
_IR_VERSION, _OPSET_IMPORT, _DOMAIN, _VERSION = 1, 8, 1, 2
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_FIELDS = 10_000


@dataclass(frozen=True)
class ModelHeader:
    """The top-level facts of an ONNX file: IR version and the operator sets it imports."""

    ir_version: int | None = None
    opsets: dict[str, int] = field(default_factory=dict)

    @property
    def opset(self) -> int | None:
        """The default (ai.onnx) domain's opset, the number people mean by "opset"."""
        for domain in _DEFAULT_DOMAINS:
            if domain in self.opsets:
                return self.opsets[domain]
        return None


def read_model_header(path: Path) -> ModelHeader:
    """IR version and opsets of an ONNX file, skipping over the graph; an empty header if the file is unreadable."""
    try:
        with path.open("rb") as stream:
            return _scan_model(stream)
    except (OSError, ValueError) as exc:
        log.debug("cannot read the opset of %s: %s", path, exc)
        return ModelHeader()


def _scan_model(stream: BinaryIO) -> ModelHeader:
    ir_version: int | None = None
    opsets: dict[str, int] = {}
    for _ in range(_MAX_FIELDS):
        key = _key(stream)
        if key is None:
            break
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = _varint(stream)
            if number == _IR_VERSION:
                ir_version = value
        elif wire_type == 2:
            length = _varint(stream)
            if number == _OPSET_IMPORT:
                domain, version = _opset_entry(stream.read(length))
                opsets[domain] = version
            else:
                stream.seek(length, 1)
        elif wire_type in (1, 5):
            stream.seek(8 if wire_type == 1 else 4, 1)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    return ModelHeader(ir_version, opsets)


def _opset_entry(data: bytes) -> tuple[str, int]:
    stream = io.BytesIO(data)
    domain, version = "", 0
    while (key := _key(stream)) is not None:
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = _varint(stream)
            if number == _VERSION:
                version = value
        elif wire_type == 2:
            chunk = stream.read(_varint(stream))
            if number == _DOMAIN:
                domain = chunk.decode("utf-8", "replace")
        else:
            raise ValueError(f"unexpected wire type {wire_type} in an opset entry")
    return domain, version


def _key(stream: BinaryIO) -> int | None:
    """The next field key, or None at the end of the message."""
    first = stream.read(1)
    if not first:
        return None
    return _varint(stream, first[0])


def _varint(stream: BinaryIO, first: int | None = None) -> int:
    result = shift = 0
    byte = first
    while True:
        if byte is None:
            data = stream.read(1)
            if not data:
                raise ValueError("truncated varint")
            byte = data[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
        byte = None


def provider_fallback_reason(requested_device: str, provider: str, device_id: int) -> str:
    """Why a session that could have had CUDA runs elsewhere; "" when it runs where it was asked to.

    A fallback is a model whose device is `auto` or `cuda` on an onnxruntime build with the CUDA provider, running on
    another provider (onnxruntime-gpu without CUDA libraries or without a GPU silently runs on CPU). A CPU-only
    onnxruntime build running `auto` on CPU is not a fallback: CPU was the only choice.
    """
    if requested_device == "cpu" or provider == CUDA or CUDA not in ort.get_available_providers():
        return ""
    if requested_device == "auto" and not gpu_visible():
        return ""  # no GPU anywhere: the CPU was the plan, not a fallback
    return cuda_unavailable_reason(device_id) or f"onnxruntime placed the session on {provider} instead of CUDA"
