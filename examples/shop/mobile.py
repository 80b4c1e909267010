"""The mobile app, simulated: phones that check out carts over a flaky connection.

Each phone sends PlaceOrder and, with probability ``loss``, never sees the answer (the
connection dropped after the api had done its work), so it tries again: a new HTTP attempt,
with a new request id. Sometimes an impatient user taps twice (two attempts at once). All of
it is seeded: the same seed gives the same carts, losses and taps.

Then the back office checks the result: GetOrder, GetCharges and GetNotices for every order,
GetStock for every SKU of the catalog and the order book's count, which must all agree. Each
of these is a keyed query, answered by the instance that holds its key's state.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from choreo import Service

from .catalog import INITIAL_STOCK, PRICES, order_id
from .messages import GetCharges, GetNotices, GetOrder, GetOrderBook, GetStock, Line, OrderAccepted, OrderView, PlaceOrder

# What the app and the back office originate (the driver's nodes run as these services).
mobile = Service("mobile", sends=[PlaceOrder, GetOrder], doc="the customers' phones")
backoffice = Service("backoffice", sends=[GetOrderBook, GetStock, GetCharges, GetNotices], doc="the shop's staff tools")

CUSTOMERS = [f"c{n:02d}" for n in range(1, 13)]


@dataclass(frozen=True)
class Checkout:
    customer_id: str
    cart_id: str
    lines: list[Line]

    @property
    def order_id(self) -> str:
        return order_id(self.customer_id, self.cart_id)

    def trace_id(self, seed: int) -> str:
        """The checkout's trace (32 hex digits): every attempt of it, retries included, is one trace."""
        return hashlib.sha256(f"{seed}/{self.order_id}".encode()).hexdigest()[:32]


def checkouts(count: int, seed: int) -> list[Checkout]:
    """The carts the customers check out, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        skus = rng.sample(sorted(PRICES), rng.randint(1, 3))
        lines = [Line(sku, rng.randint(1, 2)) for sku in sorted(skus)]
        out.append(Checkout(rng.choice(CUSTOMERS), f"cart{n:04d}", lines))
    return out


@dataclass
class Outcome:
    """What happened, as the phones and the back office saw it."""

    checkouts: int = 0
    attempts: int = 0  # PlaceOrder requests sent (every retry and double tap included)
    lost: int = 0  # answers the phones never saw
    double_taps: int = 0
    accepted: dict[str, OrderAccepted] = field(default_factory=dict)  # order id -> the answer the phone kept
    done: int = 0  # checkouts finished so far
    traces: dict[str, str] = field(default_factory=dict)  # order id -> trace id (hex) of all its attempts
    retried: list[str] = field(default_factory=list)  # order ids whose first answer was lost
    views: dict[str, OrderView | None] = field(default_factory=dict)  # GetOrder's answer for each checkout
    created: list[OrderView] = field(default_factory=list)  # the orders GetOrder knows, by number
    numbered: int = 0  # orders the order book numbered (one per order created)
    stock: dict[str, int] = field(default_factory=dict)
    charges: list = field(default_factory=list)
    notices: list = field(default_factory=list)
    orders_deduplicated: int = 0  # CreateOrder duplicates the orders instances acknowledged without handling
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        return 1 if self.problems else 0

    def retried_trace(self) -> str | None:
        """The trace of a checkout that was retried (its first answer lost), for ``choreo trace``."""
        return self.traces[self.retried[0]] if self.retried else None


async def phone(client, mine: list[Checkout], rng: random.Random, loss: float, double_tap: float, out: Outcome,
                seed: int, progress: Callable[[int, int], None] | None, starts: list[float] | None = None) -> None:
    for n, c in enumerate(mine):
        if starts is not None and starts[n] > time.monotonic():  # paced: this customer comes later
            await asyncio.sleep(starts[n] - time.monotonic())
        trace = out.traces[c.order_id] = c.trace_id(seed)
        first = True
        while True:
            tap = rng.random() < double_tap
            tries = [PlaceOrder(f"req-{rng.getrandbits(40):010x}", c.customer_id, c.cart_id, c.lines)
                     for _ in range(2 if tap else 1)]
            answers = await asyncio.gather(*(
                client.send(t, timeout=30, traceparent=f"00-{trace}-{t.request_id[4:]:0>16}-01") for t in tries
            ))
            out.attempts += len(tries)
            out.double_taps += tap
            if rng.random() < loss:  # the connection dropped: the phone never sees the answer
                out.lost += 1
                if first:
                    out.retried.append(c.order_id)
                first = False
                continue
            out.accepted[c.order_id] = answers[0]
            break
        out.done += 1
        if progress is not None:
            progress(out.done, out.checkouts)


async def final_view(client, oid: str, timeout: float = 10.0) -> OrderView | None:
    """GetOrder until the order has reached the end of its flow (shipped or cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        view = await client.ask(GetOrder(oid))
        if (view is not None and view.status in ("shipped", "cancelled")) or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.02)


