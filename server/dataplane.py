"""The protocol-neutral request path: what every frontend (gRPC, HTTP/REST) translates its wire format onto.

A frontend turns its request into an `InferenceRequest` (tensors whose data it knows how to turn into numpy),
calls `DataPlane.infer` with an encoder for its own response type, and maps the `ServingError` it may raise through
its status table (`nnserve.server.frontends.status`). Everything else lives here once: draining and the count of
accepted requests, version lookup, decoding and checking every input in one pass, the executor, requested
outputs, statistics, per-request timing, the in-flight byte budget (`inflight_budget`: what each request reserves,
and when it is given back), the retry hint of a full queue or budget, and failures counted for requests that never
reached a version. Nothing here imports grpc or an HTTP library.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np

from nnserve.server import bytes_tensors
from nnserve.server.errors import (
    DeadlineExpiredError,
    ExecutionError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    OverBudgetError,
    QueueFullError,
    RepositoryControlError,
    RequestCancelledError,
    RequestTooLargeError,
    ServerUnavailableError,
    ServingError,
)
from nnserve.server.inflight_budget import FLOOR_BYTES, CostTable, InflightBudget, output_bytes
from nnserve.server.limits import MAX_RETRY_AFTER_MS, MIN_RETRY_AFTER_MS, RequestLimits, clip
from nnserve.server.repository import IndexRow, ModelEntry, ModelRepository, ServedVersion
from nnserve.server.settings import ServerSettings
from nnserve.server.statistics import UnroutedRequests, unrouted_labels
from nnserve.server.tensors import Signature, TensorSpec, check_input_shape, explain_input_names
from nnserve.server.timing import RequestTiming

if TYPE_CHECKING:
    from nnserve.server.tracing import RequestTrace, Tracing

log = logging.getLogger(__name__)

R = TypeVar("R")
ParameterValue = bool | int | float | str

SHUTTING_DOWN = "the server is shutting down and accepts no new requests; retry on another replica"
TIMEOUT_PARAMETER = "timeout"
"""The v2 schedule-policy request parameter: microseconds the request may wait (the earlier of it and the call's
own deadline wins)."""

# Failure labels for statistics and the metrics' `outcome` label (most specific class first).
FAILURE_REASONS: dict[type[ServingError], str] = {
    InvalidInputError: "invalid",
    ModelNotFoundError: "not_found",
    ModelNotReadyError: "not_ready",
    OverBudgetError: "over_budget",
    RequestTooLargeError: "over_budget",
    QueueFullError: "rejected",
    DeadlineExpiredError: "deadline",
    RequestCancelledError: "cancelled",
    ServerUnavailableError: "unavailable",
    ExecutionError: "internal",
}


def failure_reason(exc: ServingError) -> str:
    for cls in type(exc).__mro__:
        reason = FAILURE_REASONS.get(cls)  # type: ignore[call-overload]
        if reason is not None:
            return reason
    return "internal"


class TensorData(Protocol):
    """An input's data in its wire form; the frontend that received it knows how to turn it into numpy."""

    def to_array(self, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
        """The values as an array of `spec.dtype` and `shape`; InvalidInputError when they do not fit."""
        ...


SERIALIZED_COPIES = 2
"""An output is held twice until its request is answered: as the model's array, and in the response's bytes."""
DEFER_RELEASE_MIN_BYTES = 1 << 20
"""Reservations at least this large are kept until the frontend says the response has left (`on_answered`), so that
responses still being sent count against the budget; smaller ones are released when `infer` returns."""


@dataclass(frozen=True, slots=True)
class RawData:
    """Little-endian bytes in row-major order: gRPC raw contents, and HTTP binary tensor data (viewed, not copied).

    The array is a view of these bytes, so it costs the budget nothing beyond the request's own `wire_bytes`; any
    other TensorData's array is a copy and is counted, with `held_bytes_per_value` per value when its class sets it
    (what the frontend's own form of the values holds until the request is answered, e.g. JSON's Python numbers)."""

    data: bytes | bytearray | memoryview

    def to_array(self, spec: TensorSpec, shape: tuple[int, ...], count: int) -> np.ndarray:
        dtype = spec.dtype
        needed = count * dtype.itemsize
        if len(self.data) != needed:
            raise InvalidInputError(
                f"raw contents of input '{spec.name}' have {len(self.data)} bytes, but shape {_shape(shape)} of "
                f"{spec.datatype} needs {needed} bytes ({count} elements x {dtype.itemsize})"
            )
        return np.frombuffer(self.data, dtype=dtype).reshape(shape)


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input of a request as the frontend received it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: TensorData


@dataclass(slots=True)
class InferenceRequest:
    """A request in protocol-neutral form. `deadline` is the caller's (monotonic clock), if any; a `timeout`
    parameter may shorten it."""

    model: str
    version: str
    inputs: Sequence[InputTensor]
    outputs: Sequence[str] = ()
    id: str = ""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    deadline: float | None = None
    timing: bool = False
    """Whether the response should carry the `nnserve.*` timing parameters."""
    invalid: str | None = None
    """Why the frontend could not translate the request (e.g. raw contents that do not pair with the inputs): the
    request is then refused as invalid after routing, so that its model's statistics count it like any other."""
    wire_bytes: int = 0
    """Bytes the frontend holds for this request until it is answered: its message or body as received (and any
    parsed copy of it), counted against the in-flight budget."""
    on_answered: Callable[[Callable[..., object]], object] | None = None
    """When set, how the frontend runs a callback once the response has been sent (gRPC: the call's done
    callbacks); large reservations are then released at that moment rather than when `infer` returns."""
    trace: RequestTrace | None = None
    """The request's span when tracing is on and it is sampled (`DataPlane.tracing`); None otherwise, and then
    nothing on the request path touches OpenTelemetry."""


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    """Little-endian, in row-major order (possibly a view into the batch's output)."""


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What a frontend encodes into its response."""

    model: str
    version: str
    id: str
    outputs: tuple[OutputTensor, ...]


class ResponseEncoder(Protocol, Generic[R]):
    """How a frontend builds its response; `encode` is timed as the request's output stage."""

    def encode(self, result: InferenceResult) -> R: ...

    def add_timing(self, response: R, timing: RequestTiming, provider: str) -> None: ...


class DataPlane:
    """Readiness, metadata lookups, repository control and inference over one repository, for every frontend."""

    def __init__(self, repository: ModelRepository, settings: ServerSettings) -> None:
        self.repository = repository
        self.settings = settings
        self.limits = RequestLimits.from_settings(settings)
        self.budget = InflightBudget(settings.max_inflight_bytes or FLOOR_BYTES)
        """The in-flight byte budget; a derived default limit is set at start, once the models are loaded."""
        self._costs = CostTable()
        self.unrouted = UnroutedRequests()
        """Requests that failed before reaching a served version (for the metrics)."""
        self.draining = False
        self._inflight = 0
        self.accepted_total = 0
        """Inference requests accepted since the start (past the drain check); logged at shutdown."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.tracing: Tracing | None = None
        """Where frontends start a request's trace; None when tracing is off (the only check they make)."""

    # -- lifecycle and readiness ---------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Inference requests accepted and not yet answered."""
        return self._inflight

    def begin_drain(self) -> None:
        """Refuse new inference requests (ServerUnavailableError); those already accepted carry on."""
        self.draining = True

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no accepted request is left; False if `timeout` passed first."""
        if self._inflight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def is_ready(self) -> bool:
        """The server's readiness (ServerReady, health "", /v2/health/ready): see ModelRepository.all_ready."""
        if self.draining or not self.repository.startup_complete:
            return False
        return self.repository.all_ready() if self.settings.strict_readiness else True

    def model_ready(self, name: str, version: str = "") -> bool:
        if self.draining:
            return False
        try:
            self.repository.get(name, version)
        except ServingError:
            return False
        return True

    # -- lookups -----------------------------------------------------------------------------------------------

    def lookup(self, name: str, version: str, rpc: str) -> ServedVersion:
        """The served version for a metadata or config call; failures are counted under `rpc`."""
        try:
            return self.repository.get(name, version)
        except ServingError as exc:
            self.unrouted.record_lookup(*self._bounded_labels(name, version), rpc, failure_reason(exc))
            raise

    def entry(self, name: str) -> ModelEntry:
        return self.repository.entry(name)

    def statistics(self, name: str, version: str) -> list[ServedVersion]:
        """The versions a statistics call asks for: every model's when `name` is empty."""
        if name:
            entries = [self.repository.entry(name)]
        else:
            entries = self.repository.entries()
            if version:
                raise InvalidInputError("a version was given without a model name")
        served = [s for entry in entries for s in sorted(entry.served_versions, key=lambda s: s.version)]
        if version:
            served = [s for s in served if s.version_text == version]
            if not served:
                raise ModelNotFoundError(f"model '{clip(name)}' has no ready version {clip(version)!r}")
        return served

    # -- repository --------------------------------------------------------------------------------------------

    def index(self, *, ready_only: bool) -> list[IndexRow]:
        return self.repository.index(ready_only=ready_only)

    async def load(self, name: str, parameters: Collection[str] = ()) -> None:
        self._check_repository_control("load", parameters, allowed=())
        await self.repository.load(name)

    async def unload(self, name: str, parameters: Collection[str] = ()) -> None:
        self._check_repository_control("unload", parameters, allowed=("unload_dependents",))
        await self.repository.unload(name)

    def _check_repository_control(self, action: str, parameters: Collection[str], allowed: tuple[str, ...]) -> None:
        if self.settings.model_control != "explicit":
            raise RepositoryControlError(
                f"model {action} is disabled: the server runs with --model-control "
                f"{self.settings.model_control}; start it with --model-control explicit to {action} models"
            )
        unsupported = sorted(key for key in parameters if key not in allowed)
        if unsupported:
            raise InvalidInputError(f"{action} parameters {[clip(k) for k in unsupported]} are not supported")

    # -- inference -------------------------------------------------------------------------------------------

    def hold(self, model: str, version: str, nbytes: int | None, started: int) -> int:
        """Reserve a body's declared length before it is read (HTTP's Content-Length), refused as `infer` would.

        Returns the bytes held, which `infer(..., held_bytes=...)` takes over (and releases); a frontend that does
        not reach `infer` gives them back with `budget.release`. Nothing is held for a request that would not route
        or while draining: `infer` refuses those after the body is read, with their own status.
        """
        if not nbytes or self.draining:
            return 0
        try:
            served = self.repository.get(model, version)
        except ServingError:
            return 0
        try:
            self.budget.reserve(nbytes)
        except (OverBudgetError, RequestTooLargeError) as exc:
            served.stats.record_failure("over_budget", time.perf_counter_ns() - started)
            self._retry_hint(exc, served)
            raise
        return nbytes

    async def infer(
        self, request: InferenceRequest, encoder: ResponseEncoder[R], started: int, held_bytes: int = 0
    ) -> R:
        """Run one request and encode its response; `started` is `time.perf_counter_ns()` at receipt.

        `held_bytes` were reserved for it by `hold`; they are released with the rest of its reservation. Raises
        ServingError (draining included) for the frontend's status table; a QueueFullError (a full queue, or the
        in-flight budget: OverBudgetError) carries `retry_after_ms`.
        """
        if self.draining:
            self.budget.release(held_bytes)
            self.unrouted.record(*self._bounded_labels(request.model, request.version), "unavailable")
            error = ServerUnavailableError(SHUTTING_DOWN)
            if request.trace is not None:
                request.trace.failed("unavailable", error)
            raise error
        self._inflight += 1
        self.accepted_total += 1
        self._idle.clear()
        try:
            return await self._infer(request, encoder, started, held_bytes)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _infer(self, request: InferenceRequest, encoder: ResponseEncoder[R], started: int, held: int) -> R:
        reserved = held  # bytes of the budget this request holds; given back in `finally` unless handed over
        trace = request.trace
        try:
            try:
                served = self.repository.get(request.model, request.version)
            except ServingError as exc:
                self.unrouted.record(*self._bounded_labels(request.model, request.version), failure_reason(exc))
                if trace is not None:
                    trace.failed(failure_reason(exc), exc)
                raise
            if trace is not None:
                trace.routed(served)
            stats = served.stats
            signature = served.runner.signature
            expires = request.deadline
            try:
                expires = self._deadline(request)
                inputs, rows, input_bytes, copied = decode_inputs(request, signature, self.limits)
                names = requested_outputs(request.outputs, signature, self.limits)
                cost = self._costs.get(served)
                # Outputs twice: the arrays, and the response they are serialized into. Outputs the signature cannot
                # size are estimated as large as the inputs, and corrected once they exist.
                outputs_reserved = SERIALIZED_COPIES * (cost.output_bytes * (rows or 1)
                                                        + cost.open_outputs * input_bytes)
                need = request.wire_bytes + copied + outputs_reserved + (input_bytes if cost.merges else 0)
                if need > reserved:
                    try:
                        self.budget.reserve(need - reserved)
                    except (OverBudgetError, RequestTooLargeError) as exc:
                        self._retry_hint(exc, served)
                        raise
                    reserved = need
                decoded = time.perf_counter_ns()
                try:
                    outcome = await served.executor.submit(inputs, deadline=expires, trace=trace)
                except QueueFullError as exc:
                    exc.retry_after_ms = retry_after_ms(served)  # type: ignore[attr-defined]
                    raise
                del inputs  # the batcher is done with the arrays; the frontend's bytes are all that is left
                if cost.open_outputs:  # the estimate of the outputs the signature could not size, made exact
                    produced = SERIALIZED_COPIES * output_bytes(outcome.outputs) - outputs_reserved
                    if produced > 0:
                        self.budget.grow(produced)
                    else:
                        self.budget.release(-produced)
                    reserved += produced
                computed = time.perf_counter_ns()
                result = InferenceResult(served.name, served.version_text, request.id,
                                         select_outputs(outcome.outputs, names, signature))
                response = encoder.encode(result)
                if reserved >= DEFER_RELEASE_MIN_BYTES and request.on_answered is not None:
                    request.on_answered(functools.partial(_release, self.budget, reserved))
                    reserved = 0
            except ServingError as exc:
                stats.record_failure(failure_reason(exc), time.perf_counter_ns() - started)
                if trace is not None:
                    trace.failed(failure_reason(exc), exc)
                raise
            except asyncio.CancelledError as exc:
                # The frontend cancels the handler when the caller goes away or its deadline passes, often before
                # the batcher's own timer fires.
                expired = expires is not None and time.monotonic() >= expires
                stats.record_failure("deadline" if expired else "cancelled", time.perf_counter_ns() - started)
                if trace is not None:
                    trace.failed("deadline" if expired else "cancelled",
                                 DeadlineExpiredError("the deadline passed") if expired else exc)
                raise
            except Exception as exc:
                stats.record_failure("internal", time.perf_counter_ns() - started)
                if trace is not None:
                    trace.failed("internal", exc)
                raise
        finally:
            if reserved:
                self.budget.release(reserved)
        done = time.perf_counter_ns()
        timing = RequestTiming(
            total_ns=done - started,
            queue_ns=int(outcome.queue_seconds * 1e9),
            input_ns=decoded - started,
            infer_ns=int(outcome.compute_seconds * 1e9),
            output_ns=done - computed,
            batch_rows=outcome.batch_rows,
            batch_requests=outcome.batch_requests,
        )
        stats.record_success(rows or 1, timing)
        if trace is not None:
            trace.succeeded(rows or 1, timing, outcome, started)
        if request.timing:
            encoder.add_timing(response, timing, served.runner.provider)
        return response

    def _retry_hint(self, exc: ServingError, served: ServedVersion) -> None:
        """The hint of a budget refusal: how long the longest queue of any model takes to drain (the bytes are held
        by queued and running requests, of any model); none for a request that can never fit."""
        if isinstance(exc, OverBudgetError):
            waits = [retry_after_ms(s) for e in self.repository.entries() for s in e.served_versions
                     if s.executor.queue_depth or s is served]
            exc.retry_after_ms = max(waits, default=MIN_RETRY_AFTER_MS)  # type: ignore[attr-defined]

    def _deadline(self, request: InferenceRequest) -> float | None:
        """The earlier of the caller's deadline and the request's `timeout` parameter (microseconds)."""
        timeout = request.parameters.get(TIMEOUT_PARAMETER) if request.parameters else None
        if timeout is None:
            return request.deadline
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidInputError(
                f"parameter '{TIMEOUT_PARAMETER}' must be a non-negative integer number of microseconds, "
                f"got {clip(str(timeout))!r}"
            )
        if timeout == 0:  # the v2 convention: 0 is no timeout
            return request.deadline
        own = time.monotonic() + timeout / 1e6
        return own if request.deadline is None else min(own, request.deadline)

    def _bounded_labels(self, model: str, version: str) -> tuple[str, str]:
        try:
            versions: Collection[int] | None = self.repository.entry(model).versions
        except ServingError:
            versions = None
        return unrouted_labels(model, version, versions)


# -- the request's tensors ---------------------------------------------------------------------------------------


def decode_inputs(
    request: InferenceRequest, signature: Signature, limits: RequestLimits
) -> tuple[dict[str, np.ndarray], int, int, int]:
    """Validated numpy arrays for a request's inputs, the batch rows (0 when the model does not batch), the bytes
    of the arrays, and the bytes they hold beyond the request's own (arrays that are not views of RawData).

    The order of the checks is the order of the messages a client sees: counts, names, what the frontend could
    not translate, then each input's datatype, shape and data."""
    model = signature.model
    tensors = request.inputs
    limits.check_counts(len(tensors), 0, 0)
    if request.invalid is not None and not tensors:
        raise InvalidInputError(request.invalid)
    if len(tensors) != len(signature.inputs) or any(t.name not in signature.inputs_by_name for t in tensors):
        explain_input_names(tensors, signature)
    if request.invalid is not None:
        raise InvalidInputError(request.invalid)
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    total = copied = 0
    for tensor in tensors:
        spec = signature.inputs_by_name[tensor.name]
        if tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input '{spec.name}' of model '{model}' has datatype {spec.datatype}, "
                f"but the request says {clip(tensor.datatype) or '(empty)'}"
            )
        shape = tensor.shape
        count = check_input_shape(spec, shape, signature, limits)
        data = tensor.data
        if spec.datatype == "BYTES":
            array = _strings(data, spec, shape, count, limits)
            weight = bytes_tensors.held_bytes(array)  # never a view: the decoded strings weigh far more than the wire
            total += weight
            copied += weight
        else:
            array = data.to_array(spec, shape, count)
            total += array.nbytes
            if type(data) is not RawData:
                copied += array.nbytes + count * getattr(data, "held_bytes_per_value", 0)
        if signature.max_batch_size:
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInputError(
                    f"inputs disagree on the batch size: '{spec.name}' has {shape[0]} rows, others have {rows}; "
                    "every input of a request must carry the same number of rows"
                )
        arrays[spec.name] = array
    return arrays, max(rows, 0), total, copied


