"""The pure parts of observability: trace assembly, the top view, the metrics text, the span ring."""

from __future__ import annotations

import doctest
import importlib
from collections import deque

import pytest

from choreo.metrics import render
from choreo.observe.top import Sample, table
from choreo.observe.mesh import MeshNode
from choreo.observe.trace_view import assemble, render_text, to_json
from choreo.spec import HandlerSpec, ServiceSpec, SystemSpec
from choreo.tracing import Tracer, format_traceparent, parse_traceparent, span_id, trace_id_of, traceparent_of

ZERO = "0" * 32
T = "ab" * 16


def span(msg: str, cause: str, mtype: str, service: str, handler: str, received: float, started: float,
         finished: float, outcome: str = "ok", error: str | None = None, attempt: int = 1, instance: str = "") -> dict:  # fmt: skip
    return dict(msg_id=msg * 32 if len(msg) == 1 else msg, cause_id=cause * 32 if len(cause) == 1 else cause,
                type=mtype, service=service, instance=instance or f"{service}#1", handler=handler, received=received,
                started=started, finished=finished, outcome=outcome, error=error, attempt=attempt, key="k", partition=3)  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["choreo.tracing", "choreo.metrics", "choreo.latency", "choreo.observe.trace_view", "choreo.observe.top",
     "choreo.observe.traces", "choreo.observe.live"],
)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_trace_tree_retries_critical_path_and_failure() -> None:
    spans = [
        span("1", "0", "Place", "orders", "place", 0.0, 0.001, 0.002),
        # the event fans out to two services; only billing's handler failed for good
        span("2", "1", "Placed", "billing", "bill", 0.003, 0.004, 0.005, "error", "ValueError: no", 1),
        span("2", "1", "Placed", "billing", "bill", 0.003, 0.010, 0.011, "error", "ValueError: no", 2),
        span("2", "1", "Placed", "audit", "log", 0.003, 0.003, 0.004),
        # audit emitted something that took longest: the critical path goes there
        span("3", "2", "Logged", "archive", "keep", 0.006, 0.006, 0.050),
    ]
    spec = SystemSpec(services=(
        ServiceSpec("billing", handlers=(HandlerSpec("bill", "event", "Placed"),)),
        ServiceSpec("audit", handlers=(HandlerSpec("log", "event", "Placed", emits=("Logged",)),)),
    ))  # fmt: skip
    trace = assemble(T, [{"spans": spans[:3]}, {"spans": spans[3:]}], spec)
    doc = to_json(trace)
    labels = [f"{s['service']}.{s['handler']}" for s in doc["steps"]]
    assert labels == ["orders.place", "audit.log", "archive.keep", "billing.bill"]  # children by time received
    assert doc["steps"][2]["parent"] == 1, "Logged hangs under audit, whose handler declares it"
    assert doc["critical_path"] == [0, 1, 2]
    assert doc["failures"] == [3] and doc["status"] == "error"
    bill = doc["steps"][3]
    assert (bill["attempts"], bill["error"], bill["outcome"]) == (2, "ValueError: no", "error")
    assert bill["handler_ms"] == pytest.approx(2.0) and bill["duration_ms"] == pytest.approx(8.0)
    assert bill["queue_ms"] == pytest.approx(1.0)
    assert doc["duration_ms"] == pytest.approx(50.0)
    text = render_text(trace)
    assert "✗ failed: Placed in billing.bill on billing#1 after 2 attempts: ValueError: no" in text
    assert "critical path: orders.place -> audit.log -> archive.keep" in text


def test_trace_in_progress_and_missing_cause() -> None:
    done = span("1", "0", "A", "a", "h", 0.0, 0.0, 0.001)
    running = span("2", "1", "B", "b", "h", 0.002, 0.003, 0.5, "running", attempt=1)
    orphan = span("4", "9", "C", "c", "h", 0.004, 0.004, 0.005)
    trace = assemble(T, [{"spans": [done, orphan], "running": [running]}])
    doc = to_json(trace)
    assert doc["status"] == "running"
    assert [s["outcome"] for s in doc["steps"]] == ["ok", "running", "ok"]
    assert doc["roots"] == [0, 2] and doc["steps"][2]["cause_missing"] is True
    assert "(cause not found)" in render_text(trace)
    # a handler that finished between the two reads: its ok span wins over the running record
    finished = span("2", "1", "B", "b", "h", 0.002, 0.003, 0.004)
    trace = assemble(T, [{"spans": [done, finished], "running": [running]}])
    assert to_json(trace)["status"] == "ok"


