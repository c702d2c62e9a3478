"""Events per second over windows of at least ``window_s`` seconds (what the gauges show)."""

from __future__ import annotations

import time


class RateWindow:
    def __init__(self, window_s: float = 1.0, clock=time.monotonic):
        self.window_s, self.clock = float(window_s), clock
        self._t0, self._n0 = clock(), 0
        self.rate = 0.0

    def update(self, count: int) -> float:
        """``count`` is the running total; the rate of the last completed window (>= window_s)."""
        now = self.clock()
        dt = now - self._t0
        if dt >= self.window_s:
            self.rate = (count - self._n0) / dt
            self._t0, self._n0 = now, count
        return self.rate

    def reset(self, count: int) -> None:
        self._t0, self._n0, self.rate = self.clock(), count, 0.0
