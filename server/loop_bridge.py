"""Running the serving loop's coroutines from other threads, without a hand-off when they need not wait.

grpc's synchronous server runs each call on a thread of its pool; nnserve's request path (`DataPlane`, the batcher)
is asyncio code that lives on one event loop. Handing every call to the loop and back (`run_coroutine_threadsafe`)
costs two thread wake-ups per call, which is what the threaded transport exists to avoid: a tiny model's request
runs in one synchronous step (the batcher's inline path) and never needs the loop at all.

So `LoopBridge.run(coro)` runs the coroutine's first step in the calling thread, as if that thread were the loop:

* The loop and the bridge share one lock. The loop holds it at all times except while it sleeps in `select()`
  (the bridge wraps the loop's selector), so a thread holding it knows that no loop callback is running, and
  asyncio's single-threaded objects (futures, events, the batcher's state) are safe to use; the thread also sets
  the loop as its running loop, so `asyncio.get_running_loop()` and `loop.create_future()` work as on the loop.
* A coroutine that finishes in that step returns (or raises) in the calling thread: no hand-off.
* One that suspends (its request queued for a batch, a load request, a stream) is continued on the loop by a task
  that re-yields what the coroutine is waiting for, so the task and the coroutine behave exactly as if the task had
  run it from the start (cancelling the task cancels the awaited future, as asyncio does); the thread waits for it.
* The loop is woken after a step that left it work (ready callbacks, a timer, the continuation's task), and only
  then: a step that finished cleanly costs the loop nothing.

A coroutine's first step may also hand slow synchronous work back to its thread with the loop running meanwhile:
`off_loop_runner()` (None on the loop) gives it `run(fn, *args)`, which releases the lock around `fn`. The batcher
runs a lone request's model that way (`batcher._run_lent`), as a plain synchronous server would.

`run(..., on_suspend=...)` tells the caller of a continuation, so it can cancel it when its RPC ends (grpc's
`context.add_callback`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_local = threading.local()


def off_loop_runner() -> Callable[..., Any] | None:
    """In a coroutine's first step on a bridge's thread: `run(fn, *args)`, calling `fn` with the loop free; else
    None (on the loop itself, or in a continuation)."""
    return getattr(_local, "runner", None)


class BridgeClosedError(RuntimeError):
    """The bridge was closed (the server is stopping) before or while a call ran."""


class _ParkingSelector:
    """The loop's selector, releasing the bridge's lock only while the loop sleeps in `select()`."""

    def __init__(self, inner: Any, lock: threading.Lock) -> None:
        self.inner = inner
        self._lock = lock

    def select(self, timeout: float | None = None) -> Any:
        self._lock.release()
        try:
            return self.inner.select(timeout)
        finally:
            self._lock.acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Continue:
    """Awaitable that carries on a coroutine suspended elsewhere, starting with what it last yielded."""

    __slots__ = ("_coro", "_first", "started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first
        self.started = False

    def __await__(self) -> Generator[Any, Any, Any]:
        self.started = True
        coro, value = self._coro, self._first
        self._first = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:  # the task itself is being closed (the loop went away): close what it carries
                coro.close()
                raise
            except BaseException as exc:  # the task throws (cancellation) into the coroutine it carries
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _carry_on(step: _Continue) -> Any:
    return await step


def _noop() -> None:
    pass


class Pending:
    """A call that suspended: the task continuing it on the loop, cancellable from any thread."""

    def __init__(self, bridge: LoopBridge, task: asyncio.Task[Any]) -> None:
        self._bridge = bridge
        self.task = task

    def cancel(self) -> None:
        """Cancel the continuation (thread-safe; nothing happens once it is done)."""
        self._bridge.call_soon(self.task.cancel)


class LoopBridge:
    """Runs coroutines of `loop` from other threads; see the module docstring. Create and close it on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._closed = False
        self._waiting: set[threading.Event] = set()
        self._continuations: set[asyncio.Task[Any]] = set()
        selector = getattr(loop, "_selector", None)
        if selector is None or not hasattr(selector, "select"):
            raise RuntimeError(f"the event loop {type(loop).__name__} has no selector to park on")
        self._lock.acquire()  # the loop (this thread) holds it, except while it sleeps
        self._selector = _ParkingSelector(selector, self._lock)
        loop._selector = self._selector  # type: ignore[attr-defined]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        """Give the loop its selector back, cancel the continuations still running (their coroutines clean up as a
        cancelled task's do) and fail every call still waiting (call on the loop, once)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._continuations):
            task.cancel()
        if getattr(self._loop, "_selector", None) is self._selector:
            self._loop._selector = self._selector.inner  # type: ignore[attr-defined]
        for event in list(self._waiting):
            event.set()
        self._lock.release()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """`loop.call_soon_threadsafe`, a no-op once the bridge is closed (the loop may be gone)."""
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                self._loop.call_soon_threadsafe(callback)

    def run(self, coro: Coroutine[Any, Any, T], on_suspend: Callable[[Pending], object] | None = None) -> T:
        """Run `coro` to its end from this (non-loop) thread; its first step here, the rest on the loop.

        `on_suspend` is told the continuation before this thread starts waiting (to cancel it when the RPC ends).
        Raises what the coroutine raises; BridgeClosedError when the bridge closes first; CancelledError when the
        continuation was cancelled.
        """
        loop = self._loop
        with self._lock:
            if self._closed:
                coro.close()
                raise BridgeClosedError("the server is stopping")
            ready, scheduled = _queued(loop)  # the loop cannot run while this thread holds the lock
            previous = asyncio._get_running_loop()
            asyncio._set_running_loop(loop)
            _local.runner = self._unlocked
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            else:
                step = _Continue(coro, yielded)
                task = loop.create_task(_carry_on(step))
                self._continuations.add(task)
                done = threading.Event()
                self._waiting.add(done)
                task.add_done_callback(lambda finished: self._settle(finished, step, done))
            finally:
                _local.runner = None
                asyncio._set_running_loop(previous)
                if ready < 0 or _queued(loop) != (ready, scheduled):
                    loop.call_soon_threadsafe(_noop)  # work for the loop: wake it from its select()
        if on_suspend is not None:
            on_suspend(Pending(self, task))
        done.wait()
        self._waiting.discard(done)
        if not task.done() or (self._closed and task.cancelled()):
            raise BridgeClosedError("the server stopped before the call finished")
        return task.result()

    def _unlocked(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` with the lock released, so the loop runs meanwhile; the caller holds it again after."""
        self._lock.release()
        try:
            return fn(*args)
        finally:
            self._lock.acquire()

    def _settle(self, task: asyncio.Task[Any], step: _Continue, done: threading.Event) -> None:
        """On the loop: the continuation ended. One cancelled before its first step never resumed the coroutine:
        give it the cancellation now, so it cleans up (a queued request leaves the queue) as it would have."""
        self._continuations.discard(task)
        if task.cancelled() and not step.started:
            first = step._first
            if isinstance(first, asyncio.Future):
                first.cancel()
            with contextlib.suppress(BaseException):  # it re-raises the cancellation, or ends: done either way
                step._coro.throw(asyncio.CancelledError())
        done.set()


def _queued(loop: asyncio.AbstractEventLoop) -> tuple[int, int]:
    """How much work the loop has queued (ready callbacks, timers); (-1, -1) when it does not say (always wake)."""
    ready = getattr(loop, "_ready", None)
    scheduled = getattr(loop, "_scheduled", None)
    if ready is None or scheduled is None:
        return (-1, -1)
    return (len(ready), len(scheduled))


__all__ = ["BridgeClosedError", "LoopBridge", "Pending", "off_loop_runner"]
