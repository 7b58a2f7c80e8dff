"""A closed-loop load generator on the asyncio client: N workers, each sending its next request when the last one
returns, bounded by time and by request count.

Why closed-loop: it measures what the server sustains at a given concurrency, the way Triton's perf_analyzer does
in its default mode, and it can never queue unbounded work on the client side. Retries are off so that every
rejection (RESOURCE_EXHAUSTED under overload) is counted, not hidden. The server's own view comes from
ModelStatistics snapshots taken just before and after each measurement: their difference splits a request's time
into queueing and compute, so client-side latency minus those is transport and serialization.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from nnserve.client.async_client import AsyncInferenceClient
from nnserve.client.datatypes import to_numpy_dtype
from nnserve.client.errors import InferenceError
from nnserve.client.types import Duration, ModelMetadata, ModelStatistics


@dataclass(frozen=True, slots=True)
class ServerSplit:
    """Server-side averages per request over one measurement, from ModelStatistics deltas (None: not reported)."""

    requests: int
    request_ms: float | None
    """Server time from arrival to response, per successful request."""
    queue_ms: float | None
    compute_input_ms: float | None
    compute_infer_ms: float | None
    compute_output_ms: float | None
    executions: int
    rows_per_execution: float | None
    """Average merged batch size: how much dynamic batching happened."""


@dataclass(frozen=True, slots=True)
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    duration_s: float
    requests: int
    """Successful requests."""
    rows: int
    requests_per_s: float
    rows_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    errors: dict[str, int] = field(default_factory=dict)
    """Failed requests by gRPC status name."""
    server: ServerSplit | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run: the levels and the bounds that apply to each."""

    model: str
    concurrency: tuple[int, ...]
    duration_s: float = 5.0
    warmup_s: float = 1.0
    batch_rows: int = 1
    max_requests: int = 1_000_000
    """Upper bound of requests per level (warmup not counted), whatever the duration."""
    version: str | None = None
    timeout_s: float = 30.0


def make_inputs(metadata: ModelMetadata, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of `rows` rows in each input's declared datatype; variable non-batch dimensions become 1."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in metadata.inputs:
        shape = (rows, *(d if d > 0 else 1 for d in tensor.shape[1:]))
        dtype = to_numpy_dtype(tensor.datatype)
        if dtype.kind == "f":
            inputs[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            inputs[tensor.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            inputs[tensor.name] = rng.integers(0, 100, shape).astype(dtype)
    return inputs


def failures_by_status(levels: Iterable[LevelResult]) -> Counter[str]:
    """Failed requests of every level, by gRPC status name."""
    total: Counter[str] = Counter()
    for level in levels:
        total.update(level.errors)
    return total


def unexpected_failures(levels: Iterable[LevelResult], allowed: Collection[str] = ()) -> Counter[str]:
    """The failures whose status is not in `allowed` (e.g. RESOURCE_EXHAUSTED when measuring overload): any of them
    means the measurement is not of a working server."""
    return Counter({code: count for code, count in failures_by_status(levels).items() if code not in allowed})


async def run_bench(
    client: AsyncInferenceClient, config: BenchConfig, on_level: Callable[[LevelResult], None] | None = None
) -> list[LevelResult]:
    """Measure each concurrency level in turn; `on_level(result)` is called after each (for live output)."""
    metadata = await client.model_metadata(config.model, config.version, timeout=config.timeout_s)
    inputs = make_inputs(metadata, config.batch_rows)
    results = []
    for concurrency in config.concurrency:
        result = await measure_level(client, config, inputs, concurrency)
        results.append(result)
        if on_level is not None:
            on_level(result)
    return results


async def measure_level(
    client: AsyncInferenceClient, config: BenchConfig, inputs: Mapping[str, np.ndarray], concurrency: int
) -> LevelResult:
    """Warm up, snapshot statistics, drive load for the duration (or count), snapshot again."""
    if config.warmup_s > 0:
        await _drive(client, config, inputs, concurrency, config.warmup_s, config.max_requests)
    before = await _statistics(client, config)
    started = time.monotonic()
    latencies, errors = await _drive(client, config, inputs, concurrency, config.duration_s, config.max_requests)
    elapsed = time.monotonic() - started
    after = await _statistics(client, config)
    count = len(latencies)
    ms = np.asarray(latencies) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99])) if count else (None, None, None)
    return LevelResult(
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=count,
        rows=count * config.batch_rows,
        requests_per_s=count / elapsed if elapsed > 0 else 0.0,
        rows_per_s=count * config.batch_rows / elapsed if elapsed > 0 else 0.0,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(ms.mean()) if count else None,
        max_ms=float(ms.max()) if count else None,
        errors=dict(errors),
        server=_split(before, after),
    )


async def _drive(
    client: AsyncInferenceClient,
    config: BenchConfig,
    inputs: Mapping[str, np.ndarray],
    concurrency: int,
    duration_s: float,
    max_requests: int,
) -> tuple[list[float], Counter[str]]:
    """Run `concurrency` closed-loop workers until the time or the request budget is spent."""
    deadline = time.monotonic() + duration_s
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < max_requests and time.monotonic() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                await client.infer(config.model, inputs, version=config.version, timeout=config.timeout_s)
            except InferenceError as error:
                errors[error.code.name] += 1
            else:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def _statistics(client: AsyncInferenceClient, config: BenchConfig) -> list[ModelStatistics] | None:
    """A snapshot of the model's statistics, or None when the server does not report them."""
    try:
        return list(await client.model_statistics(config.model, config.version, timeout=config.timeout_s))
    except InferenceError:
        return None


def _split(before: list[ModelStatistics] | None, after: list[ModelStatistics] | None) -> ServerSplit | None:
    """Per-request server averages from the difference of two snapshots, summed over versions."""
    if before is None or after is None or not after:
        return None
    earlier = {(s.name, s.version): s for s in before}
    deltas = [s - earlier[(s.name, s.version)] if (s.name, s.version) in earlier else s for s in after]

    def total(name: str) -> Duration:
        return Duration(sum(getattr(d, name).count for d in deltas), sum(getattr(d, name).ns for d in deltas))

    executions = sum(d.execution_count for d in deltas)
    inferences = sum(d.inference_count for d in deltas)
    success = total("success")
    return ServerSplit(
        requests=success.count,
        request_ms=success.mean_ms,
        queue_ms=total("queue").mean_ms,
        compute_input_ms=total("compute_input").mean_ms,
        compute_infer_ms=total("compute_infer").mean_ms,
        compute_output_ms=total("compute_output").mean_ms,
        executions=executions,
        rows_per_execution=inferences / executions if executions else None,
    )
