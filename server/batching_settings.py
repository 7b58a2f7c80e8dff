"""Dynamic batching settings of one model: one frozen, validated object per model.

The config layer (command line, environment, per-model config file) builds this object; the batcher only reads it.
Invalid values raise `ValueError` at construction, so a bad config stops a model at load time with a message that
names the field, instead of misbehaving under load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

DelayMode = Literal["fixed", "adaptive"]
DELAY_MODES: tuple[str, ...] = get_args(DelayMode)


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """How requests of one model are queued, merged along axis 0 and executed."""

    enabled: bool = True
    """Merge concurrent requests into batches. When False every request runs alone, through the same queue,
    deadlines and instance bound, so switching batching off changes throughput, never the API or its errors."""

    max_batch_size: int = 64
    """Most rows (axis 0, summed over the merged requests) in one execution. A single request with more rows is
    rejected before queueing; requests are never split across executions."""

    max_queue_delay_us: int = 100
    """Longest time, in microseconds, a request waits for companions, counted from its arrival: the window of the
    `fixed` delay mode, the upper bound (latency budget) of the `adaptive` one. Waits are exact to tens of
    microseconds (a timerfd, see `precise_timer`), not rounded up to asyncio's millisecond.

    Why 100 us: on the machines measured (design.md section 8) a request costs ~150-200 us of transport and Python
    and onnxruntime runs a small MLP in ~8 us at batch 1, so a lone request pays at most about half of its own cost
    for the chance to share an execution. Under load the window matters little: requests that arrive while every
    instance is busy accumulate in the queue and the next free instance takes them all at once (natural batching);
    as the window counts from arrival, they do not wait a second time. A large model (milliseconds per batch) batches
    well through that effect alone. 500 us would more than triple the p50 of a tiny model at concurrency 1. Raise it
    for GPUs or when throughput matters more than latency at low concurrency; 0 runs at once with whatever is queued.
    """

    delay_mode: DelayMode = "adaptive"
    """How `max_queue_delay_us` is used. `fixed` (Triton's rule): a batch waits for companions until its first
    request has waited `max_queue_delay_us`. `adaptive`: `max_queue_delay_us` is a budget, and a batch waits for
    the next request only while the measured per-batch cost and arrival pattern say the wait pays (the rule is in
    `nnserve.server.batch_policy`): a lone client or a tiny model never waits, bursts to a large model are gathered.
    The default because, measured side by side (benchmarks/run.py, 2 CPUs, two full runs), it was never worse than
    `fixed` beyond the noise: the same throughput for the 25M-parameter network (x0.96-1.04 at every level) and
    1.17-1.32x the requests per second of the seed network at concurrency 1, 8 and 64, whose lone requests no longer
    sit out the window. Use `fixed` for Triton's predictable windows."""

    inline_max_compute_us: int = 50
    """Run a batch on the event loop itself, skipping the executor-thread hand-off, when the model's measured
    compute time for that many rows is below this many microseconds; 0 always uses the executor threads.

    Why 50 us: handing a batch to a thread and back costs ~50-100 us of wake-ups on the machines measured, more than
    a tiny network's whole compute (~5 us for the seed networks), while an inline call holds the loop only for its
    compute time. A model is first timed on the executor (16 batches) and moves inline only when measured cheap, so
    a large model never blocks the loop; one that grows slow moves back as its timings update."""

    preferred_batch_sizes: tuple[int, ...] = ()
    """Row counts at which a batch closes early when nothing else is queued (for example sizes that a GPU kernel or
    a TensorRT profile handles best). Each must lie in 1..max_batch_size; stored sorted and without duplicates."""

    max_queue_size: int = 1024
    """Most requests accepted but not yet executing. One more is rejected at once with QueueFullError
    (RESOURCE_EXHAUSTED) so that overload fails fast and memory stays bounded instead of latency growing without
    limit; clients retry with backoff."""

    instances: int = 1
    """Batches of this model executing concurrently, each on its own executor thread. onnxruntime releases the GIL
    and its sessions are thread-safe, so two instances overlap one batch's compute with the next one's merge, and
    use more cores when the session's own thread pool does not."""

    def __post_init__(self) -> None:
        """Normalize the preferred sizes (config files give lists) and reject invalid values at construction."""
        preferred = self.preferred_batch_sizes
        if isinstance(preferred, list | tuple | set | frozenset):
            for size in preferred:
                _require_int("preferred_batch_sizes", size, minimum=1)
            object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(preferred))))
        self.validate()

    @property
    def max_queue_delay_s(self) -> float:
        """The queue delay in seconds, the unit of the event loop's clock."""
        return self.max_queue_delay_us / 1_000_000

    def validate(self) -> None:
        """Raise ValueError naming the field, the value found and what is allowed."""
        if not isinstance(self.enabled, bool):
            raise ValueError(f"batching.enabled must be true or false, got {self.enabled!r}")
        _require_int("max_batch_size", self.max_batch_size, minimum=1)
        _require_int("max_queue_delay_us", self.max_queue_delay_us, minimum=0)
        _require_int("max_queue_size", self.max_queue_size, minimum=1)
        _require_int("instances", self.instances, minimum=1)
        _require_int("inline_max_compute_us", self.inline_max_compute_us, minimum=0)
        if self.delay_mode not in DELAY_MODES:
            raise ValueError(f"batching.delay_mode must be one of {', '.join(DELAY_MODES)}, got {self.delay_mode!r}")
        if not isinstance(self.preferred_batch_sizes, tuple):
            raise ValueError(
                f"batching.preferred_batch_sizes must be a list of row counts, got {self.preferred_batch_sizes!r}"
            )
        for size in self.preferred_batch_sizes:
            _require_int("preferred_batch_sizes", size, minimum=1)
            if size > self.max_batch_size:
                raise ValueError(
                    f"batching.preferred_batch_sizes contains {size}, more than max_batch_size {self.max_batch_size}"
                )


def _require_int(field: str, value: object, *, minimum: int) -> None:
    """Reject non-integers (bool included: `True` is an int to Python, never a row count) and values below minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"batching.{field} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"batching.{field} must be >= {minimum}, got {value}")
