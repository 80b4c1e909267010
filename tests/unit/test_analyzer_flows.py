"""Flows: entry points, where they come from, what they reach, depth and fan-out, and the tree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyzer_systems.helpers import analysis_of

from choreo import Command, Event, Query, Service
from choreo.analyzer import analyze, entry_points
from choreo.analyzer._load import collect_services
from choreo.analyzer._text import Style, render_flows
from choreo.spec import system_spec


class Start(Command, key="id"):
    id: str


class A(Event, key="id"):
    id: str


class B(Event, key="id"):
    id: str


class C(Event, key="id"):
    id: str


class D(Event, key="id"):
    id: str


class E(Event, key="id"):
    id: str


class Ask(Query):
    id: str


@pytest.fixture(scope="module")
def shop():
    return analyze(system_spec(collect_services("analyzer_systems.shop")), name="shop")


def test_entry_points_are_commands_and_events_no_handler_produces(shop) -> None:
    assert entry_points(shop.graph) == ["PlaceOrder", "RefundPayment"]
    assert [f.entry for f in shop.flows] == ["PlaceOrder", "RefundPayment"]


def test_a_service_level_send_marks_the_origin(shop) -> None:
    place, refund = shop.flows
    assert place.origins == ("storefront",) and place.source == "storefront"
    assert refund.origins == () and refund.source == "outside"


def test_what_a_flow_reaches_with_depth_and_fan_out(shop) -> None:
    place, refund = shop.flows
    # PlaceOrder -> orders.place -> OrderPlaced -> payments.charge -> PaymentCaptured -> shipping.ship
    #   -> OrderShipped -> notifications.tell_shipped: four handlers deep
    assert place.depth == 4
    assert place.fan_out == 1
    assert place.services == ("orders", "payments", "shipping", "notifications")
    assert set(place.messages) == {
        "PlaceOrder",
        "OrderPlaced",
        "PaymentCaptured",
        "PaymentFailed",
        "OrderShipped",
        "OrderCancelled",
    }
    assert (refund.depth, refund.services) == (3, ("payments", "orders", "notifications"))


def test_fan_out_counts_the_handlers_of_one_message() -> None:
    a, b, c, d = Service("a"), Service("b"), Service("c"), Service("d")

    @a.command(Start, emits=[A])
    def start(cmd, ctx): ...

    for svc in (b, c, d):
        svc.on(A)(lambda event: None)

    (flow,) = analysis_of(a, b, c, d).flows
    assert (flow.fan_out, flow.depth, flow.services) == (3, 2, ("a", "b", "c", "d"))


def test_a_diamond_is_walked_once_and_measured_fully() -> None:
    s1, s2, s3, s4 = Service("s1"), Service("s2"), Service("s3"), Service("s4")

    @s1.command(Start, emits=[A, B])
    def start(cmd, ctx): ...

    @s2.on(A, emits=[D])
    def via_a(event, ctx): ...

    @s3.on(B, emits=[C])
    def via_b(event, ctx): ...

    @s3.on(C, emits=[D])
    def via_c(event, ctx): ...

    @s4.on(D)
    def end(event): ...

    (flow,) = analysis_of(s1, s2, s3, s4).flows
    # the longest chain: s1.start -> s3.via_b -> s3.via_c -> s4.end, although D was first reached via A
    assert flow.depth == 4
    text = render_flows(analysis_of(s1, s2, s3, s4))
    assert text.count("s4.end") == 1, text
    assert "emits D (event)  (continues above)" in text


def test_a_cycle_is_shown_once_and_does_not_count_twice() -> None:
    s1, s2 = Service("s1"), Service("s2")

    @s1.command(Start, emits=[A])
    def start(cmd, ctx): ...

    @s2.on(A, emits=[B])
    def on_a(event, ctx): ...

    @s1.on(B, emits=[A])
    def on_b(event, ctx): ...

    (flow,) = analysis_of(s1, s2).flows
    assert flow.depth == 3  # start -> on_a -> on_b, then A again is the cycle
    assert "emits A (event)  ↻ cycle: A is already upstream" in render_flows(analysis_of(s1, s2))


def test_depth_does_not_depend_on_the_order_the_graph_is_walked() -> None:
    # B and C loop into each other and B leads down a long tail (A -> D -> E). Walked from B first,
    # C looks short (its way back to B is cut as a cycle); from Start, C is the longest way in:
    # start -> on_c -> on_b -> on_a -> on_d -> on_e = 6. A depth cached regardless of the path gives 5.
    s = Service("s")

    @s.command(Start, emits=[B, C])
    def start(cmd, ctx): ...

    @s.on(B, emits=[C, A])
    def on_b(event, ctx): ...

    @s.on(C, emits=[B])
    def on_c(event, ctx): ...

    @s.on(A, emits=[D])
    def on_a(event, ctx): ...

    @s.on(D, emits=[E])
    def on_d(event, ctx): ...

    @s.on(E)
    def on_e(event): ...

    (flow,) = analysis_of(s).flows
    assert flow.depth == 6


def test_queries_are_not_entry_points_and_orphans_are_marked() -> None:
    web, orders = Service("web", sends=[Ask]), Service("orders")

    @orders.query(Ask)
    def ask(query): ...

    @orders.command(Start, emits=[A])
    def start(cmd, ctx): ...

    a = analysis_of(web, orders)
    assert [f.entry for f in a.flows] == ["Start"]
    assert "emits A (event)  nobody consumes it" in render_flows(a)


def test_the_tree_reads_top_down() -> None:
    orders, payments = Service("orders"), Service("payments")

    @orders.command(Start, emits=[A])
    def place(cmd, ctx): ...

    @payments.on(A, broadcast=True, emits=[B])
    def charge(event, ctx): ...

    @orders.on(B)
    def done(event): ...

    line = {fn: fn.__code__.co_firstlineno for fn in (place, charge, done)}
    expected = (
        "Start (command, from outside): depth 3, fan-out 1, 2 services, 3 messages\n"
        f"└─ orders.place  by id  {__name__}:{line[place]}\n"
        "   └─ emits A (event)\n"
        f"      └─ payments.charge  by id  broadcast  {__name__}:{line[charge]}\n"
        "         └─ emits B (event)\n"
        f"            └─ orders.done  by id  {__name__}:{line[done]}\n"
        "\n"
    )
    a = analysis_of(orders, payments)
    assert render_flows(a) == expected
    ascii_only = render_flows(a, Style(unicode=False))
    assert "`- orders.place" in ascii_only and "└" not in ascii_only
    coloured = render_flows(a, Style(color=True))
    assert "\x1b[" in coloured and "\x1b[" not in render_flows(a)


def test_flow_as_data() -> None:
    orders = Service("orders")

    @orders.command(Start, emits=[A])
    def place(cmd, ctx): ...

    (flow,) = analysis_of(orders).flows
    data = flow.to_dict()
    assert data["entry"] == "Start" and data["depth"] == 1
    (handler,) = data["tree"]["handlers"]
    assert handler["service"] == "orders" and handler["outputs"] == [{"message": "A", "kind": "event", "handlers": []}]
