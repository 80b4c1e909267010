"""Spans: what each node remembers of the messages it handled, for ``choreo trace``.

A span is recorded when a handler attempt ends: the message's trace id, its id and the id of
the message that caused it, the type, handler, service and instance, when the message was
received, when the attempt started and finished (wall-clock seconds, so spans from several
hosts line up), the outcome and the error. Spans live in a ring of fixed size per node, so
memory stays bounded whatever the traffic; ``span_ring=0`` turns recording off.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:  # pragma: no cover
    from .dispatch import Job

__all__ = ["Span", "Tracer", "new_trace_id", "parse_traceparent", "format_traceparent"]


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
    outcome: str  # "ok" | "error"
    error: str | None
    attempt: int
    key: str = ""
    partition: int = 0


class Tracer:
    """Keeps the most recent spans of one node."""

    def __init__(self, service: str, instance: str, size: int, wall: Callable[[], float]) -> None:
        self.service = service
        self.instance = instance
        self.wall = wall
        self.spans: deque[tuple[Any, ...]] = deque(maxlen=max(size, 1))
        self.enabled = size > 0

    def finished(self, job: Job, outcome: str, error: str | None) -> None:
        if not self.enabled:
            return
        env = job.env
        handler = job.handler
        self.spans.append(
            (
                env.trace_id,
                env.msg_id,
                env.cause_id,
                env.type,
                handler.name if handler else "",
                job.received,
                job.started,
                self.wall(),
                outcome,
                error,
                job.attempt + 1 if outcome == "ok" else job.attempt,  # failures bump it first
                env.key,
                env.partition,
            )
        )

    def query(self, trace_id: bytes | None = None, limit: int = 1000) -> list[Span]:
        """Recent spans (of one trace, when given), oldest first."""
        out = []
        for t in self.spans:
            if trace_id is None or t[0] == trace_id:
                out.append(self._span(t))
        return out[-limit:]

    def _span(self, t: tuple[Any, ...]) -> Span:
        return Span(
            trace_id=t[0].hex(),
            msg_id=t[1].hex(),
            cause_id=t[2].hex(),
            type=t[3],
            handler=t[4],
            service=self.service,
            instance=self.instance,
            received=t[5],
            started=t[6],
            finished=t[7],
            outcome=t[8],
            error=t[9],
            attempt=t[10],
            key=t[11].decode("utf-8", "replace"),
            partition=t[12],
        )


def new_trace_id() -> bytes:
    return os.urandom(16)


def parse_traceparent(value: str) -> bytes:
    """The trace id of a W3C ``traceparent`` header (``00-<32 hex>-<16 hex>-<2 hex>``)."""
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        raise ValueError(f"not a W3C traceparent: {value!r}")
    trace = bytes.fromhex(parts[1])
    if trace == bytes(16):
        raise ValueError("traceparent has an all-zero trace id")
    return trace


def format_traceparent(trace_id: bytes, msg_id: bytes) -> str:
    """A W3C ``traceparent`` for a message: its trace, and a span id taken from its id."""
    from . import core

    span = core.hash64(msg_id).to_bytes(8, "little")
    return f"00-{trace_id.hex()}-{span.hex()}-01"