def test_top_rates_come_from_counter_deltas_over_the_nodes_clock() -> None:
    node = MeshNode("w#1", "tcp://127.0.0.1:1", "w", "alive")

    def stats(t: float, received: int, processed: int, lag: dict) -> dict:
        return {"node": "w#1", "service": "w", "incarnation": "01", "time": t, "received": received,
                "processed": processed, "lag": lag, "in_flight": 0}  # fmt: skip

    before = Sample(100.0, [(node, stats(10.0, 100, 90, {1: 10}))], [])
    after = Sample(100.5, [(node, stats(12.0, 300, 150, {1: 100, 7: 50}))], [])
    view = table(after, before)
    (service,) = view["services"]
    assert service["received_per_s"] == 100.0 and service["processed_per_s"] == 30.0  # over 2 s of the node's clock
    assert service["lag"] == 150 and service["lag_by_partition"] == {"1": 100, "7": 50}
    assert table(after)["services"][0]["received_per_s"] is None


def test_metrics_text_parses_and_counters_never_go_down() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    floor: dict[str, float] = {}
    snap = {"service": 'we"ird', "node": "n\\1", "received": 5, "redelivered": 7, "refused": {"malformed": 2},
            "lag": {3: 4}, "peers": {"a": {"state": "alive"}}}  # fmt: skip
    first = render(snap, floor)
    families = {f.name: f for f in text_string_to_metric_families(first)}
    assert families["choreo_received"].type == "counter"
    (sample,) = families["choreo_received"].samples
    assert sample.labels == {"service": 'we"ird', "node": "n\\1"} and sample.value == 5
    (lag,) = families["choreo_consumer_lag"].samples
    assert lag.labels["partition"] == "3" and lag.value == 4
    # a channel's retransmissions leave the sum when its peer goes: the exported counter holds
    second = render({**snap, "redelivered": 3}, floor)
    (redelivered,) = [s for f in text_string_to_metric_families(second) if f.name == "choreo_redelivered" for s in f.samples]
    assert redelivered.value == 7


def test_span_ring_cursor_reports_new_spans_and_wraps() -> None:
    tracer = Tracer("s", "s#1", 4, lambda: 0.0)
    ring: deque = tracer.spans
    new, cursor, complete = tracer.since(None)
    assert (new, complete) == ([], True)
    for i in range(3):
        ring.append((i,))
    new, cursor, complete = tracer.since(None)
    assert [t[0] for t in new] == [0, 1, 2] and complete
    ring.append((3,))
    new, cursor, complete = tracer.since(cursor)
    assert [t[0] for t in new] == [3] and complete
    for i in range(4, 10):  # more than the ring holds: the cursor is gone
        ring.append((i,))
    new, cursor, complete = tracer.since(cursor)
    assert [t[0] for t in new] == [6, 7, 8, 9] and not complete


def test_traceparents() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id_of(tp) == "4bf92f3577b34da6a3ce929d0e0e4736" == trace_id_of("4BF92F3577B34DA6A3CE929D0E0E4736")
    msg = bytes(range(16))
    assert parse_traceparent(traceparent_of(msg)) == msg
    assert format_traceparent(msg, msg, "h").split("-")[2] == span_id(msg, "h").hex() != span_id(msg).hex()
    for bad in ("nope", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "12" * 15):
        with pytest.raises(ValueError):
            trace_id_of(bad)


