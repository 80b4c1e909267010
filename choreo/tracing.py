"""Spans: what each node remembers of the messages it handled, for ``choreo trace``.

A span is recorded when a handler attempt ends: the message's trace id, its id and the id of
the message that caused it, the type, handler, service and instance, when the message was
received, when the attempt started and finished, the outcome and the error. Spans live in a
ring of fixed size per node, so memory stays bounded whatever the traffic; ``span_ring=0`` turns
recording off. The ring is the core's ``SpanRing``, read like a deque of span tuples: recording
an attempt here appends one tuple; the core's compiled lane copies the same fields into the ring
without building one (it is built, once, when the span is first read); everything else here
(Span objects, hex ids, filtering by trace)
happens when somebody asks.

One layout for every recorded span, whoever records it (the ``SPAN_*`` indices)::

    (ids, type, handler, received, started, finished, outcome, error, attempt, key, partition[, replay])

where ``ids`` is the 48 bytes ``msg_id | trace_id | cause_id``, in the envelope's own order, so
the lane records one bytes object instead of three per message (:func:`unpack` splits it), and
``replay`` (present only on a replayed dead letter's attempts) says which replay it was.

One clock per trace. Inside a node every time of a span comes from one monotonic clock (a
node records with ``time.monotonic``, the same C call as ``time.time``), so a step's queue,
handler and total times never jump when the system clock is set. Wall time is used only to
line nodes up: the tracer anchors its clock to the wall clock once (:func:`wall_offset`) and
adds that constant whenever a span leaves the node (:meth:`Tracer.query`, the OpenTelemetry
export), so spans of several hosts share one time line as far as their clocks agree. A dead
letter replayed later is recorded as the next attempts of the same step (``attempt`` counts
on from the attempts before it; ``replay`` says which replay it was).

Trace ids and W3C ``traceparent``. A flow's trace id is the id of its first message from
outside, unless the caller passes a ``traceparent`` to ``emit``/``send``/``ask``: then it is that
header's trace id. Span ids are derived, never stored: a message's is a hash of its id, and the
handling of a message by one handler (what a choreo span records, and what OpenTelemetry export
sends, see :mod:`choreo.otel`) a hash of the message id and the handler's name (:func:`span_id`).
So every ``traceparent`` is a pure function of ids the envelopes already carry:

* a handler reads ``ctx.traceparent`` (its handling of the message) to pass on to HTTP calls, so
  their spans hang under the handler's span in a tracing backend;
* a caller that starts a flow gets its traceparent either way::

      tp = new_traceparent()                        # or the one the incoming request carried
      await node.send(PlaceOrder(...), traceparent=tp)
      print(trace_id_of(tp))                        # what `choreo trace` takes

      msg_id = await node.emit(OrderPlaced(...))    # no traceparent given: the trace id is msg_id
      print(traceparent_of(msg_id))                 # 00-<msg_id hex>-<span id>-01
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgspec

from . import core

__all__ = [
    "Span",
    "Tracer",
    "new_trace_id",
    "new_traceparent",
    "parse_traceparent",
    "format_traceparent",
    "traceparent_of",
    "trace_id_of",
    "span_id",
    "wall_offset",
    "unpack",
    "Attempt",
    "SPAN_KEY_BYTES",
]

# the fields of a recorded span tuple (see the module docstring)
SPAN_IDS, SPAN_TYPE, SPAN_HANDLER, SPAN_RECEIVED, SPAN_STARTED, SPAN_FINISHED = range(6)
SPAN_OUTCOME, SPAN_ERROR, SPAN_ATTEMPT, SPAN_KEY, SPAN_PARTITION, SPAN_REPLAY = range(6, 12)


class Span(msgspec.Struct, frozen=True):
    trace_id: str
    msg_id: str
    cause_id: str
    type: str
    handler: str
    service: str
    instance: str
    received: float
    started: float
    finished: float
    outcome: str  # "ok" | "error"; and for work still in progress: "running" | "queued" | "retrying"
    error: str | None
    attempt: int
    key: str = ""
    partition: int = 0
    replay: int = 0  # 0: the message as it arrived; n: the n-th replay of its dead letter


def wall_offset(clock: Callable[[], float]) -> float:
    """What to add to readings of ``clock`` to read them as wall-clock seconds.

    ``time.monotonic`` is anchored to ``time.time`` now, once; any other clock is taken to read
    wall time already (``time.time``, or a test's virtual clock): 0.

    >>> wall_offset(time.time)
    0.0
    >>> abs(time.monotonic() + wall_offset(time.monotonic) - time.time()) < 1.0
    True
    """
    if clock is time.monotonic:
        return time.time() - time.monotonic()
    return 0.0


class Attempt(Protocol):
    """What the tracer reads of one handler attempt (the dispatcher's job)."""

    env: Any  # the envelope: msg_id, trace_id, cause_id, type, key, partition
    handler: Any  # the Handler (its name, retry policy), or None
    received: float
    started: float
    attempt: int
    message: Any
    error: str | None
    replay_of: Any  # the DeadLetter being replayed, or None


class Tracer:
    """Keeps the most recent spans of one node.

    ``wall`` is the clock spans are recorded with (the engine's, monotonic in a node);
    ``offset`` turns its readings into wall-clock seconds when spans leave the node.
    """

    def __init__(self, service: str, instance: str, size: int, wall: Callable[[], float]) -> None:
        self.service = service
        self.instance = instance
        self.wall = wall
        self.offset = wall_offset(wall)
        self.spans = core.SpanRing(max(size, 1))  # read like a deque of span tuples, oldest first
        self.enabled = size > 0
        # flows from outside that completed here, while metrics watch (None: nobody watches)
        self.completed: deque[tuple[bytes, str, str, float, float, str]] | None = None
        self._watchers = 0
        # handlers that declare no emits or sends: their span ends the flow of a message from outside
        self.terminal: set[str] = set()

    def watch_flows(self) -> None:
        """Start reporting completed flows (:meth:`flow_done`, read with :meth:`take_flows`)."""
        self._watchers += 1
        if self.completed is None and self.enabled:
            self.completed = deque(maxlen=self.spans.maxlen)

    def unwatch_flows(self) -> None:
        self._watchers = max(self._watchers - 1, 0)
        if not self._watchers:
            self.completed = None

    def flow_done(self, job: Attempt) -> None:
        """A job completed: everything it emitted was acknowledged downstream (the dispatcher calls
        this only while :attr:`completed` is not None). For a message from outside, that is the end
        of the whole flow it started: recorded as ``(trace_id, type, handler, received, now, outcome)``.
        """
        env = job.env
        handler = job.handler
        if (
            self.completed is None
            or handler is None
            or job.message is None  # a duplicate or a refused body: no flow of its own
            or job.replay_of is not None
            or env.cause_id != _ZERO16
            or handler.name in self.terminal  # its span says it all (the lane records no job)
        ):
            return
        dead = job.error is not None and job.attempt > handler.retry.retries
        self.completed.append((env.trace_id, env.type, handler.name, job.received, self.wall(), "error" if dead else "ok"))

    def flow_answered(self, env: Any, name: str, received: float) -> None:
        """:meth:`flow_done` of a command or query the compiled lane answered (it had no effects,
        so a flow from outside ends there), by handler ``name``."""
        if self.completed is not None and name not in self.terminal and env.cause_id == _ZERO16:
            self.completed.append((env.trace_id, env.type, name, received, self.wall(), "ok"))

    def flows_ran(self, envs: Iterable[Any], handlers: Mapping[str, Any], received: float) -> None:
        """:meth:`flow_done` of the events the compiled lane ran (``envs``, by the handlers in
        ``handlers``, a type -> handler mapping): it runs only what emitted and sent nothing, so a
        flow from outside ends there. Commands are :meth:`flow_answered` when answered."""
        completed = self.completed
        if completed is None:
            return
        now = self.wall()
        terminal = self.terminal
        for env in envs:
            if env.kind == core.KIND_EVENT and env.cause_id == _ZERO16:
                name = handlers[env.type].name
                if name not in terminal:
                    completed.append((env.trace_id, env.type, name, received, now, "ok"))

    def take_flows(self) -> list[tuple[bytes, str, str, float, float, str]]:
        """The completed flows reported since the last call (and forget them)."""
        if not self.completed:
            return []
        out = list(self.completed)
        self.completed.clear()
        return out

    def finished(self, job: Attempt, outcome: str, error: str | None) -> None:
        """Record the end of one attempt."""
        if not self.enabled:
            return
        env = job.env
        handler = job.handler
        attempt = job.attempt + 1 if outcome == "ok" else job.attempt  # failures bump it first
        ids = env.msg_id + env.trace_id + env.cause_id
        name = handler.name if handler else ""
        letter = job.replay_of
        if letter is not None:  # a replayed dead letter: its attempts count on after the earlier ones
            self.spans.append(
                (ids, env.type, name, job.received, job.started, self.wall(), outcome, error,
                 letter.attempts + attempt, env.key[:SPAN_KEY_BYTES], env.partition, letter.replays)
            )  # fmt: skip
            return
        self.spans.append(
            (ids, env.type, name, job.received, job.started, self.wall(), outcome, error, attempt,
             env.key[:SPAN_KEY_BYTES], env.partition)
        )

    def query(self, trace_id: bytes | None = None, limit: int = 1000) -> list[Span]:
        """Recent spans (of one trace, when given), oldest first."""
        if trace_id is None:
            return [self._span(t) for t in list(self.spans)[-limit:]]
        out = [self._span(t) for t in self.spans if t[SPAN_IDS][16:32] == trace_id]
        return out[-limit:]

    def since(self, cursor: tuple[Any, ...] | None) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None, bool]:
        """The raw spans recorded after ``cursor`` (a span tuple returned earlier), for exporters.

        Returns ``(new spans oldest first, the new cursor, complete)``; ``complete`` is False when
        the ring wrapped past the cursor, so spans between the two reads were lost. The cost is
        the number of new spans (the ring is walked backwards until the cursor).
        """
        spans = self.spans
        if not spans:
            return [], cursor, True
        new = []
        found = cursor is None
        for t in reversed(spans):
            if t is cursor:
                found = True
                break
            new.append(t)
        new.reverse()
        return new, spans[-1], found or cursor is None

    def flows(self, limit: int = 1000, busy: Iterable[bytes] = (), max_keys: int = 32) -> list[dict[str, Any]]:
        """What this node saw of each recent trace, most recently active first: one summary per
        trace id, for ``choreo traces`` (which merges the summaries of every node).

        Each summary: ``trace_id``, ``first`` (earliest received) and ``last`` (latest finished),
        in wall-clock seconds; ``steps`` (distinct message and handler pairs) and ``spans``;
        ``types`` and ``keys`` seen (at most ``max_keys`` keys); ``entry``, the earliest step
        whose message came from outside (``{"type", "handler", "service", "received"}``) or None;
        ``failed``, the steps whose latest attempt raised and that are not being retried (``busy``
        holds the ids of messages still in progress here); ``running``, whether one of them is;
        ``duplicates``, how many copies were acknowledged without running the handler.

        >>> t = Tracer("orders", "orders#1", 10, time.time)
        >>> t.spans.append((b"M" * 16 + b"T" * 16 + bytes(16), "PlaceOrder", "place", 1.0, 1.5, 2.0, "ok", None, 1, b"c1", 0))
        >>> [(f["entry"]["type"], f["steps"], f["keys"], f["failed"]) for f in t.flows()]
        [('PlaceOrder', 1, ['c1'], [])]
        """
        busy = set(busy)
        by_trace: dict[bytes, dict[str, Any]] = {}
        latest: dict[tuple[bytes, bytes, str], tuple[Any, ...]] = {}
        off = self.offset
        for raw in self.spans:
            t = unpack(raw)
            trace_id, msg_id, cause_id, mtype, handler = t[0], t[1], t[2], t[3], t[4]
            flow = by_trace.get(trace_id)
            if flow is None:
                flow = by_trace[trace_id] = {
                    "trace_id": trace_id.hex(), "first": t[5], "last": t[7], "spans": 0, "types": set(),
                    "keys": set(), "entry": None, "failed": [], "running": False, "duplicates": 0, "_steps": set(),
                }  # fmt: skip
            flow["spans"] += 1
            flow["first"] = min(flow["first"], t[5])
            flow["last"] = max(flow["last"], t[7])
            flow["types"].add(mtype)
            if t[11] and len(flow["keys"]) < max_keys:
                flow["keys"].add(t[11].decode("utf-8", "replace"))
            if t[8] == "duplicate":
                flow["duplicates"] += 1
                continue
            flow["_steps"].add((msg_id, handler))
            latest[(trace_id, msg_id, handler)] = t
            if msg_id in busy:
                flow["running"] = True
            replayed = len(t) > 13 and t[13]
            if cause_id == _ZERO16 and not replayed and (flow["entry"] is None or t[5] < flow["entry"]["received"]):
                flow["entry"] = {"type": mtype, "handler": handler, "service": self.service, "received": t[5]}
        for (trace_id, msg_id, handler), t in latest.items():
            if t[8] == "error" and msg_id not in busy:
                by_trace[trace_id]["failed"].append(
                    {"type": t[3], "handler": handler, "service": self.service, "instance": self.instance, "error": t[9]}
                )
        out = sorted(by_trace.values(), key=lambda f: f["last"], reverse=True)[: max(limit, 0)]
        for flow in out:
            flow["steps"] = len(flow.pop("_steps"))
            flow["types"] = sorted(flow["types"])
            flow["keys"] = sorted(flow["keys"])
            flow["first"] += off
            flow["last"] += off
            if flow["entry"] is not None:
                flow["entry"]["received"] += off
            flow["service"] = self.service
            flow["instance"] = self.instance
        return out

    def running(self, jobs: Iterable[Any], trace_id: bytes, now: float) -> list[Span]:
        """Span-shaped records of the jobs of one trace that are still in a handler, waiting for
        their key, or waiting for a retry (outcome ``running``, ``queued`` or ``retrying``).

        Jobs whose handler already finished (waiting for downstream acks) are left out: their
        span is in the ring. ``jobs`` are the dispatcher's in-progress jobs; ``now`` is a reading
        of the tracer's clock. Nothing here is on the hot path: it runs when ``choreo trace`` asks.
        """
        out = []
        off = self.offset
        for job in jobs:
            env = job.env
            if env.trace_id != trace_id or job.pending or job.handler is None:
                continue
            if not job.started:
                outcome = "queued"
            elif job.error is not None and job.started <= self._last_failure(env.msg_id, job.handler.name):
                outcome = "retrying"  # the last attempt failed after it started: waiting for the backoff
            else:
                outcome = "running"
            out.append(
                Span(
                    trace_id=env.trace_id.hex(),
                    msg_id=env.msg_id.hex(),
                    cause_id=env.cause_id.hex(),
                    type=env.type,
                    handler=job.handler.name,
                    service=self.service,
                    instance=self.instance,
                    received=job.received + off,
                    started=job.started + off if job.started else 0.0,
                    finished=now + off,
                    outcome=outcome,
                    error=job.error,
                    attempt=job.attempt + (outcome == "running"),
                    key=env.key.decode("utf-8", "replace"),
                    partition=env.partition,
                )
            )
        return out

    def _last_failure(self, msg_id: bytes, handler: str) -> float:
        for t in reversed(self.spans):
            if t[SPAN_HANDLER] == handler and t[SPAN_OUTCOME] == "error" and t[SPAN_IDS][:16] == msg_id:
                return t[SPAN_FINISHED]  # type: ignore[no-any-return]
        return 0.0

    def _span(self, t: tuple[Any, ...]) -> Span:
        t = unpack(t)
        off = self.offset
        return Span(
            trace_id=t[0].hex(),
            msg_id=t[1].hex(),
            cause_id=t[2].hex(),
            type=t[3],
            handler=t[4],
            service=self.service,
            instance=self.instance,
            received=t[5] + off,
            started=t[6] + off if t[6] else 0.0,
            finished=t[7] + off,
            outcome=t[8],
            error=t[9],
            attempt=t[10],
            key=t[11].decode("utf-8", "replace"),
            partition=t[12],
            replay=t[13] if len(t) > 13 else 0,
        )


_ZERO16 = bytes(16)
SPAN_KEY_BYTES = 128  # bytes of a message's key a span keeps; the core's lane keeps as many (core.SPAN_KEY_BYTES)


def unpack(t: tuple[Any, ...]) -> tuple[Any, ...]:
    """A recorded span with its ids apart: ``(trace_id, msg_id, cause_id, type, handler, received,
    started, finished, outcome, error, attempt, key, partition[, replay])``."""
    ids = t[SPAN_IDS]
    return (ids[16:32], ids[:16], ids[32:48], *t[1:])


def new_trace_id() -> bytes:
    return os.urandom(16)


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (random trace id and parent id, sampled), to start a flow with."""
    return f"00-{new_trace_id().hex()}-{os.urandom(8).hex()}-01"


def span_id(msg_id: bytes, handler: str | None = None) -> bytes:
    """The W3C span id (8 bytes) of a message, or of its handling by ``handler`` (a stable hash)."""
    from . import core

    data = msg_id if handler is None else msg_id + b"/" + handler.encode()
    return (core.hash64(data) or 1).to_bytes(8, "little")  # an all-zero span id is invalid


def trace_id_of(value: str | bytes) -> str:
    """The trace id, as 32 hex digits, of a traceparent, a hex trace id or raw id bytes.

    >>> trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    '4bf92f3577b34da6a3ce929d0e0e4736'
    """
    if isinstance(value, bytes):
        if len(value) != 16:
            raise ValueError(f"a trace id has 16 bytes, got {len(value)}")
        return value.hex()
    text = value.strip().lower()
    if text.count("-") == 3:
        return parse_traceparent(text).hex()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"not a trace id (32 hex digits) nor a W3C traceparent: {value!r}")
    return text


def traceparent_of(msg_id: bytes, trace_id: bytes | None = None) -> str:
    """The ``traceparent`` of a message this node sent: its trace (``msg_id`` itself when the
    flow started with it and no traceparent was given) and the message's span id."""
    return format_traceparent(msg_id if trace_id is None else trace_id, msg_id)


def parse_traceparent(value: str) -> bytes:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        raise ValueError(f"not a W3C traceparent: {value!r}")
    trace = bytes.fromhex(parts[1])
    if trace == bytes(16):
        raise ValueError("traceparent has an all-zero trace id")
    return trace


def format_traceparent(trace_id: bytes, msg_id: bytes, handler: str | None = None) -> str:
    """A W3C ``traceparent`` for a message (or its handling by ``handler``): its trace and span id."""
    return f"00-{trace_id.hex()}-{span_id(msg_id, handler).hex()}-01"
