"""examples/shop: retries under new request ids still place every order once; stock, payments and
the read model agree. Checked by the test's own client, not only by the driver's report."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from example_run import ask_all, drive, drive_with, run, standbys_complete

from choreo.client import rpc
from examples.shop.catalog import INITIAL_STOCK
from examples.shop.messages import GetCharges, GetNotices, GetOrder, GetOrderBook, GetStock
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

    shipped, cancelled = assert_exact(system, orders, seed)
    assert shipped and cancelled, "the scenario should both ship and cancel orders"
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


def assert_exact(system, orders: int, seed: int) -> tuple[list[str], list[str]]:
    """What must hold exactly after any run of the shop, asked by the test's own client: every
    checkout one order, numbered 1..N; at the end of its flow with what the phone ordered; stock
    gone exactly for the shipped orders; one charge per shipped order, of its total; one notice
    per order. Returns the shipped and the cancelled order ids."""
    carts = {c.order_id: c for c in checkouts(orders, seed)}
    book, stock, charges, views = run_checks(system, list(carts))
    # one order per checkout, numbered 1..N without gaps: no checkout was handled twice
    assert book.numbered == orders, f"{book.numbered} orders created for {orders} checkouts"
    assert sorted(v.number for v in views if v is not None) == list(range(1, orders + 1))
    # GetOrder answers every order, at the end of its flow, with what the phone ordered
    for oid, view in zip(carts, views):
        assert view is not None, f"GetOrder({oid}) answered nothing"
        assert view.status in ("shipped", "cancelled"), view
        assert (view.customer_id, view.lines) == (carts[oid].customer_id, carts[oid].lines), view
    shipped = {v.order_id: v for v in views if v.status == "shipped"}
    cancelled = [v for v in views if v.status == "cancelled"]
    assert {v.reason.split(":")[0] for v in cancelled} <= {"out of stock", "payment declined"}
    # stock: what is gone is exactly what shipped orders took (cancelled orders' stock came back)
    for sku, initial in INITIAL_STOCK.items():
        sold = sum(line.qty for v in shipped.values() for line in v.lines if line.sku == sku)
        assert stock[sku] == initial - sold, (sku, stock[sku], initial, sold)
    # payments: one charge per shipped order, of its total; none for the others
    assert sorted(c.order_id for c in charges) == sorted(shipped)
    assert all(c.amount_cents == shipped[c.order_id].total_cents for c in charges)
    # notifications: one notice per order, saying how it ended
    notices = run(ask_all(system, [GetNotices(oid) for oid in carts]))
    assert [len(n) for n in notices] == [1] * orders, [oid for oid, n in zip(carts, notices) if len(n) != 1]
    return sorted(shipped), [v.order_id for v in cancelled]


def run_checks(system, order_ids):
    """The order book, the stock by SKU, every charge, and GetOrder for each order: one keyed query each."""
    skus = sorted(INITIAL_STOCK)
    book, *answers = run(ask_all(system, [GetOrderBook(), *(GetStock(s) for s in skus),
                                          *(GetCharges(oid) for oid in order_ids), *(GetOrder(oid) for oid in order_ids)]))
    stock = dict(zip(skus, answers[:len(skus)]))
    charges = [c for cs in answers[len(skus):len(skus) + len(order_ids)] for c in cs]
    return book, stock, charges, answers[len(skus) + len(order_ids):]


# -- state that moves with its partition: instances killed, added and stopped mid-run -----------

# inventory's flows come back to keys it wrote (the SKUs' answers to the order's reservation, a
# cancelled order's ReleaseStock to a SKU its reservation took from): with a standby, its writes
# there go ahead of their acknowledgements (README, Handler state)
STATEFUL = ["orders", "payments", "inventory"]


def progress_at(fraction: float) -> tuple[asyncio.Event, Callable[[int, int], None]]:
    """An event set once ``fraction`` of the checkouts are done (the driver's progress callback)."""
    moment = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= fraction * total:
            moment.set()

    return moment, progress


def test_killing_an_instance_of_each_stateful_service_loses_no_state(up) -> None:
    stateful = STATEFUL
    system = up("examples.shop", instances={s: 2 for s in stateful})
    orders, seed = 60, 7
    moment, progress = progress_at(0.3)
    killed = []

    async def kill_one_of_each() -> None:
        await standbys_complete(system, stateful)  # from then on, a crash of an owner loses no state
        for service in stateful:  # SIGKILL: no drain, no hand-over; each partition's standby takes over
            victim = system.running(service)[0]
            await system.kill(victim)
            killed.append(victim)

    out = run(drive_with(system, moment, kill_one_of_each, orders=orders, phones=4, loss=0.3, double_tap=0.1,
                         seed=seed, rate=10, progress=progress, report=False), timeout=90)
    assert [v.returncode for v in killed] == [-9] * len(stateful)
    assert [len(system.running(s)) for s in stateful] == [1] * len(stateful)
    assert out.done == orders and out.problems == [], out.problems
    shipped, cancelled = assert_exact(system, orders, seed)
    assert shipped and cancelled
    assert system.total("dead_letters") == 0


def test_scaling_out_then_in_mid_run_moves_the_state(up) -> None:
    stateful = STATEFUL
    system = up("examples.shop", instances={s: 2 for s in stateful})
    orders, seed = 60, 5
    moment, progress = progress_at(0.2)
    added, stopped = [], []
    scaled = [s for s in ("orders", "inventory") if s in stateful]

    async def scale_out_then_in() -> None:
        for service in scaled:  # a third instance: it takes its share of the partitions, with their state
            added.append(await system.add(service))
        for service in scaled:  # SIGTERM one of the first two: it hands its partitions over, state included
            inst = system.running(service)[0]
            stopped.append(await system.stop_instance(inst))

    out = run(drive_with(system, moment, scale_out_then_in, orders=orders, phones=4, loss=0.3, double_tap=0.1,
                         seed=seed, rate=10, progress=progress, report=False), timeout=90)
    assert stopped == [0] * len(scaled)
    for inst in added:  # the newcomers received partitions with state in them
        moves = system.stats(inst.service)[inst.name]["handler_state"]["moves"]
        assert moves["streams_received"] > 0 and moves["entries_received"] > 0, (inst.name, moves)
    assert [len(system.running(s)) for s in stateful] == [2] * len(stateful)
    assert out.done == orders and out.problems == [], out.problems
    shipped, cancelled = assert_exact(system, orders, seed)
    assert shipped and cancelled
    assert system.total("dead_letters") == 0
