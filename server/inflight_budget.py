"""The server-wide budget for the bytes of inference requests accepted and not yet answered.

Queues are bounded in requests (`max_queue_size`); for a model with large inputs that is no bound on memory. The
budget bounds bytes, across models and protocols: every request reserves what it will hold before it is queued,
and a request whose reservation does not fit is refused at once (OverBudgetError: RESOURCE_EXHAUSTED / HTTP 429
with a retry hint); it is never half-accepted. A request larger than the whole budget can never fit and gets
RequestTooLargeError instead (RESOURCE_EXHAUSTED / HTTP 413, a message the SDK does not retry).

What a request reserves (`DataPlane` computes it, once its inputs are decoded and before it is queued):

* the request as received (the gRPC message, the HTTP body), which its frontend holds until it is answered;
* its decoded inputs where they are not views into those bytes (typed protobuf contents, JSON `data`: the array,
  and what the frontend holds per value of its own form, e.g. JSON's Python numbers);
* the copy of its inputs in a merged batch, for models that batch;
* its outputs, twice (the arrays, and the response bytes they are serialized into), reserved on arrival: exactly
  where the signature fixes their size (every dimension static, or only the batch dimension variable); where it
  leaves it open (e.g. `[-1, -1]`), each such output is estimated as large as the request's inputs, and the
  estimate is corrected when the outputs exist: a surplus is given back, an excess is added (`grow`, never
  refused: the work is done), so only outputs larger than their inputs can take the total past the limit, and
  every new request is refused until it is back under it.

The reservation is released when the request is answered (over gRPC, when its call ends, once the response has been
sent). Everything runs on the event loop, so the check is two integer operations and no lock: measured at
~0.1 us per request for reserve + release (`benchmarks/memory_per_byte.py`).

The default limit (`default_limit`): half of the memory the container may use (`memory_limit`) after the models'
measured resident size, at least `FLOOR_BYTES`; with `--workers N` each worker gets 1/N of the container.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nnserve.server import bytes_tensors
from nnserve.server.errors import OverBudgetError, RequestTooLargeError

if TYPE_CHECKING:
    from nnserve.server.repository import ServedVersion

MiB = 1 << 20
FLOOR_BYTES = 32 * MiB
"""The smallest default budget: where the models leave less than twice this, small requests are still served."""
TRANSPORT_SHARE = 4
"""The derived transport defaults keep one connection's messages in receipt within 1/TRANSPORT_SHARE of the memory."""
DEFAULT_STREAMS = 100
"""Streams per connection the derived message limit is sized for, and the least the derived stream limit allows:
HTTP/2's recommended minimum (RFC 9113 5.1.2), so that clients with many small calls on one connection are not
refused (gRPC resets the streams beyond the limit, which its clients see as UNAVAILABLE)."""
MAX_MESSAGE_DEFAULT = 64 * MiB
MIN_MESSAGE_DEFAULT = 1 * MiB
MAX_STREAMS = 1024
TOO_LARGE_FOR_BUDGET = "larger than the server's whole in-flight budget"
"""In the message of RequestTooLargeError; the SDK does not retry a RESOURCE_EXHAUSTED that says it."""


class InflightBudget:
    """Bytes reserved by accepted, unanswered requests against a limit; event-loop only (no lock)."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight budget must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        """The most bytes reserved at once since the start."""

    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` for a request about to be accepted, or refuse it (nothing is taken then)."""
        used = self.used + nbytes
        if used > self.limit:
            raise self._refusal(nbytes)
        self.used = used
        if used > self.peak:
            self.peak = used

    def grow(self, nbytes: int) -> None:
        """Account bytes an accepted request produced beyond its reservation (outputs of a size the signature left
        open): never refused, the work is done; new requests are refused while the total is over the limit."""
        self.used += nbytes
        if self.used > self.peak:
            self.peak = self.used

    def release(self, nbytes: int) -> None:
        """Give back what a request reserved (and grew) once it is answered."""
        self.used -= nbytes

    def _refusal(self, nbytes: int) -> OverBudgetError | RequestTooLargeError:
        if nbytes > self.limit:
            return RequestTooLargeError(
                f"the request needs {format_bytes(nbytes)} of memory in the server, {TOO_LARGE_FOR_BUDGET} "
                f"({format_bytes(self.limit)}, --max-inflight-bytes), so it can never be accepted; split it into "
                "smaller requests"
            )
        return OverBudgetError(
            f"the server is at its in-flight memory budget ({format_bytes(self.used)} of "
            f"{format_bytes(self.limit)} held by accepted requests, --max-inflight-bytes); this request needs "
            f"{format_bytes(nbytes)}: retry with backoff"
        )