def test_a_retry_shows_its_duplicate_under_the_attempt_that_sent_it() -> None:
    # a phone's first attempt went through; its retry (a new message) reached the api again, whose
    # CreateOrder (the same id: the idempotency key) orders acknowledged without running it again
    first = span("1", "0", "PlaceOrder", "api", "place_order", 0.000, 0.000, 0.001, instance="api#1")
    create = span("2", "1", "CreateOrder", "orders", "create_order", 0.002, 0.002, 0.003)
    placed = span("3", "2", "OrderPlaced", "inventory", "reserve", 0.004, 0.004, 0.005)
    retry = span("4", "0", "PlaceOrder", "api", "place_order", 0.010, 0.010, 0.011, instance="api#2")
    dup = span("2", "4", "CreateOrder", "orders", "create_order", 0.012, 0.012, 0.0121, "duplicate", attempt=0)
    spec = SystemSpec(services=(
        ServiceSpec("api", handlers=(HandlerSpec("place_order", "command", "PlaceOrder", sends=("CreateOrder",)),)),
        ServiceSpec("orders", handlers=(HandlerSpec("create_order", "command", "CreateOrder", emits=("OrderPlaced",)),)),
    ))  # fmt: skip
    trace = assemble(T, [{"spans": [first, retry]}, {"spans": [create, dup]}, {"spans": [placed]}], spec)
    doc = to_json(trace)
    steps = [(s["instance"], s["type"], s["outcome"], s["parent"]) for s in doc["steps"]]
    assert steps == [
        ("api#1", "PlaceOrder", "ok", None),
        ("orders#1", "CreateOrder", "ok", 0),  # the original keeps its one attempt ...
        ("inventory#1", "OrderPlaced", "ok", 1),  # ... and what it caused (never the duplicate's child)
        ("api#2", "PlaceOrder", "ok", None),
        ("orders#1", "CreateOrder", "duplicate", 3),  # the duplicate hangs under the retry
    ], steps
    assert doc["duplicates"] == [4] and doc["status"] == "ok" and doc["steps"][1]["attempts"] == 1
    # the retry finished last, but only led to a duplicate: the flow's work ended in inventory
    assert doc["critical_path"] == [0, 1, 2]
    text = render_text(trace)
    assert "= deduplicated: 1 duplicate (CreateOrder at orders#1): acknowledged without running the handler again" in text
    dup_line = text.splitlines()[-3]
    assert "CreateOrder -> orders.create_order @orders#1" in dup_line and "deduplicated: not run again" in dup_line
    assert dup_line.split()[2] == "-", "its handler did not run: no handler time"


# ---- latency histograms ------------------------------------------------------------------------


def _lane_span(msg: bytes, trace: bytes, cause: bytes, received: float, started: float, finished: float) -> tuple:
    """A span of a handler that emits nothing, handled at the first attempt (choreo.tracing's layout)."""
    return (msg + trace + cause, "Deposit", "book", received, started, finished, "ok", None, 1, b"acc", 3)


def _slow_span(msg: bytes, trace: bytes, outcome: str, attempt: int, received: float, started: float, finished: float,
               mtype: str = "Deposit", handler: str = "book") -> tuple:  # fmt: skip
    return (msg + trace + b"C" * 16, mtype, handler, received, started, finished, outcome,
            None if outcome == "ok" else "ValueError: no", attempt, b"acc", 3)  # fmt: skip


def test_latency_folds_spans_into_histograms_with_exemplars_and_openmetrics_parses_them() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    from prometheus_client.parser import text_string_to_metric_families as prometheus

    from choreo.latency import Latency

    tracer = Tracer("ledger", "ledger#1", 100, lambda: 0.0)
    tracer.terminal.add("book")  # it emits nothing: a message from outside ends its flow there
    latency = Latency(tracer)
    zero = bytes(16)
    ring = tracer.spans
    ring.append(_lane_span(b"A" * 16, b"A" * 16, zero, 1.000, 1.001, 1.004))  # from outside: a whole flow of 4 ms
    ring.append(_slow_span(b"B" * 16, b"T" * 16, "error", 1, 2.0, 2.010, 2.3))  # failed in 290 ms, waited 10
    ring.append(_slow_span(b"B" * 16, b"T" * 16, "ok", 2, 2.0, 2.5, 2.502))  # its retry: not a first wait
    ring.append(_slow_span(b"D" * 16, b"T" * 16, "duplicate", 0, 3.0, 3.0, 3.0))
    assert latency.fold({"processed": 3, "failed_attempts": 1}) == 4
    assert latency.handled == {("Deposit", "book", "ok"): 2, ("Deposit", "book", "error"): 1,
                               ("Deposit", "book", "duplicate"): 1}  # fmt: skip
    ok = latency.handler[("Deposit", "book", "ok")]
    assert ok.count == 2 and ok.sum == pytest.approx(0.005)
    assert latency.queue[("Deposit", "book")].count == 2, "first attempts only"
    assert latency.queue[("Deposit", "book")].sum == pytest.approx(0.011)
    (flow,) = latency.flow.values()
    assert flow.count == 1 and flow.sum == pytest.approx(0.004)
    assert latency.unfolded == 0
    text = render({"service": "ledger", "node": "ledger#1"}, {}, latency, openmetrics=True)
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics(text)}
    handler = families["choreo_handler_seconds"]
    assert handler.type == "histogram"
    buckets = {(s.labels["outcome"], s.labels["le"]): s for s in handler.samples if s.name.endswith("_bucket")}
    assert buckets[("error", "0.25")].value == 0 and buckets[("error", "0.5")].value == 1
    assert buckets[("error", "+Inf")].value == 1
    assert buckets[("error", "0.5")].exemplar.labels == {"trace_id": ("54" * 16)}
    assert buckets[("error", "0.5")].exemplar.value == pytest.approx(0.29)
    assert families["choreo_handled"].type == "counter"
    assert families["choreo_spans_unfolded"].samples[0].value == 0
    # the Prometheus text format has the same histograms, without exemplars
    plain = render({"service": "ledger", "node": "ledger#1"}, {}, latency)
    assert " # {" not in plain and "# EOF" not in plain
    assert {f.name for f in prometheus(plain)} >= {"choreo_handler_seconds", "choreo_queue_wait_seconds", "choreo_flow_seconds"}