def _strings(data: TensorData, spec: TensorSpec, shape: tuple[int, ...], count: int,
             limits: RequestLimits) -> np.ndarray:
    """A BYTES input as an object array of `str`: from raw length-prefixed contents, or from the elements of a
    frontend's typed form (its `bytes_elements()`: the values and where they were found)."""
    if type(data) is RawData:
        return bytes_tensors.decode_raw(spec.name, data.data, shape, count, limits)
    elements = getattr(data, "bytes_elements", None)
    if elements is None:
        return data.to_array(spec, shape, count)
    values, where = elements()
    return bytes_tensors.decode_elements(spec.name, values, shape, count, limits, where=where)


def requested_outputs(names: Sequence[str], signature: Signature, limits: RequestLimits) -> tuple[str, ...]:
    """Names of the outputs to return: the request's selection (validated), else all."""
    if not names:
        return signature.output_names
    limits.check_counts(0, 0, len(names))
    for name in names:
        if name not in signature.outputs_by_name:
            raise InvalidInputError(
                f"unknown output {clip(name)!r} requested; model '{signature.model}' has outputs "
                f"{list(signature.output_names)}"
            )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"output names requested more than once: {[clip(n) for n in names]}")
    return tuple(names)


def select_outputs(
    outputs: Mapping[str, np.ndarray], names: Sequence[str], signature: Signature
) -> tuple[OutputTensor, ...]:
    """The selected outputs with their protocol datatypes, in little-endian byte order."""
    specs = signature.outputs_by_name
    selected = []
    for name in names:
        array = outputs[name]
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        selected.append(OutputTensor(name, specs[name].datatype, array))
    return tuple(selected)


def retry_after_ms(served: ServedVersion) -> int:
    """How long the model's current queue takes to drain, estimated from its own statistics, in milliseconds.

    Queue depth / requests per execution gives the executions still ahead; each takes the mean execution time
    seen so far, spread over the model's instances. Clamped to [1, 5000] ms: a hint, not a promise.
    """
    stats = served.stats
    batch_s = stats.compute_infer.ns / stats.compute_infer.count / 1e9 if stats.compute_infer.count else 0.001
    per_execution = max(1.0, stats.success.count / stats.execution_count) if stats.execution_count else 1.0
    executions = math.ceil(served.executor.queue_depth / per_execution)
    estimate_ms = executions * batch_s * 1000 / max(1, served.batching.instances)
    return int(min(MAX_RETRY_AFTER_MS, max(MIN_RETRY_AFTER_MS, math.ceil(estimate_ms))))


def _release(budget: InflightBudget, nbytes: int, *_called_with: object) -> None:
    budget.release(nbytes)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


__all__ = [
    "DataPlane",
    "InferenceRequest",
    "InferenceResult",
    "InputTensor",
    "OutputTensor",
    "RawData",
    "ResponseEncoder",
    "TensorData",
    "failure_reason",
]
