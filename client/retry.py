"""Retries with capped exponential backoff and full jitter, bounded by the call's deadline.

Why full jitter (sleep uniformly in [0, cap]): after a server restart or an overload spike, every client retries at
once; spreading the retries over the whole window empties the server's queue fastest (AWS architecture blog,
"Exponential Backoff And Jitter"). The deadline bounds the total time of a call, retries included, so a retry never
outlives the caller's patience.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import grpc

from nnserve.client.errors import InferenceError

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
"""UNAVAILABLE (not reachable, restarting, draining) and RESOURCE_EXHAUSTED (queue full, in-flight memory budget
full): the request was not run.
CANCELLED, which a client that did not cancel gets when a server shuts down: gRPC cancels the calls it had received
but not yet handed to the server's code (and, after a drain's grace period, calls still running); the next attempt
goes to another replica, or fails UNAVAILABLE. This client never cancels a call it is waiting for itself."""

# gRPC's text when a message exceeds a size limit (client or server side); it also comes as RESOURCE_EXHAUSTED.
_MESSAGE_TOO_LARGE = "larger than max"
# nnserve's text when one request needs more than the server's whole in-flight memory budget: RESOURCE_EXHAUSTED like a
# full budget, which is worth retrying, but this one never fits (`nnserve.server.inflight_budget.TOO_LARGE_FOR_BUDGET`).
_BUDGET_TOO_LARGE = "larger than the server's whole in-flight budget"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a failed call again.

    The default retries every RPC, inference included: the server rejects with these codes before running anything,
    and inference on a stateless model is idempotent anyway. A RESOURCE_EXHAUSTED caused by a message over a size
    limit, or by a request larger than the server's whole in-flight budget, is never retried. Pass
    `RetryPolicy.disabled()` (or `retry=None` to a client) where a second attempt is not wanted, e.g. when measuring
    overload.
    """

    max_attempts: int = 5
    """Attempts in total, the first included; 1 disables retrying."""
    initial_backoff_s: float = 0.05
    """Cap of the first wait."""
    max_backoff_s: float = 2.0
    """Largest cap, however many attempts came before."""
    multiplier: float = 2.0
    """Growth of the cap per attempt."""
    retry_on: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)
    """Status codes worth another attempt."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `retry` (0-based): uniform in [0, min(max, initial * multiplier**retry)]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return (rng or random).uniform(0.0, cap)


class Attempts:
    """The retry state of one call: remaining time for each attempt, and whether (and how long) to wait after a failure.

    Both clients drive their own loop with it (blocking sleep vs `asyncio.sleep`), so the policy lives here once.
    """

    def __init__(self, policy: RetryPolicy, timeout_s: float | None) -> None:
        self._policy = policy
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._retries = 0

    def remaining_s(self) -> float | None:
        """Time left for the next attempt (0 once the deadline has passed), None if unbounded."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def next_delay_s(self, error: InferenceError) -> float | None:
        """Seconds to wait before retrying after `error`, or None when the call should fail with it now."""
        if error.code not in self._policy.retry_on or self._retries + 1 >= self._policy.max_attempts:
            return None
        if _MESSAGE_TOO_LARGE in error.message or _BUDGET_TOO_LARGE in error.message:
            return None  # RESOURCE_EXHAUSTED for an oversized message: the same request fails the same way again
        delay = self._policy.backoff_s(self._retries)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        self._retries += 1
        return delay
