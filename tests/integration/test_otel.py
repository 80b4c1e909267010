"""OpenTelemetry export of spans (choreo[otel]), checked with the SDK's in-memory exporter.

Three nodes in this process each export their spans; the test puts the exported spans of one
flow together and checks that they form one trace with the right parents, statuses and
attributes, and that a handler's ``ctx.traceparent`` names its own exported span.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the OpenTelemetry SDK is not installed: pip install 'choreo[otel]'")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from choreo import Command, Event, Service  # noqa: E402
from choreo.node import Node, NodeConfig  # noqa: E402
from choreo.otel import attach  # noqa: E402
from choreo.tracing import new_traceparent, trace_id_of  # noqa: E402

FAST = NodeConfig(heartbeat=0.05, suspect_after=0.5, dead_after=1.0, tick=0.005)


class Start(Command):
    job: str


class Stepped(Event, key="job"):
    job: str


class Finished(Event, key="job"):
    job: str


def test_spans_export_as_one_opentelemetry_trace_with_parents() -> None:
    first = Service("first")
    second = Service("second")
    third = Service("third")
    seen: dict[str, str] = {}
    failures = {"left": 1}

    @first.command(Start, emits=[Stepped])
    def start(cmd: Start, ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.emit(Stepped(cmd.job))

    @second.on(Stepped, emits=[Finished], retries=2, backoff=0.01)
    def step(ev: Stepped, ctx) -> None:  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("flaky once")
        ctx.emit(Finished(ev.job))

    @third.on(Finished)
    def finish(ev: Finished, ctx) -> None:  # type: ignore[no-untyped-def]
        seen["traceparent"] = ctx.traceparent

    traceparent = new_traceparent()
    trace_int = int(trace_id_of(traceparent), 16)
    exporters = [InMemorySpanExporter() for _ in range(3)]

    async def scenario() -> None:
        nodes = []
        for svc in (first, second, third):
            node = Node(svc, peers=[nodes[0].endpoint] if nodes else [], config=FAST)
            await node.start()
            nodes.append(node)
        client = await Node(None, peers=[nodes[0].endpoint], config=FAST).start()
        exports = [attach(node, exporter, interval=0.05) for node, exporter in zip(nodes, exporters)]
        try:
            await client.wait_for({"first": 1, "second": 1, "third": 1})
            await client.send(Start("j-1"), traceparent=traceparent)
            await nodes[2].until(lambda: "traceparent" in seen, 10, "third step handled")
            # the periodic export picks the spans up by itself
            await nodes[2].until(lambda: len(exporters[2].get_finished_spans()) == 1, 10, "third span exported")
        finally:
            for export in exports:
                await export.close()
            for node in (client, *nodes):
                await node.stop(drain=False)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    (s_start,) = exporters[0].get_finished_spans()
    s_fail, s_ok = sorted(exporters[1].get_finished_spans(), key=lambda s: s.start_time)
    (s_finish,) = exporters[2].get_finished_spans()
    spans = [s_start, s_fail, s_ok, s_finish]
    # one trace: the caller's
    assert {s.context.trace_id for s in spans} == {trace_int}
    assert [s.name for s in spans] == ["Start process", "Stepped process", "Stepped process", "Finished process"]
    assert all(s.kind == SpanKind.CONSUMER for s in spans)
    # parents: the flow's chain, the failed attempt beside the successful one
    assert s_start.parent is None
    assert s_ok.parent.span_id == s_start.context.span_id
    assert s_fail.parent.span_id == s_start.context.span_id
    assert s_finish.parent.span_id == s_ok.context.span_id
    assert len({s.context.span_id for s in spans}) == 4
    # outcome and attributes
    assert s_fail.status.status_code == StatusCode.ERROR and "RuntimeError: flaky once" in s_fail.status.description
    assert s_ok.status.status_code == StatusCode.OK
    assert (s_fail.attributes["choreo.attempt"], s_ok.attributes["choreo.attempt"]) == (1, 2)
    assert s_ok.attributes["messaging.system"] == "choreo"
    assert s_ok.attributes["messaging.destination.name"] == "Stepped"
    assert s_ok.attributes["choreo.service"] == "second" and s_ok.attributes["choreo.key"] == "j-1"
    assert s_ok.resource.attributes["service.name"] == "second"
    assert s_start.start_time <= s_start.end_time <= s_ok.start_time <= s_ok.end_time <= s_finish.start_time
    # the handler's traceparent is its own exported span
    assert seen["traceparent"] == f"00-{trace_id_of(traceparent)}-{s_finish.context.span_id:016x}-01"
