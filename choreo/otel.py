"""OpenTelemetry export of a node's spans: ``pip install choreo[otel]``.

How this works: the node records spans into its ring anyway (:mod:`choreo.tracing`); an
:class:`OtelExport` attached to a running :class:`~choreo.node.Node` wakes every ``interval``
seconds, takes the spans recorded since its last visit and hands them, converted, to any
OpenTelemetry ``SpanExporter`` (OTLP to a collector, the console, or the SDK's in-memory one in
tests), in a worker thread so that a slow collector never stalls the node. Nothing is added to
the message path: with no export attached, this module is not even imported. ::

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from choreo.otel import attach

    async with Node(orders, peers=[seed]) as node:
        export = attach(node, OTLPSpanExporter(endpoint="http://127.0.0.1:4318/v1/traces"))
        await node.serve()

Mapping: one OpenTelemetry span per handler attempt, kind CONSUMER, named ``TYPE process``,
with choreo's trace id as the trace id. The successful attempt of handler H on message M has
span id ``span_id(M, H)``, the one ``ctx.traceparent`` carries, so a handler's outgoing HTTP
calls hang under it; failed attempts get their own ids and share its parent. The parent is the
handling of the causing message by the handler that emits or sends this type (found in the
mesh's declarations: when several handlers of the cause's consumers produce it, the first by
service and name is chosen). Attributes follow the messaging conventions (``messaging.system``
``choreo``, ``messaging.destination.name`` the type, ``messaging.message.id``) plus
``choreo.*`` ones (service, instance, handler, key, partition, attempt, cause, queue time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import core
from .tracing import span_id, unpack

if TYPE_CHECKING:  # pragma: no cover
    from .node import Node

try:
    from opentelemetry import trace as _trace_api
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
except ImportError as exc:  # pragma: no cover - exercised by the import error test only
    raise ImportError(
        "choreo.otel needs the OpenTelemetry SDK: pip install 'choreo[otel]' (or opentelemetry-sdk)"
    ) from exc

__all__ = ["OtelExport", "attach", "to_otel_spans"]

log = logging.getLogger("choreo.otel")
_ZERO = bytes(16)
_SCOPE = InstrumentationScope("choreo")


def _int_span(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _attempt_span_id(msg_id: bytes, handler: str, attempt: int) -> bytes:
    return (core.hash64(msg_id + b"/" + handler.encode() + b"#" + str(attempt).encode()) or 1).to_bytes(8, "little")


def _producers(spec: Any) -> dict[str, str]:
    """Message type -> the handler (name) that produces it: the first by service, then handler name."""
    out: dict[str, str] = {}
    if spec is None:
        return out
    for s in sorted(spec.services, key=lambda s: s.name):
        for h in sorted(s.handlers, key=lambda h: h.name):
            for t in (*h.emits, *h.sends):
                out.setdefault(t, h.name)
    return out


def to_otel_spans(
    raw: Sequence[tuple[Any, ...]], service: str, instance: str, spec: Any = None, offset: float = 0.0
) -> list[ReadableSpan]:
    """Convert span tuples from a :class:`~choreo.tracing.Tracer` ring into SDK ``ReadableSpan`` s.

    ``offset`` turns the ring's clock into wall-clock seconds (``Tracer.offset``).
    """
    producers = _producers(spec)
    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    out = []
    for t in raw:
        trace_id, msg_id, cause_id, mtype, handler, received, started, finished, outcome, error, attempt, key, partition = (
            unpack(t)[:13]
        )
        trace_int = int.from_bytes(trace_id, "big")
        flags = _trace_api.TraceFlags(_trace_api.TraceFlags.SAMPLED)
        own = span_id(msg_id, handler) if outcome == "ok" else _attempt_span_id(msg_id, handler, attempt)
        context = _trace_api.SpanContext(trace_int, _int_span(own), is_remote=False, trace_flags=flags)
        parent = None
        if cause_id != _ZERO:
            parent_handler = producers.get(mtype)
            parent_id = span_id(cause_id, parent_handler) if parent_handler else span_id(cause_id)
            parent = _trace_api.SpanContext(trace_int, _int_span(parent_id), is_remote=True, trace_flags=flags)
        status = (
            _trace_api.Status(_trace_api.StatusCode.OK)
            if outcome == "ok"
            else _trace_api.Status(_trace_api.StatusCode.ERROR, error or "handler failed")
        )
        attributes = {
            "messaging.system": "choreo",
            "messaging.operation.type": "process",
            "messaging.destination.name": mtype,
            "messaging.message.id": msg_id.hex(),
            "choreo.service": service,
            "choreo.instance": instance,
            "choreo.handler": handler,
            "choreo.key": key.decode("utf-8", "replace"),
            "choreo.partition": int(partition),
            "choreo.attempt": int(attempt),
            "choreo.cause_id": cause_id.hex(),
            "choreo.queue_ms": round(max(started - received, 0.0) * 1000.0, 3),
        }
        if error:
            attributes["choreo.error"] = error
        out.append(
            ReadableSpan(
                name=f"{mtype} process",
                context=context,
                parent=parent,
                resource=resource,
                attributes=attributes,
                kind=_trace_api.SpanKind.CONSUMER,
                status=status,
                start_time=int((started + offset) * 1e9),
                end_time=int((finished + offset) * 1e9),
                instrumentation_scope=_SCOPE,
            )
        )
    return out


class OtelExport:
    """Periodic export of one node's new spans to an OpenTelemetry ``SpanExporter``."""

    def __init__(self, node: Node, exporter: Any, interval: float = 1.0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        engine = node.engine
        if engine is None:
            raise RuntimeError("attach OpenTelemetry export to a started node (after 'await node.start()')")
        self.engine = engine
        self.exporter = exporter
        self.interval = interval
        self.exported = 0
        self.lost_gaps = 0  # times the ring wrapped between two exports (spans lost to the export)
        self._cursor: tuple[Any, ...] | None = None
        self._spec: Any = None
        self._spec_version = -1
        self._task: asyncio.Task[None] | None = None

    def _system_spec(self) -> Any:
        membership = self.engine.membership
        if membership.version != self._spec_version:
            self._spec = membership.system_spec()
            self._spec_version = membership.version
        return self._spec

    def take(self) -> list[ReadableSpan]:
        """The spans recorded since the last call, converted (this advances the cursor)."""
        tracer = self.engine.tracer
        raw, self._cursor, complete = tracer.since(self._cursor)
        if not complete:
            self.lost_gaps += 1
            log.warning("otel: the span ring wrapped between two exports; raise NodeConfig.span_ring or export more often")
        return to_otel_spans(raw, tracer.service, tracer.instance, self._system_spec(), tracer.offset) if raw else []

    async def export_now(self) -> int:
        """Export what is new now; returns how many spans were handed to the exporter."""
        spans = self.take()
        if spans:
            await asyncio.to_thread(self.exporter.export, spans)
            self.exported += len(spans)
        return len(spans)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.export_now()
            except Exception:  # the collector is down, or the exporter failed: keep the node running
                log.exception("otel: span export failed")

    def start(self) -> OtelExport:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def close(self) -> None:
        """Export what is left, then stop (the exporter itself is the caller's to shut down)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.export_now()


def attach(node: Node, exporter: Any, *, interval: float = 1.0) -> OtelExport:
    """Start exporting ``node``'s spans to ``exporter`` every ``interval`` seconds (call in its loop)."""
    return OtelExport(node, exporter, interval).start()
