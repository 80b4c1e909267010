"""Services for the observability tests (issue 6), run in separate node processes.

A three-service flow whose last step fails: ``orders`` takes PlaceOrder and emits OrderPlaced,
``payments`` takes it (slowly, so its timing shows) and emits PaymentTaken, ``shipping`` takes
that and raises. A consumer whose speed the test controls with a flag file (lag), and a handler
that refuses a poison value until a fix file exists (dead letters). Handlers record what they
did in ``$CHOREO_RECORD_DIR`` (see :mod:`recording`), the ground truth the tests compare with.
"""

from __future__ import annotations

import asyncio
import os
import time

from choreo import Command, Event, Service

from .recording import record


class PlaceOrder(Command):
    order_id: str


class OrderPlaced(Event, key="order_id"):
    order_id: str


class PaymentTaken(Event, key="order_id"):
    order_id: str


class Shipped(Event, key="order_id"):
    order_id: str


orders = Service("orders")


@orders.command(PlaceOrder, emits=[OrderPlaced])
def place_order(cmd: PlaceOrder, ctx) -> str:
    ctx.emit(OrderPlaced(order_id=cmd.order_id))
    return cmd.order_id


payments = Service("payments")


@payments.on(OrderPlaced, emits=[PaymentTaken])
def take_payment(ev: OrderPlaced, ctx) -> None:
    time.sleep(0.02)  # a step that takes visible time
    ctx.emit(PaymentTaken(order_id=ev.order_id))


shipping = Service("shipping")


@shipping.on(PaymentTaken, emits=[Shipped], retries=1, backoff=0.01)
def ship(ev: PaymentTaken, ctx) -> None:
    record("shipping", f"attempt {ctx.attempt} {ctx.traceparent}")
    raise RuntimeError(f"no courier for {ev.order_id}")


# --- lag: a consumer slowed down while a flag file exists --------------------------------------


class Job(Event, key="k"):
    k: str
    n: int


lagging = Service("lagging")


@lagging.on(Job)
async def work(ev: Job) -> None:
    if os.path.exists(os.environ["CHOREO_SLOW_FLAG"]):
        await asyncio.sleep(0.2)
    record("lagging", f"Job {ev.k} {ev.n}")


# --- dead letters: a poison value fails until a fix file exists ------------------------------


class Deposit(Event, key="account"):
    account: str
    cents: int


ledger = Service("ledger")


@ledger.on(Deposit, retries=2, backoff=0.01)
def book(ev: Deposit) -> None:
    if ev.cents == 13 and not os.path.exists(os.environ["CHOREO_FIX_FLAG"]):
        raise ValueError(f"cannot book {ev.cents} cents on {ev.account}")
    record("ledger", f"Deposit {ev.account} {ev.cents}")
