"""How long a forming batch waits for one more request: the fixed window, or the adaptive rule.

The batcher asks one question whenever its forming batch could take more rows but nothing is queued: "how long may
I wait for the next request?" (0: close the batch now). Both policies answer it; only the adaptive one measures.

**Fixed** (Triton's `max_queue_delay_microseconds`): until the first request's arrival + `max_queue_delay`.

**Adaptive**: wait only while the measurements say the wait pays, never beyond the same `max_queue_delay` budget.

Merging the next request (r rows) into the forming batch (n rows) instead of running it on its own saves instance
time `s = c(n) + c(r) - c(n + r)`, where `c(rows)` is the measured cost of a batch: the time an instance is held, from
dispatch to results (compute plus the thread hand-off). `c` is kept as a per-row-count table (an EWMA per batch size)
and fitted with a line `c(n) = a + b n` over the sizes seen, so `s` is the intercept `a`: the per-execution overhead
(hand-off, onnxruntime's per-call cost, reading the weights once per batch) that a merge pays only once. Waiting for
the next request costs its expected wait. Both are measured, not assumed:

* `p`, the probability that another request arrives within the window `w` (an EWMA, updated at every decision
  point by the next arrival, whether the batcher waited or not, so it also learns while it never waits), and
* `t`, the mean time to that arrival when it comes (EWMA), and `g`, the mean gap between arrivals that find other
  requests in the server (so a lone client, whose next request only comes after its response, never counts).

The batcher waits `w = min(budget left, 2 g)` when `p * s > p * t + (1 - p) * w`: the instance time a merge saves
exceeds the expected waiting, misses included. It follows that:

* a lone client never waits (`g` is unknown: no arrival ever finds company; `p` is 0: nothing arrives while its own
  request is in the server), so a request at an idle server with an empty queue runs at once;
* with closed-loop clients whose requests come back in bursts, the batcher waits while the burst is arriving and
  closes the batch after the one miss at its end, losing at most `2 g` per batch rather than the whole budget;
* a tiny model, whose executions cost almost nothing (`s` ~ microseconds), never waits: merging saves nothing;
* a large model (`s` = milliseconds of weight streaming) waits for bursts that arrive within the budget; and under
  saturation requests queue while every instance is busy and batches fill with no waiting at all.

With no measurement yet (a fresh model), or a table holding one batch size only, `s` is taken as 0: no waiting.

Every estimate is an O(1) update on the event loop, no allocation: this runs for every request.
"""

from __future__ import annotations

from dataclasses import dataclass

_ALPHA_COST = 0.2
"""EWMA weight of a new cost sample for its batch size (a table entry follows changes within ~5 batches)."""
_ALPHA_ARRIVAL = 0.05
"""EWMA weight of arrival statistics: they vary from request to request, so they are smoothed over ~20."""
_WINDOW_GAPS = 2.0
"""Window granted for the next arrival, in mean gaps: long enough for most arrivals of a burst, short on a miss."""


class CostTable:
    """Measured cost (seconds) of batches by row count, with a least-squares line over the sizes seen.

    One EWMA entry per row count (so a burst of one size does not erase what other sizes cost) and running sums over
    the entries, so a fit is O(1): the line is recomputed only when read.
    """

    __slots__ = ("_alpha_down", "_alpha_up", "_costs", "_n", "_sx", "_sxx", "_sxy", "_sy")

    def __init__(self, max_rows: int, *, alpha_up: float = _ALPHA_COST, alpha_down: float = _ALPHA_COST) -> None:
        """`alpha_up` < `alpha_down` makes each entry a floor that follows drops at once and rises slowly: the
        estimate for timings whose noise is one-sided (a thread that waits for the GIL only ever measures more)."""
        self._alpha_up = alpha_up
        self._alpha_down = alpha_down
        self._costs: list[float | None] = [None] * (max_rows + 1)
        self._n = 0
        self._sx = 0.0
        self._sxx = 0.0
        self._sy = 0.0
        self._sxy = 0.0

    @property
    def sizes(self) -> int:
        """How many distinct batch sizes have been measured."""
        return self._n

    def record(self, rows: int, seconds: float) -> None:
        """Fold one batch's cost into its size's entry."""
        if not 0 < rows < len(self._costs) or seconds < 0:
            return
        old = self._costs[rows]
        if old is None:
            new = seconds
            self._n += 1
            self._sx += rows
            self._sxx += rows * rows
        else:
            new = old + (self._alpha_up if seconds > old else self._alpha_down) * (seconds - old)
            self._sy -= old
            self._sxy -= rows * old
        self._costs[rows] = new
        self._sy += new
        self._sxy += rows * new

    def entry(self, rows: int) -> float | None:
        """The measured cost of exactly `rows` rows, if that size has run."""
        return self._costs[rows] if 0 < rows < len(self._costs) else None

    def line(self) -> tuple[float, float]:
        """(a, b) of `c(n) = a + b n`, both >= 0; with fewer than two sizes, the proportional line through them."""
        if self._n == 0:
            return 0.0, 0.0
        denominator = self._n * self._sxx - self._sx * self._sx
        if self._n < 2 or denominator <= 0:
            return 0.0, max(self._sy / self._sx, 0.0)
        slope = (self._n * self._sxy - self._sx * self._sy) / denominator
        intercept = (self._sy - slope * self._sx) / self._n
        if slope < 0:  # noise on a flat curve: a constant cost, all of it per execution
            return max(self._sy / self._n, 0.0), 0.0
        if intercept < 0:  # costs grow faster than rows (cache effects): nothing fixed to save
            return 0.0, max(self._sy / self._sx, 0.0)
        return intercept, slope

    def predict(self, rows: int) -> float:
        """Cost of a batch of `rows` rows: the measured entry when there is one, else the line."""
        measured = self.entry(rows)
        if measured is not None:
            return measured
        intercept, slope = self.line()
        return intercept + slope * rows