def test_latency_counts_the_spans_the_ring_overwrote_before_a_fold() -> None:
    from choreo.latency import Latency

    tracer = Tracer("ledger", "ledger#1", 4, lambda: 0.0)
    latency = Latency(tracer)
    for i in range(10):
        tracer.spans.append(_lane_span(bytes([i]) * 16, bytes([i]) * 16, bytes(16), 0.0, 0.0, 0.001))
    assert latency.fold({"processed": 10}) == 4
    assert latency.unfolded == 6 and latency.handled == {("Deposit", "book", "ok"): 4}
    # a visit folds at most max_per_fold spans, the newest; the rest are counted as unfolded too
    bounded = Latency(Tracer("ledger", "ledger#1", 10, lambda: 0.0), max_per_fold=3)
    for i in range(5):
        bounded.tracer.spans.append(_lane_span(bytes([i]) * 16, bytes([i]) * 16, bytes(16), 0.0, 0.0, 0.001))
    assert bounded.fold({"processed": 5}) == 3 and bounded.unfolded == 2


def test_flows_completed_are_reported_only_while_watched() -> None:
    from types import SimpleNamespace

    from choreo.service import RetryPolicy

    tracer = Tracer("orders", "orders#1", 10, lambda: 5.0)
    handler = SimpleNamespace(name="place", retry=RetryPolicy(retries=1))
    env = SimpleNamespace(trace_id=b"T" * 16, cause_id=bytes(16), type="PlaceOrder")
    job = SimpleNamespace(env=env, handler=handler, message=object(), replay_of=None, error=None, attempt=0, received=1.0)
    assert tracer.completed is None, "nobody watches: the dispatcher does not even call"
    tracer.watch_flows()
    tracer.flow_done(job)
    tracer.flow_done(SimpleNamespace(**{**vars(job), "env": SimpleNamespace(**{**vars(env), "cause_id": b"C" * 16})}))
    tracer.flow_done(SimpleNamespace(**{**vars(job), "message": None}))  # a duplicate
    tracer.flow_done(SimpleNamespace(**{**vars(job), "error": "E: x", "attempt": 2}))  # dead-lettered
    assert tracer.take_flows() == [(b"T" * 16, "PlaceOrder", "place", 1.0, 5.0, "ok"), (b"T" * 16, "PlaceOrder", "place", 1.0, 5.0, "error")]
    assert tracer.take_flows() == []
    # a command the compiled lane answered: its flow ends there, unless its span says so already
    tracer.flow_answered(env, "place", 2.0)
    tracer.flow_answered(SimpleNamespace(**{**vars(env), "cause_id": b"C" * 16}), "place", 2.0)  # not from outside
    tracer.terminal.add("quote")
    tracer.flow_answered(env, "quote", 2.0)  # a terminal handler's span is its flow
    assert tracer.take_flows() == [(b"T" * 16, "PlaceOrder", "place", 2.0, 5.0, "ok")]
    tracer.unwatch_flows()
    assert tracer.completed is None
    tracer.flow_answered(env, "place", 2.0)
    assert tracer.take_flows() == []


def test_the_grafana_dashboard_queries_only_series_the_nodes_export() -> None:
    import json
    import re
    from pathlib import Path

    from choreo import metrics

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exported = {name for name, _ in [*metrics.COUNTERS.values(), *metrics.GAUGES.values()]}
    exported |= {metrics.REFUSED[0], metrics.LAG[0], metrics.PEERS[0], metrics.INFO[0], metrics.HANDLED[0], metrics.UNFOLDED[0]}
    exported |= {f"{name}_{part}" for _, name, _ in metrics.HISTOGRAMS for part in ("bucket", "count", "sum")}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            used |= set(re.findall(r"\bchoreo_[a-z_]+", target["expr"]))
    assert used and used <= exported, f"the dashboard queries series nobody exports: {sorted(used - exported)}"
    assert {f"{name}_bucket" for _, name, _ in metrics.HISTOGRAMS} <= used, "every latency histogram has a panel"
    query = dashboard["templating"]["list"][1]["query"]["query"]
    assert re.findall(r"\bchoreo_[a-z_]+", query) == [metrics.INFO[0]]