def default_limit(memory: int, resident: int, workers: int = 1) -> int:
    """Half of this process's share of `memory` left after its `resident` bytes, at least FLOOR_BYTES."""
    share = memory // max(1, workers)
    return max(FLOOR_BYTES, (share - resident) // 2)


def transport_limits(memory: int, max_message_bytes: int | None, max_concurrent_streams: int | None,
                     workers: int = 1) -> tuple[int, int]:
    """The message size limit and the streams per connection, where the settings leave them to be derived.

    gRPC receives each unary message whole before a handler (and so the budget) sees it; one connection can hold
    max_message_bytes x streams that way. The derived defaults keep that product within a quarter of this process's
    share of `memory`: the message limit is what DEFAULT_STREAMS of them fit (1 to 64 MiB), the stream limit what
    fits of the message limit (100 to 1024). Only an explicit message limit above the derived one, or the 1 MiB
    floor below 400 MiB, takes the product past that quarter (the stream limit stays at 100).
    """
    transport = memory // max(1, workers) // TRANSPORT_SHARE
    message = max_message_bytes or int(min(MAX_MESSAGE_DEFAULT, max(MIN_MESSAGE_DEFAULT,
                                                                    transport // DEFAULT_STREAMS)))
    streams = max_concurrent_streams or int(min(MAX_STREAMS, max(DEFAULT_STREAMS, transport // message)))
    return message, streams


def format_bytes(nbytes: int) -> str:
    """A byte count for people: 512 B, 12.0 MiB, 3.50 GiB."""
    if abs(nbytes) < 1024:
        return f"{nbytes} B"
    if abs(nbytes) < 1 << 30:
        return f"{nbytes / MiB:.1f} MiB"
    return f"{nbytes / (1 << 30):.2f} GiB"


# -- what a request holds, from its model's signature -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputCost:
    """What a model version's requests reserve beside their own bytes, as far as the signature says."""

    output_bytes: int
    """Bytes of the outputs whose size the signature fixes: per row for a batched model, per request otherwise."""
    open_outputs: int
    """Outputs whose size the signature leaves open: each is estimated as large as the request's inputs."""
    merges: bool
    """Requests are concatenated into batches, which copies their inputs."""


class CostTable:
    """OutputCost per served version, computed once per loaded version (keyed by identity, never keeping one alive)."""

    def __init__(self) -> None:
        self._costs: dict[int, tuple[weakref.ref[ServedVersion], OutputCost]] = {}

    def get(self, served: ServedVersion) -> OutputCost:
        entry = self._costs.get(id(served))
        if entry is not None and entry[0]() is served:
            return entry[1]
        cost = output_cost(served)
        if len(self._costs) > 256:  # reloads leave dead entries behind; drop them now and then
            self._costs = {key: value for key, value in self._costs.items() if value[0]() is not None}
        self._costs[id(served)] = (weakref.ref(served), cost)
        return cost


def output_cost(served: ServedVersion) -> OutputCost:
    signature = served.runner.signature
    batched = signature.max_batch_size > 0
    fixed = 0
    open_outputs = 0
    for spec in signature.outputs:
        dims = spec.shape[1:] if batched else spec.shape
        if any(d < 0 for d in dims) or spec.datatype == "BYTES":  # strings: their size is only known once made
            open_outputs += 1
            continue
        count = 1
        for d in dims:
            count *= d
        fixed += count * spec.dtype.itemsize
    batching = served.batching
    merges = batched and batching.enabled and batching.max_batch_size > 1
    return OutputCost(fixed, open_outputs, merges)


def output_bytes(outputs: Mapping[str, np.ndarray]) -> int:
    """Bytes of a request's output arrays (views into a batch's outputs count their own rows; strings what their
    Python objects hold)."""
    return sum(bytes_tensors.held_bytes(array) if array.dtype.kind == "O" else array.nbytes
               for array in outputs.values())


__all__ = [
    "FLOOR_BYTES",
    "TOO_LARGE_FOR_BUDGET",
    "CostTable",
    "InflightBudget",
    "OutputCost",
    "default_limit",
    "format_bytes",
    "transport_limits",
]