@dataclass(slots=True)
class _Ewma:
    value: float | None = None

    def update(self, sample: float, alpha: float) -> None:
        self.value = sample if self.value is None else self.value + alpha * (sample - self.value)


class AdaptiveDelay:
    """The adaptive wait rule of the module docstring: measurements in, a window (seconds) out."""

    __slots__ = ("_budget", "_gap", "_hit", "_hit_time", "_last_arrival", "_pending", "costs")

    def __init__(self, budget_s: float, max_rows: int) -> None:
        self._budget = budget_s
        self.costs = CostTable(max_rows)
        self._gap = _Ewma()
        self._hit = _Ewma(1.0)  # optimistic until measured; the first decisions correct it
        self._hit_time = _Ewma()
        self._last_arrival: float | None = None
        self._pending: tuple[float, float] | None = None  # (decision time, window) awaiting the next arrival

    # -- measurements -------------------------------------------------------------------------------------------

    def on_arrival(self, now: float, in_server: int) -> None:
        """A request arrived; `in_server` counts the others queued or executing at that moment."""
        if in_server > 0 and self._last_arrival is not None:
            self._gap.update(now - self._last_arrival, _ALPHA_ARRIVAL)
        self._last_arrival = now
        if self._pending is not None:
            decided_at, window = self._pending
            self._pending = None
            waited = now - decided_at
            if waited <= window:
                self._hit.update(1.0, _ALPHA_ARRIVAL)
                self._hit_time.update(waited, _ALPHA_ARRIVAL)
            else:
                self._hit.update(0.0, _ALPHA_ARRIVAL)

    def on_window_expired(self) -> None:
        """A wait ended without an arrival: a miss, known now rather than at the next arrival."""
        if self._pending is not None:
            self._pending = None
            self._hit.update(0.0, _ALPHA_ARRIVAL)

    def on_batch(self, rows: int, cost_s: float) -> None:
        """A batch of `rows` rows held its instance for `cost_s` seconds."""
        self.costs.record(rows, cost_s)

    # -- the decision -------------------------------------------------------------------------------------------

    def window(self, now: float, budget_left: float) -> float:
        """Seconds to wait for one more request to join the forming batch (0: close it now).

        Records the decision, so that the next arrival (or the window's expiry) tells how it would have turned out.
        """
        window = self._window(budget_left)
        self._pending = (now, self._proposed(budget_left))
        return window

    def current(self) -> float:
        """The window a forming batch would get now with the whole budget left (a gauge, no side effects)."""
        return self._window(self._budget)

    def _proposed(self, budget_left: float) -> float:
        gap = self._gap.value
        return 0.0 if gap is None else min(budget_left, _WINDOW_GAPS * gap)

    def _window(self, budget_left: float) -> float:
        window = self._proposed(budget_left)
        if window <= 0:
            return 0.0
        if self.costs.sizes < 2:
            return 0.0
        # s = c(n) + c(r) - c(n + r) on the fitted line is its intercept, whatever n and r: the per-execution cost.
        saving, _slope = self.costs.line()
        if saving <= 0:
            return 0.0
        p = self._hit.value or 0.0
        expected_wait = p * (self._hit_time.value if self._hit_time.value is not None else window) + (1 - p) * window
        return window if p * saving > expected_wait else 0.0
