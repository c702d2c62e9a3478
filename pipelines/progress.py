"""A periodic one-line status with counts, rate and ETA, for long commands (to stderr)."""

from __future__ import annotations

import sys
import time


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLine:
    def __init__(self, name: str, total: int, unit: str, every_s: float = 2.0, stream=None):
        self.name, self.total, self.unit = name, total, unit
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._last = -1e9

    def update(self, done: int, rate_value: float | None = None, rate_unit: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        parts = [f"{self.name}: {done}/{self.total} {self.unit}"]
        if rate_value is not None:
            parts.append(f"{rate_value:,.0f} {rate_unit}")
        parts.append(f"elapsed {_fmt_seconds(elapsed)}")
        if 0 < done < self.total:
            parts.append(f"ETA {_fmt_seconds(elapsed / done * (self.total - done))}")
        print(" | ".join(parts), file=self.stream, flush=True)
