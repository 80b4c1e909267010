"""Tumbling event-time windows with a watermark: the aggregation itself, with no I/O.

A reading goes into the window of ``WINDOW_MS`` that contains its timestamp. The *watermark* is
the highest timestamp seen minus ``LATENESS_MS``: readings may arrive that much out of order.
A window closes (its aggregate is final) once the watermark passes its end; a reading for a
window already closed is dropped and counted. The same code runs in the aggregator service and,
in the tests, as the reference the service's output is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW_MS = 1000
LATENESS_MS = 300


@dataclass
class Aggregate:
    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)


@dataclass
class SensorWindows:
    """The open windows of one sensor. ``add`` and ``close_all`` return the windows they close."""

    open: dict[int, Aggregate] = field(default_factory=dict)
    max_ts: int = -1
    closed_upto: int = -1  # windows starting before this are closed
    late: int = 0

    def add(self, ts_ms: int, value: float) -> list[tuple[int, Aggregate]]:
        start = ts_ms - ts_ms % WINDOW_MS
        if start < self.closed_upto:
            self.late += 1
            return []
        self.open.setdefault(start, Aggregate()).add(value)
        self.max_ts = max(self.max_ts, ts_ms)
        watermark = self.max_ts - LATENESS_MS
        return self._close(lambda s: s + WINDOW_MS <= watermark)

    def close_all(self) -> list[tuple[int, Aggregate]]:
        return self._close(lambda s: True)

    def _close(self, due) -> list[tuple[int, Aggregate]]:
        done = sorted(s for s in self.open if due(s))
        if done:
            self.closed_upto = max(self.closed_upto, done[-1] + WINDOW_MS)
        return [(s, self.open.pop(s)) for s in done]
