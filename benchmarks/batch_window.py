"""How exact the batcher's windows and wake-ups are on this machine: the figures the test suite no longer asserts.

    python benchmarks/batch_window.py              # ~15 s; Linux (timerfd) for the precise rows
    python benchmarks/batch_window.py --json out.json

The tests check the mechanism (a window is armed at arrival + max_queue_delay on a timerfd the loop sleeps on, a
lone client arms none, an idle loop sleeps through, a refusal comes in the caller's first step), because how late
a wake-up actually comes is decided by the machine's load, not by nnserve. This prints those latencies, measured
with the real `PreciseTimer` and `DynamicBatcher` on one asyncio loop and a numpy model, so a run on an idle machine
shows what the README promises and a run on a busy one shows what the load costs:

* timer lateness: `PreciseTimer` against asyncio's own `call_at` for 100-300 us waits (asyncio rounds up to 1 ms);
* fixed window: from submit to the model's start for a lone request (window 100 and 200 us);
* lone request queue time: default (adaptive, 100 us budget) and fixed 0;
* deadline error: how long after its deadline a request queued behind a busy instance gets its error;
* refusal: how long a full queue takes to refuse a request;
* idle: CPU time of an idle batcher over one second, and how often its loop went to sleep (1: once, woken only
  by the benchmark's own timer);
* bursts: rounds of 4 requests 2 ms apart to a model costing 10 ms per execution, after learning: how many rounds
  the adaptive window gathers whole (the old test wanted 3 of the last 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nnserve.server.batcher import DynamicBatcher
from nnserve.server.batching_settings import BatchingSettings
from nnserve.server.errors import DeadlineExpiredError, QueueFullError
from nnserve.server.precise_timer import PreciseTimer


def double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2}


X = np.ones((1, 3))


def summary(samples: list[float], scale: float = 1e6) -> dict[str, float]:
    """Median, p90, p99 and max, in microseconds by default."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1] * scale, "n": len(ordered)}


async def timer_lateness(wait_s: float, count: int, precise: bool) -> list[float]:
    loop = asyncio.get_running_loop()
    timer = PreciseTimer(loop) if precise else None
    lateness = []
    try:
        for _ in range(count):
            fired: asyncio.Future[float] = loop.create_future()
            due = loop.time() + wait_s
            if timer is not None:
                timer.call_at(due, lambda f=fired: f.set_result(loop.time()))
            else:
                loop.call_at(due, lambda f=fired: f.set_result(loop.time()))
            lateness.append(await fired - due)
    finally:
        if timer is not None:
            timer.close()
    return lateness


async def with_batcher(fn: Callable[..., Any], scenario: Callable[[DynamicBatcher], Any], **settings: Any) -> Any:
    batcher = DynamicBatcher(fn, BatchingSettings(**settings), name="bench")
    await batcher.start()
    try:
        return await scenario(batcher)
    finally:
        await batcher.stop(drain=False, timeout=5)


async def fixed_window(window_us: int, count: int) -> list[float]:
    started: list[float] = []

    def timed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started.append(time.monotonic())
        return double(inputs)

    async def scenario(batcher: DynamicBatcher) -> list[float]:
        waits = []
        for _ in range(count):
            submitted = time.monotonic()
            await batcher.submit({"x": X})
            waits.append(started[-1] - submitted - window_us / 1e6)
        return waits

    return await with_batcher(timed, scenario, delay_mode="fixed", max_queue_delay_us=window_us,
                              inline_max_compute_us=0)


async def lone_queue(count: int, **settings: Any) -> list[float]:
    async def scenario(batcher: DynamicBatcher) -> list[float]:
        return [(await batcher.submit({"x": X})).queue_seconds for _ in range(count)]

    return await with_batcher(double, scenario, **settings)