def check(out: Outcome, carts: list[Checkout]) -> list[str]:
    """Everything that must hold whatever the losses and retries (empty: all consistent)."""
    problems = []
    by_id = {c.order_id: c for c in carts}
    if out.numbered != len(by_id):
        problems.append(f"orders created {out.numbered} orders for {len(by_id)} checkouts")
    numbers = [v.number for v in out.created]
    if numbers != list(range(1, len(by_id) + 1)):
        problems.append(f"the orders' numbers are not 1..{len(by_id)}, one each: {numbers[:10]}...")
    missing = [oid for oid in by_id if out.views.get(oid) is None]
    if missing:
        problems.append(f"GetOrder knows nothing of {len(missing)} orders (e.g. {missing[:3]})")
    unfinished = [oid for oid, v in out.views.items() if v is not None and v.status not in ("shipped", "cancelled")]
    if unfinished:
        problems.append(f"{len(unfinished)} orders never finished (e.g. {unfinished[:3]})")
    wrong_ids = [oid for oid, a in out.accepted.items() if a.order_id != oid]
    if wrong_ids:
        problems.append(f"the api answered with other order ids for {wrong_ids[:3]}")
    shipped = {oid for oid, v in out.views.items() if v is not None and v.status == "shipped"}
    sold: dict[str, int] = {sku: 0 for sku in INITIAL_STOCK}
    for oid in shipped:
        for line in by_id[oid].lines:
            sold[line.sku] += line.qty
    for sku, initial in INITIAL_STOCK.items():
        if out.stock.get(sku) != initial - sold[sku]:
            problems.append(f"stock of {sku}: {out.stock.get(sku)} on hand, expected {initial} - {sold[sku]} sold")
    charged: dict[str, int] = {}
    for ch in out.charges:
        charged[ch.order_id] = charged.get(ch.order_id, 0) + 1
        view = out.views.get(ch.order_id)
        if view is None or ch.amount_cents != view.total_cents:
            problems.append(f"charge of {ch.amount_cents} for {ch.order_id} does not match its order")
    charged_twice = [oid for oid, n in charged.items() if n > 1]
    if charged_twice:
        problems.append(f"{len(charged_twice)} orders charged more than once (e.g. {charged_twice[:3]})")
    if set(charged) != shipped:
        problems.append(f"charged orders and shipped orders differ: {sorted(set(charged) ^ shipped)[:5]}")
    told: dict[str, int] = {}
    for notice in out.notices:
        told[notice.order_id] = told.get(notice.order_id, 0) + 1
    if told != {oid: 1 for oid in by_id}:
        bad = sorted(oid for oid in set(told) | set(by_id) if told.get(oid) != 1)
        problems.append(f"{len(bad)} orders were not notified exactly once (e.g. {bad[:3]})")
    return problems


