"""Latency histograms and per-type counts, folded from a node's span ring while metrics are served.

How this works: the node records a span per handler attempt anyway (:mod:`choreo.tracing`).
A :class:`Latency` takes the spans recorded since its last visit (``Tracer.since``, the way the
OpenTelemetry export does) every ``interval`` seconds and at every scrape, and folds each into:

* ``handler``: time inside the handler, per attempt (finished - started), by type, handler and
  outcome (``ok``/``error``);
* ``queue``: time from arrival to the first attempt's start (waiting for the key, for the run
  queue), by type and handler;
* ``flow``: for a message that came from outside (a flow's entry) and was handled here, the time
  from its arrival to the moment everything it set in motion was handled downstream: choreo
  acknowledges a message only once its handler finished and all it emitted was acknowledged, so
  the entry's completion is the flow's end. A flow whose entry emitted nothing ends with its
  handler (that span says so); for the others the dispatcher reports the completion
  (``Tracer.flow_done``), which it does only while a :class:`Latency` watches;
* ``handled``: attempts and duplicates counted by type, handler and outcome.

Nothing of this runs when no metrics port is open: the hot path only appends spans, as it always
does. Folding costs about a microsecond per span (measured: 1.2 µs for a span that feeds all
three histograms), and a visit folds at most ``max_per_fold`` spans (10,000: about 1 % of a core
at one visit a second), the newest; what the ring overwrote before a visit, or what the bound
skipped, is counted in ``unfolded`` (a lower bound, from the node's counters), so the histograms
say when they are a sample. Each bucket keeps the trace id of the latest span that fell in it, as an OpenMetrics
exemplar, so a slow bucket leads to ``choreo trace``::

    latency = Latency(node.engine.tracer)
    latency.fold(node.stats())
    for (mtype, handler, outcome), h in latency.handler.items():
        print(mtype, handler, outcome, h.count, h.sum / h.count)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tracing import (
    SPAN_ATTEMPT,
    SPAN_FINISHED,
    SPAN_HANDLER,
    SPAN_IDS,
    SPAN_OUTCOME,
    SPAN_RECEIVED,
    SPAN_REPLAY,
    SPAN_STARTED,
    SPAN_TYPE,
    Tracer,
)

__all__ = ["BUCKETS", "Histogram", "Exemplar", "Latency"]

#: Upper bounds (seconds) of the histogram buckets: 100 µs to 30 s, then +Inf.
BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_ZERO = bytes(16)


@dataclass(frozen=True)
class Exemplar:
    """The latest observation of a bucket: its trace, its value (seconds), when (wall-clock seconds)."""

    trace_id: str
    value: float
    time: float


@dataclass
class Histogram:
    """Counts per bucket of :data:`BUCKETS` (the last one is +Inf), their sum and one exemplar each.

    >>> h = Histogram()
    >>> h.observe(0.003, b"\\x01" * 16, 100.0)
    >>> h.count, h.cumulative()[5], h.cumulative()[4], h.exemplar(5).trace_id[:4]
    (1, 1, 0, '0101')
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0
    # bucket -> (trace id bytes, value, wall time) of its latest observation: made readable on demand
    latest: dict[int, tuple[bytes, float, float]] = field(default_factory=dict)

    def observe(self, value: float, trace_id: bytes | None = None, at: float = 0.0) -> None:
        if value < 0.0:
            value = 0.0
        i = bisect_left(BUCKETS, value)
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if trace_id is not None:
            self.latest[i] = (trace_id, value, at)

    def exemplar(self, bucket: int) -> Exemplar | None:
        """The latest observation that fell in ``bucket`` (an index of :data:`BUCKETS`, +Inf last)."""
        latest = self.latest.get(bucket)
        return None if latest is None else Exemplar(latest[0].hex(), latest[1], latest[2])

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, +Inf last (what the exposition formats want)."""
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


class Latency:
    """Folds a tracer's new spans into histograms and counts (see the module docstring)."""

    def __init__(self, tracer: Tracer, *, max_per_fold: int = 10_000) -> None:
        if max_per_fold < 1:
            raise ValueError(f"max_per_fold must be >= 1, got {max_per_fold}")
        self.tracer = tracer
        self.max_per_fold = max_per_fold
        self.handler: dict[tuple[str, str, str], Histogram] = {}
        self.queue: dict[tuple[str, str], Histogram] = {}
        self.flow: dict[tuple[str, str, str], Histogram] = {}
        self.handled: dict[tuple[str, str, str], int] = {}
        self.folded = 0  # spans folded so far
        self.unfolded = 0  # spans recorded and never folded (a lower bound)
        self._cursor: tuple[Any, ...] | None = None
        tracer.watch_flows()

    def close(self) -> None:
        """Stop watching flow completions (the node's metrics port closed)."""
        self.tracer.unwatch_flows()

    def fold(self, snapshot: Mapping[str, Any] | None = None) -> int:
        """Fold what was recorded since the last call; returns how many spans were folded.

        ``snapshot`` (the node's counters, ``Engine.snapshot()``) lets the spans that were
        recorded but not folded be counted in :attr:`unfolded`.
        """
        tracer = self.tracer
        raw, self._cursor, _complete = tracer.since(self._cursor)
        if len(raw) > self.max_per_fold:
            raw = raw[-self.max_per_fold :]  # the newest: what a scrape most wants to see
        self._fold_spans(raw, tracer.offset)
        self._fold_flows(tracer.take_flows(), tracer.offset)
        self.folded += len(raw)
        if snapshot is not None:
            self.unfolded = max(self.unfolded, _recorded(snapshot) - self.folded)
        return len(raw)

    def _fold_spans(self, raw: Iterable[tuple[Any, ...]], offset: float) -> None:
        handler_h, queue_h, flow_h, handled = self.handler, self.queue, self.flow, self.handled
        terminal = self.tracer.terminal
        for t in raw:
            mtype, name, outcome = t[SPAN_TYPE], t[SPAN_HANDLER], t[SPAN_OUTCOME]
            received, started, finished = t[SPAN_RECEIVED], t[SPAN_STARTED], t[SPAN_FINISHED]
            key = (mtype, name, outcome)
            handled[key] = handled.get(key, 0) + 1
            if outcome == "duplicate":
                continue
            ids = t[SPAN_IDS]
            trace_id = ids[16:32]
            at = finished + offset
            h = handler_h.get(key)
            if h is None:
                h = handler_h[key] = Histogram()
            h.observe(finished - started, trace_id, at)
            replayed = len(t) > SPAN_REPLAY and t[SPAN_REPLAY]
            if t[SPAN_ATTEMPT] == 1 and not replayed:  # first attempts (failures count before they record)
                q = queue_h.get((mtype, name))
                if q is None:
                    q = queue_h[(mtype, name)] = Histogram()
                q.observe(started - received, trace_id, at)
            if outcome == "ok" and name in terminal and ids[32:48] == _ZERO:
                # a flow from outside that ended in its first handler (it emits and sends nothing)
                f = flow_h.get(key)
                if f is None:
                    f = flow_h[key] = Histogram()
                f.observe(finished - received, trace_id, at)

    def _fold_flows(self, done: Iterable[tuple[bytes, str, str, float, float, str]], offset: float) -> None:
        flow_h = self.flow
        for trace_id, mtype, name, received, finished, outcome in done:
            key = (mtype, name, outcome)
            f = flow_h.get(key)
            if f is None:
                f = flow_h[key] = Histogram()
            f.observe(finished - received, trace_id, finished + offset)


def _recorded(snapshot: Mapping[str, Any]) -> int:
    """Spans the node has recorded, at least: one per finished message except dead letters (they
    have one per failed attempt) and refused bodies (none). Messages still waiting for downstream
    acks have a span and are not yet counted, so this never overstates."""
    refused = snapshot.get("refused") or {}
    return (
        int(snapshot.get("processed", 0))
        + int(snapshot.get("failed_attempts", 0))
        - int(snapshot.get("dead_lettered", 0))
        - int(refused.get("invalid_payload", 0))
    )
