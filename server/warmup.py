"""Warm-up: run a new version on zeroed inputs at the batch sizes it will see, before it reports READY.

The first run of a session at a new shape pays onnxruntime's allocations (and on CUDA, cuDNN/cuBLAS set-up): the
25M-parameter network's first 1-row request after READY took 14-23 ms against about 8 ms steady on the 2-core
machine. A version is warmed at its `preferred_batch_sizes` and the powers of two up to `max_batch_size` (or the
sizes of `warmup.batch_sizes` in config.json), inside a time budget (`--warmup-timeout`): sizes left when the
budget runs out are skipped with a log line, never failed. Dynamic dimensions other than the batch need their sizes
from `warmup.dims`; an input without them skips the warm-up (logged). Warm-up runs call the runner directly, so
they stay out of the statistics and metrics; a run that fails makes the version UNAVAILABLE with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nnserve.server import bytes_tensors
from nnserve.server.errors import ExecutionError, ModelLoadError
from nnserve.server.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class WarmupReport:
    """What a warm-up did: seconds per batch size run, what was skipped and why."""

    seconds: dict[int, float] = field(default_factory=dict)
    skipped: str = ""

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def batch_sizes(max_batch_size: int, preferred: Sequence[int], configured: Sequence[int] | None) -> list[int]:
    """The sizes to warm: the configured ones, else preferred sizes and powers of two up to max_batch_size (one
    run, size 0 meaning "the fixed shape", for a model without a batch dimension)."""
    if max_batch_size <= 0:
        return [0]
    if configured:
        return sorted({size for size in configured if size <= max_batch_size})
    sizes = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k <= max_batch_size}
    sizes.add(max_batch_size)
    sizes.update(size for size in preferred if size <= max_batch_size)
    return sorted(sizes)


def zero_inputs(runner: ModelRunner, rows: int, dims: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray] | str:
    """Zeroed inputs (empty strings for BYTES) of `rows` rows (0: the fixed shape), or why they cannot be made (a
    dynamic dimension)."""
    arrays: dict[str, np.ndarray] = {}
    batched = runner.batched
    for spec in runner.signature.inputs:
        rest = spec.shape[1:] if batched else spec.shape
        if any(d < 0 for d in rest):
            given = dims.get(spec.name)
            if given is None or len(given) != len(rest):
                return (f"input '{spec.name}' has dynamic dimensions {list(spec.shape)}: give their sizes in "
                        f"config.json warmup.dims (the {len(rest)} dims after the batch one)")
            rest = tuple(given)
        shape = (rows, *rest) if batched else tuple(rest)
        arrays[spec.name] = bytes_tensors.fill(shape) if spec.datatype == "BYTES" else np.zeros(shape, spec.dtype)
    return arrays


def warm_up(
    runner: ModelRunner, sizes: Sequence[int], dims: Mapping[str, Sequence[int]], budget_s: float
) -> WarmupReport:
    """Run `runner` once per size (ModelLoadError if a run fails); stops early when `budget_s` is spent."""
    report = WarmupReport()
    label = f"'{runner.name}' version {runner.version}"
    started = time.monotonic()
    for index, rows in enumerate(sizes):
        if time.monotonic() - started >= budget_s:
            report.skipped = f"the {budget_s:g} s warm-up budget ran out before batch sizes {list(sizes[index:])}"
            break
        inputs = zero_inputs(runner, rows, dims)
        if isinstance(inputs, str):
            report.skipped = inputs
            break
        began = time.perf_counter()
        try:
            runner.run(inputs)
        except ExecutionError as exc:
            raise ModelLoadError(f"model {label} failed its warm-up at batch size {rows or 'fixed'}: {exc}") from None
        report.seconds[rows] = time.perf_counter() - began
    if report.skipped:
        log.info("model %s: warm-up skipped (%s)", label, report.skipped)
    if report.seconds:
        log.info("model %s warmed up at batch sizes %s in %.3f s", label,
                 [size or "fixed" for size in report.seconds], report.total_s)
    return report