async def drive(client, system, orders: int = 40, phones: int = 4, loss: float = 0.3, double_tap: float = 0.1,
                seed: int = 7, rate: float = 0.0, progress: Callable[[int, int], None] | None = None,
                report: bool = True) -> Outcome:
    """Phones check out ``orders`` carts over a flaky connection, then the back office checks it all.

    Each checkout is one trace: all its attempts carry the trace id in ``Outcome.traces`` (as a
    W3C traceparent, the way an instrumented app would). ``rate``: checkouts begun per second
    over all phones (0: each phone checks out as fast as its answers come back); the carts,
    losses and taps are the same at any rate. ``progress(done, total)`` is called after each
    checkout, for a live view. ``report=False``: print nothing (the caller reports the outcome).
    """
    started = time.monotonic()
    carts = checkouts(orders, seed)
    out = Outcome(checkouts=len(carts))

    def starts(p: int) -> list[float] | None:  # checkout i of all begins at started + i / rate
        return [started + i / rate for i in range(p, len(carts), phones)] if rate > 0 else None

    await asyncio.gather(*(
        phone(client, carts[p::phones], random.Random(f"{seed}/{p}"), loss, double_tap, out, seed, progress, starts(p))
        for p in range(phones)
    ))
    out.views = dict(zip([c.order_id for c in carts], await asyncio.gather(*(final_view(client, c.order_id) for c in carts))))
    async with system.client(backoffice) as office:
        await audit(office, out, [c.order_id for c in carts])
    out.orders_deduplicated = system.total("duplicates", "orders")
    out.seconds = time.monotonic() - started
    out.problems = check(out, carts)
    if report:
        print_report(out, system)
    return out


async def audit(node, out: Outcome, order_ids: list[str]) -> None:
    """The back office's queries, one per key (an order, a SKU, the book), into ``out``."""
    async def each(queries) -> list:
        found: list = []
        for n in range(0, len(queries), 200):  # at most 200 at once
            found += await asyncio.gather(*(node.ask(q) for q in queries[n:n + 200]))
        return found

    out.numbered = (await node.ask(GetOrderBook())).numbered
    out.created = sorted((v for v in out.views.values() if v is not None), key=lambda v: v.number)
    out.stock = dict(zip(sorted(INITIAL_STOCK), await each([GetStock(sku) for sku in sorted(INITIAL_STOCK)])))
    out.charges = [c for charges in await each([GetCharges(oid) for oid in order_ids]) for c in charges]
    out.notices = [n for notices in await each([GetNotices(oid) for oid in order_ids]) for n in notices]


def print_report(out: Outcome, system) -> None:
    """What ``choreo up examples/shop`` prints at the end (needs the system still running)."""
    statuses: dict[str, int] = {}
    for v in out.views.values():
        key = "missing" if v is None else v.status if v.status != "cancelled" else v.reason.split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1
    retries = out.attempts - out.checkouts
    print(f"mobile: {out.checkouts} checkouts, {out.attempts} PlaceOrder attempts in {out.seconds:.1f} s: "
          f"{out.lost} answers lost and retried under new request ids, {out.double_taps} double taps")
    print(f"api handled {system.total('processed', 'api')} attempts; orders created {out.numbered} orders, "
          f"{out.orders_deduplicated} duplicate CreateOrders acknowledged without running the handler "
          f"({retries} retries)")
    print("orders: " + ", ".join(f"{n} {k}" for k, n in sorted(statuses.items(), key=lambda kv: -kv[1])))
    sold = sum(INITIAL_STOCK.values()) - sum(out.stock.values())
    total = sum(ch.amount_cents for ch in out.charges)
    print(f"back office: {sold} units sold, {len(out.charges)} charges totalling {total / 100:,.2f}, "
          f"{len(out.notices)} notices")
    if out.problems:
        print("INCONSISTENT:\n  " + "\n  ".join(out.problems))
    else:
        print("consistent: every order placed once, stock and charges match the shipped orders, one notice each")
