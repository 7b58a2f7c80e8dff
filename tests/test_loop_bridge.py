"""The loop bridge: a coroutine's first step on the calling thread while the loop is parked, the rest on the loop.

A real asyncio loop runs on its own thread (as the server's does); the calls come from other threads, as grpc's
pool threads call in the threaded transport. What is checked: where each part of a coroutine runs, that the loop
and a bridged step never run at once, that suspension, results, exceptions and cancellation behave as they would
in a task on the loop, that the loop is woken when (and only when) a step left it work, and that closing the bridge
releases every waiting caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from nnserve.server.loop_bridge import BridgeClosedError, LoopBridge, Pending, off_loop_runner

WAIT_S = 30.0  # a hang detector, never a timing


class LoopThread:
    """An event loop running forever on its own thread, with a bridge onto it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bridge-test-loop", daemon=True)
        self.thread.start()
        self.bridge: LoopBridge = self.on_loop(self._make_bridge())

    async def _make_bridge(self) -> LoopBridge:
        return LoopBridge(asyncio.get_running_loop())

    def on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def close(self) -> None:
        async def close() -> None:
            self.bridge.close()

        self.on_loop(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture
def looped() -> Iterator[LoopThread]:
    running = LoopThread()
    try:
        yield running
    finally:
        running.close()


def in_thread(fn: Any, *args: Any) -> Any:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(WAIT_S)


def test_a_coroutine_that_never_waits_runs_entirely_on_the_calling_thread(looped: LoopThread) -> None:
    seen: dict[str, Any] = {}

    async def step() -> str:
        seen["thread"] = threading.get_ident()
        seen["loop"] = asyncio.get_running_loop()
        seen["future_loop"] = asyncio.get_running_loop().create_future().get_loop()
        return "done"

    def call() -> str:
        seen["caller"] = threading.get_ident()
        return looped.bridge.run(step())

    assert in_thread(call) == "done"
    assert seen["thread"] == seen["caller"] != looped.thread.ident
    assert seen["loop"] is looped.loop
    assert seen["future_loop"] is looped.loop


def test_exceptions_of_the_first_step_reach_the_caller(looped: LoopThread) -> None:
    async def fails() -> None:
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        in_thread(looped.bridge.run, fails())


def test_a_coroutine_that_waits_is_continued_on_the_loop_and_its_result_returned(looped: LoopThread) -> None:
    threads: list[int | None] = []

    async def waits() -> int:
        threads.append(threading.get_ident())
        await asyncio.sleep(0)
        threads.append(threading.get_ident())
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, 41)
        return await future + 1

    assert in_thread(looped.bridge.run, waits()) == 42
    assert threads[0] != looped.thread.ident
    assert threads[1] == looped.thread.ident  # after its first suspension it runs on the loop


def test_an_exception_after_suspending_reaches_the_caller(looped: LoopThread) -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        in_thread(looped.bridge.run, fails_later())


def test_the_loop_runs_no_callback_while_a_bridged_step_runs(looped: LoopThread) -> None:
    """A step is as exclusive as a loop callback: callbacks the loop had ready wait until the step ends."""
    order: list[str] = []
    stepping = threading.Event()
    release = threading.Event()

    async def step() -> None:
        order.append("step starts")
        stepping.set()
        assert release.wait(WAIT_S)  # blocks this step (and so the loop) until the main thread has queued work
        order.append("step ends")

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(looped.bridge.run, step())
        assert stepping.wait(WAIT_S)
        looped.loop.call_soon_threadsafe(order.append, "loop callback")
        release.set()
        done.result(WAIT_S)
    looped.on_loop(asyncio.sleep(0))
    assert order == ["step starts", "step ends", "loop callback"]


def test_work_a_step_leaves_for_the_loop_runs_without_anything_else_waking_it(looped: LoopThread) -> None:
    """The loop sleeps in select() with nothing to do; a step schedules a callback there; the bridge wakes it."""
    ran = threading.Event()

    async def schedules() -> None:
        asyncio.get_running_loop().call_soon(ran.set)

    in_thread(looped.bridge.run, schedules())
    assert ran.wait(WAIT_S)


def test_cancelling_a_continuation_cancels_what_it_awaits_like_a_task(looped: LoopThread) -> None:
    awaited: list[asyncio.Future[None]] = []
    cleaned = threading.Event()
    pending: list[Pending] = []

    async def queued() -> None:
        future = asyncio.get_running_loop().create_future()
        awaited.append(future)
        try:
            await future
        except asyncio.CancelledError:
            cleaned.set()
            raise

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(looped.bridge.run, queued(), pending.append)
        looped.on_loop(_until(lambda: bool(pending)))
        pending[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            done.result(WAIT_S)
    assert cleaned.is_set()
    assert awaited[0].cancelled()  # as Task.cancel() cancels the future its coroutine waits for


def test_off_loop_runner_frees_the_loop_during_slow_work_and_only_in_a_first_step(looped: LoopThread) -> None:
    loop_ran_meanwhile = threading.Event()
    runners: list[Any] = []

    def slow_work() -> str:
        looped.loop.call_soon_threadsafe(loop_ran_meanwhile.set)
        assert loop_ran_meanwhile.wait(WAIT_S)  # the loop can run while the bridged thread works
        return "computed"

    async def step() -> str:
        run = off_loop_runner()
        runners.append(run)
        assert run is not None
        result: str = run(slow_work)
        await asyncio.sleep(0)
        runners.append(off_loop_runner())  # in the continuation, on the loop
        return result

    assert in_thread(looped.bridge.run, step()) == "computed"
    assert runners[1] is None
    assert off_loop_runner() is None  # not on a bridge's thread at all


def test_closing_the_bridge_releases_waiting_callers_and_refuses_new_ones(looped: LoopThread) -> None:
    pending: list[Pending] = []

    async def never() -> None:
        await asyncio.get_running_loop().create_future()

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(looped.bridge.run, never(), pending.append)
        looped.on_loop(_until(lambda: bool(pending)))

        async def close() -> None:
            looped.bridge.close()

        looped.on_loop(close())
        with pytest.raises(BridgeClosedError):
            done.result(WAIT_S)

    async def anything() -> None:
        return None

    with pytest.raises(BridgeClosedError):
        in_thread(looped.bridge.run, anything())
    looped.on_loop(asyncio.sleep(0))  # the loop still runs, on its own selector again


async def _until(condition: Any) -> None:
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")