async def deadline_and_refusal(count: int) -> tuple[list[float], list[float]]:
    gate = threading.Event()

    def gated(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(30)
        return double(inputs)

    async def scenario(batcher: DynamicBatcher) -> tuple[list[float], list[float]]:
        running = asyncio.ensure_future(batcher.submit({"x": X}))
        while batcher.in_flight_batches == 0:
            await asyncio.sleep(0.001)
        late, refusal = [], []
        for _ in range(count):
            deadline = time.monotonic() + 0.005
            try:
                await batcher.submit({"x": X}, deadline=deadline)
            except DeadlineExpiredError:
                late.append(time.monotonic() - deadline)
            queued = asyncio.ensure_future(batcher.submit({"x": X}))  # fills the queue of one
            await asyncio.sleep(0)
            began = time.perf_counter()
            try:
                await batcher.submit({"x": X})
            except QueueFullError:
                refusal.append(time.perf_counter() - began)
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
        gate.set()
        await running
        return late, refusal

    return await with_batcher(gated, scenario, max_queue_size=1, max_queue_delay_us=0)


class CountingSelector(selectors.DefaultSelector):
    """The loop's selector, counting the times the loop went to sleep (waits with a timeout other than 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self.sleeps += timeout != 0
        return ready


def idle(seconds: float) -> dict[str, float]:
    selector = CountingSelector()

    async def scenario(batcher: DynamicBatcher) -> dict[str, float]:
        await batcher.submit({"x": X})
        await asyncio.sleep(0.05)
        sleeps, cpu = selector.sleeps, time.process_time()
        await asyncio.sleep(seconds)
        # 1: the loop slept once, woken by this benchmark's own timer.
        return {"cpu_ms": (time.process_time() - cpu) * 1e3, "loop_sleeps": selector.sleeps - sleeps}

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        return runner.run(with_batcher(double, scenario, delay_mode="fixed", max_queue_delay_us=1000))


async def bursts(rounds: int) -> list[list[int]]:
    def costly(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.01)
        return double(inputs)

    async def scenario(batcher: DynamicBatcher) -> list[list[int]]:
        gathered = []
        for index in range(rounds):
            tasks = []
            for i in range(4):
                tasks.append(asyncio.ensure_future(batcher.submit({"x": X * (index * 10 + i)})))
                await asyncio.sleep(0.002)
            gathered.append([outcome.batch_requests for outcome in await asyncio.gather(*tasks)])
        return gathered

    return await with_batcher(costly, scenario, max_queue_delay_us=40_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="samples per latency row (default 300)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    n = args.samples
    rows: dict[str, Any] = {}
    for wait_us in (100, 200, 300):
        rows[f"timer {wait_us} us, PreciseTimer, lateness us"] = summary(
            asyncio.run(timer_lateness(wait_us / 1e6, n, precise=True)))
        rows[f"timer {wait_us} us, loop.call_at, lateness us"] = summary(
            asyncio.run(timer_lateness(wait_us / 1e6, n, precise=False)))
    for window_us in (100, 200):
        rows[f"fixed window {window_us} us, lone request, model start after the window, us"] = summary(
            asyncio.run(fixed_window(window_us, n)))
    rows["lone request, default (adaptive 100 us), queue us"] = summary(asyncio.run(lone_queue(n)))
    rows["lone request, fixed 0, queue us"] = summary(asyncio.run(lone_queue(n, delay_mode="fixed",
                                                                             max_queue_delay_us=0)))
    late, refusal = asyncio.run(deadline_and_refusal(min(n, 100)))
    rows["deadline error after the deadline, queued behind a busy instance, us"] = summary(late)
    rows["full queue refusal, us"] = summary(refusal)
    rows["idle batcher, 1 s"] = idle(1.0)
    gathered = asyncio.run(bursts(20))
    rows["bursts of 4 (10 ms per execution): rounds gathered whole, of the last 10"] = {
        "whole": sum(1 for requests in gathered[-10:] if requests == [4, 4, 4, 4]), "rounds": gathered[-10:]}

    width = max(len(name) for name in rows)
    for name, figures in rows.items():
        text = "  ".join(f"{key} {value:.0f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in figures.items())
        print(f"{name:<{width}}  {text}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
