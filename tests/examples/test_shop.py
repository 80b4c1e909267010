"""examples/shop: retries under new request ids still place every order once; stock, payments and
the read model agree. Checked by the test's own client, not only by the driver's report."""

from __future__ import annotations

import pytest

from example_run import ask_all, drive, run

from choreo.client import rpc
from examples.shop.catalog import INITIAL_STOCK
from examples.shop.messages import GetCharges, GetOrder, GetOrders, GetStock
from examples.shop.mobile import checkouts

pytestmark = pytest.mark.slow  # real processes


def test_flaky_phones_place_every_order_once(up) -> None:
    system = up("examples.shop")
    orders, seed = 40, 7
    out = drive(system, orders=orders, phones=4, loss=0.3, double_tap=0.1, seed=seed)
    carts = {c.order_id: c for c in checkouts(orders, seed)}

    # the scenario really was flaky: answers were lost and retried, some taps doubled
    assert out.lost >= 5 and out.double_taps >= 1, (out.lost, out.double_taps)
    assert out.attempts == orders + out.lost + out.double_taps, out.attempts
    # every attempt reached the api (a new request id each time: nothing dedups them there) ...
    assert system.total("processed", "api") == out.attempts
    # ... and orders recognised every retry of a checkout as the same CreateOrder
    assert system.total("duplicates", "orders") >= out.attempts - orders

    created, stock, charges, *views = run_checks(system, list(carts))
    # one order per checkout, numbered 1..N without gaps: no checkout was handled twice
    assert sorted(v.order_id for v in created) == sorted(carts), "a checkout became several orders, or none"
    assert [v.number for v in created] == list(range(1, orders + 1))
    # GetOrder answers every order, at the end of its flow, with what the phone ordered
    for oid, view in zip(carts, views):
        assert view is not None, f"GetOrder({oid}) answered nothing"
        assert view.status in ("shipped", "cancelled"), view
        assert (view.customer_id, view.lines) == (carts[oid].customer_id, carts[oid].lines), view
    shipped = {v.order_id: v for v in views if v.status == "shipped"}
    cancelled = [v for v in views if v.status == "cancelled"]
    assert shipped and cancelled, "the scenario should both ship and cancel orders"
    assert {v.reason.split(":")[0] for v in cancelled} <= {"out of stock", "payment declined"}
    # stock: what is gone is exactly what shipped orders took (declined orders' stock came back)
    for sku, initial in INITIAL_STOCK.items():
        sold = sum(line.qty for v in shipped.values() for line in v.lines if line.sku == sku)
        assert stock[sku] == initial - sold, (sku, stock[sku], initial, sold)
    # payments: one charge per shipped order, of its total; none for the others
    assert sorted(c.order_id for c in charges) == sorted(shipped)
    assert all(c.amount_cents == shipped[c.order_id].total_cents for c in charges)
    # the runtime's own record: in a retried checkout's trace, the api ran every attempt and
    # orders created the order once
    trace = out.retried_trace()
    assert trace is not None and set(out.traces) == set(carts)
    spans = [s for e in system.endpoints() for s in rpc(e, "spans", {"trace_id": trace})]
    ran = [s["handler"] for s in spans if s["outcome"] == "ok"]
    assert ran.count("place_order") >= 2 and ran.count("create_order") == 1, ran
    # the driver's own verdict agrees, and nothing went to a dead-letter store
    assert out.problems == [], out.problems
    assert system.total("dead_letters") == 0


def run_checks(system, order_ids):
    return run(ask_all(system, [GetOrders(), GetStock(), GetCharges(), *(GetOrder(oid) for oid in order_ids)]))
