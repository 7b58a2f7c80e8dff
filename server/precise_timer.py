"""Sub-millisecond wake-ups for an asyncio event loop.

asyncio's selector loop waits in `epoll_wait`, whose timeout is in whole milliseconds and is rounded *up*: a timer
due in 100 us fires after ~1.1 ms. For a batcher whose default window is 100 us that rounding is the whole cost
(measured before this module: 1.2 ms of queue time for a lone request, against 43 us of compute). A Linux timerfd
fixes it without polling: the kernel makes the fd readable at the exact CLOCK_MONOTONIC instant (the clock behind
`loop.time()`), and the loop's selector, which watches the fd, wakes at once.

Elsewhere (no timerfd: macOS, or a libc without it) the fallback is a plain `loop.call_at`, i.e. the selector's
millisecond resolution; callers that need sub-millisecond precision there yield to the loop instead (see
`DynamicBatcher._wait_for_arrival`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_libc() -> ctypes.CDLL | None:
    """libc with timerfd_create/timerfd_settime, or None where there is no timerfd."""
    if os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.POINTER(_Itimerspec)
        ]
        libc.timerfd_settime.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


class PreciseTimer:
    """One pending one-shot callback at a loop time, exact to the kernel's timer slack (tens of microseconds).

    One instance serves one consumer that has at most one wake-up pending (the batch collector); `call_at` replaces
    the pending one. Create it on the loop that will use it; `close()` releases the fd.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callback: Callable[[], None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fd = -1
        self._spec = _Itimerspec()
        if _LIBC is not None and isinstance(loop, asyncio.SelectorEventLoop):
            fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                loop.add_reader(fd, self._on_readable)
            else:
                log.debug("timerfd_create failed (errno %d); windows use the loop's ms timers", ctypes.get_errno())

    @property
    def precise(self) -> bool:
        """Whether wake-ups are exact (timerfd) rather than rounded up to the selector's millisecond."""
        return self._fd >= 0

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop at loop time `when` (at once if it has passed), replacing any pending one."""
        self.cancel()
        self._callback = callback
        if self._fd < 0:
            self._handle = self._loop.call_at(when, self._fire)
            return
        seconds = max(when, 1e-9)  # 0 would disarm the timer; a past instant fires at once
        whole = int(seconds)
        self._spec.it_value.tv_sec = whole
        self._spec.it_value.tv_nsec = int((seconds - whole) * 1e9)
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:  # type: ignore[union-attr]
            self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        """Drop the pending callback (a fire already queued on the loop finds nothing to run)."""
        self._callback = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _on_readable(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiry count; reading re-arms readiness
        except BlockingIOError:
            return
        self._fire()

    def _fire(self) -> None:
        callback, self._callback, self._handle = self._callback, None, None
        if callback is not None:
            callback()
