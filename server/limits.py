"""Request limits: the bounds that keep one hostile or careless request from costing the server more than it should.

Every limit is a server setting with a flag and an `NNSERVE_*` variable (see `nnserve.server.cli`); a request over
a limit is refused with INVALID_ARGUMENT and a message naming the limit, the value found and the flag that raises
it. The checks run before any array is built, and every one is O(number of tensors + dimensions), never O(data).

Also here: the bound on status messages (a message that echoes a client's 10 MB tensor name would exceed the
client's 16 KiB metadata limit and reach it as an unreadable RESOURCE_EXHAUSTED), and the retry hint sent with
RESOURCE_EXHAUSTED when a model's queue is full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nnserve.server.errors import InvalidInputError

if TYPE_CHECKING:
    from nnserve.server.settings import ServerSettings

MAX_STATUS_MESSAGE_CHARS = 1024
"""Longest status message sent to a client. gRPC clients refuse trailers over 16 KiB (and warn over 8 KiB)."""

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED for a full queue: milliseconds to wait before retrying (any client)."""
PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The same hint under gRPC's own name (gRFC A6), which gRPC's built-in retry policy honours when a client has one."""
MIN_RETRY_AFTER_MS = 1
MAX_RETRY_AFTER_MS = 5000


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The per-request bounds, checked while a request is decoded (see `ServerSettings` for each default)."""

    max_inputs: int = 64
    """Most entries in `inputs`, in `raw_input_contents` and in requested `outputs`, each."""
    max_dims: int = 16
    """Most dimensions of one tensor's shape."""
    max_elements: int = 1 << 26
    """Most elements of one tensor; also the largest single dimension (a zero elsewhere must not hide a 2**62)."""
    max_rows: int = 1 << 16
    """Most rows (dimension 0) of one request to a batched model, whatever its max_batch_size allows."""
    max_bytes_elements: int = 1 << 20
    """Most elements of one BYTES tensor (`nnserve.server.bytes_tensors`)."""
    max_bytes_element_size: int = 1 << 20
    """Longest element of a BYTES tensor, in bytes as sent."""
    max_bytes_tensor_size: int = 1 << 26
    """Most bytes of one BYTES tensor as sent."""

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RequestLimits:
        return cls(
            max_inputs=settings.max_inputs_per_request,
            max_dims=settings.max_tensor_dims,
            max_elements=settings.max_tensor_elements,
            max_rows=settings.max_request_rows,
            max_bytes_elements=settings.max_bytes_elements,
            max_bytes_element_size=settings.max_bytes_element_size,
            max_bytes_tensor_size=settings.max_bytes_tensor_size,
        )

    def check_counts(self, inputs: int, raw: int, outputs: int) -> None:
        """Refuse requests with more tensors than the limit, before anything looks at them one by one."""
        for what, count in (("inputs", inputs), ("raw_input_contents entries", raw), ("requested outputs", outputs)):
            if count > self.max_inputs:
                raise InvalidInputError(
                    f"the request has {count} {what}; this server accepts at most {self.max_inputs} "
                    "(--max-inputs-per-request)"
                )

    def check_shape(self, name: str, shape: Sequence[int]) -> None:
        """Refuse shapes with too many dimensions, or a dimension or element count over the limit (no overflow:
        the product is checked as it grows)."""
        if len(shape) > self.max_dims:
            raise InvalidInputError(
                f"input {clip(name)!r} has {len(shape)} dimensions; this server accepts at most {self.max_dims} "
                "(--max-tensor-dims)"
            )
        count = 1
        for axis, dim in enumerate(shape):
            if dim > self.max_elements:
                raise InvalidInputError(
                    f"input {clip(name)!r} dimension {axis} is {dim}: too many elements (one tensor may have at "
                    f"most {self.max_elements}, --max-tensor-elements)"
                )
            count *= max(dim, 0)
            if count > self.max_elements:
                raise InvalidInputError(
                    f"input {clip(name)!r} shape {_shape_text(shape)} has too many elements (one tensor may have at "
                    f"most {self.max_elements}, --max-tensor-elements)"
                )

    def check_rows(self, name: str, rows: int, model: str) -> None:
        """Refuse a batched request with more rows than the server-wide bound."""
        if rows > self.max_rows:
            raise InvalidInputError(
                f"input {clip(name)!r} has {rows} rows; this server accepts at most {self.max_rows} rows per request "
                f"(--max-request-rows), whatever model {clip(model)!r} allows; split it into several requests"
            )


DEFAULT_LIMITS = RequestLimits()


def clip(text: str, limit: int = 64) -> str:
    """A client-supplied string shortened for quoting in a message (names can be megabytes long)."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def client_message(text: str) -> str:
    """A status message bounded to MAX_STATUS_MESSAGE_CHARS, so that it always reaches the client intact."""
    if len(text) <= MAX_STATUS_MESSAGE_CHARS:
        return text
    return text[: MAX_STATUS_MESSAGE_CHARS - 24] + " ... (message truncated)"


def retry_trailers(milliseconds: int) -> tuple[tuple[str, str], ...]:
    """Trailing metadata carrying the retry hint under both names."""
    value = str(milliseconds)
    return ((RETRY_AFTER_KEY, value), (PUSHBACK_KEY, value))


def _shape_text(shape: Sequence[int]) -> str:
    shown = ", ".join(str(d) for d in shape[:8])
    return f"[{shown}{', ...' if len(shape) > 8 else ''}]"