def test_live_labels_rates_errors_and_lag_per_edge_and_service() -> None:
    from choreo.observe.live import labels

    answers = [
        {"service": "shipping", "covered": 4.0, "lag": 2, "dead_letters": 3, "refused": 0,
         "handled": [{"type": "Paid", "handler": "ship", "outcome": "error", "count": 8}]},
        {"service": "orders", "covered": 2.0, "lag": 0, "dead_letters": 0, "refused": 1,
         "handled": [{"type": "Place", "handler": "place", "outcome": "ok", "count": 40},
                     {"type": "Place", "handler": "place", "outcome": "duplicate", "count": 5}]},
        {"service": "orders", "covered": 5.0, "lag": 1, "dead_letters": 0, "refused": 0,  # a second instance
         "handled": [{"type": "Place", "handler": "place", "outcome": "ok", "count": 10}]},
        {"service": None, "covered": 5.0, "handled": []},  # a client handles nothing
    ]  # fmt: skip
    edges = [("message:Place", "service:orders", "handles"), ("service:orders", "message:Paid", "emits"),
             ("message:Paid", "service:shipping", "handles"), ("service:shipping", "message:Shipped", "emits")]  # fmt: skip
    doc = labels(answers, edges)
    assert doc["edges"] == {
        "edge:message:Place->service:orders:handles": {"text": "22/s", "bad": False},  # 40/2 + 10/5 s, duplicates apart
        "edge:message:Paid->service:shipping:handles": {"text": "2.0 err/s", "bad": True},
    }
    assert doc["nodes"] == {
        "service:shipping": {"text": "lag 2, 3 dead letters, 2.0 err/s", "bad": True},
        "service:orders": {"text": "lag 1, 1 refused", "bad": False},
    }


def test_idle_connections_to_the_metrics_port_cannot_take_every_descriptor() -> None:
    import asyncio
    from collections.abc import Callable

    from choreo.metrics import MAX_SCRAPES, MetricsServer

    async def scenario() -> None:
        server = await MetricsServer.start(lambda: {"node": "n#1", "processed": 7})

        async def until(condition: Callable[[], bool], what: str) -> None:
            for _ in range(200):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{what}: not within 2 s")

        idle = [await asyncio.open_connection(server.host, server.port) for _ in range(MAX_SCRAPES)]
        # each is being answered: it holds its place until it speaks or 5 s pass
        await until(lambda: server._open == MAX_SCRAPES, "every idle connection taken in")
        extra = [await asyncio.open_connection(server.host, server.port) for _ in range(10)]
        for reader, writer in extra:  # turned away at once, not held
            answer = await asyncio.wait_for(reader.read(), 2.0)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            writer.close()
        assert server.turned_away == 10
        for _, writer in idle:
            writer.close()
        await until(lambda: server._open == 0, "the idle connections let go")
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 2.0)
        assert answer.startswith(b"HTTP/1.1 200 OK") and b"choreo_processed_total" in answer
        writer.close()
        server.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_stopping_live_map_server_lets_the_mesh_query_in_flight_end_first() -> None:
    """Ctrl-C while a poll asks the mesh: serve() returns only once that query has ended, not
    with it still running in a daemon thread while the process exits."""
    import threading
    import urllib.request

    from choreo.observe.live import serve

    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def slow_collect() -> dict:
        started.set()
        release.wait(10)
        ended.set()
        return {"time": 0.0, "edges": {}, "nodes": {}, "note": None}

    urls: list[str] = []
    listening = threading.Event()

    def ready(url: str) -> None:
        urls.append(url)
        listening.set()

    stop = threading.Event()
    server = threading.Thread(target=serve, args=("<html></html>", slow_collect),
                              kwargs={"ready": ready, "stop": stop}, daemon=True)  # fmt: skip
    server.start()
    assert listening.wait(10), "the server listens"
    def poll_once() -> None:
        urllib.request.urlopen(urls[0] + "live.json", timeout=10).read()

    poll = threading.Thread(target=poll_once, daemon=True)
    poll.start()
    assert started.wait(10), "the poll reached the mesh query"
    stop.set()  # what Ctrl-C does
    server.join(1.5)
    assert server.is_alive() and not ended.is_set(), "serve() waits for the query in flight"
    release.set()
    server.join(10)
    assert not server.is_alive() and ended.is_set()
