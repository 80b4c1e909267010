"""A system with findings of most kinds, errors among them.

Used by the CLI and renderer tests: `choreo lint analyzer_systems.broken` exits 1.
"""

from choreo import Command, Event, Query, Service


class PlaceOrder(Command):
    order_id: str


class ChargeCard(Command, key="order_id"):
    order_id: str


class PaymentFailed(Event, key="order_id"):
    order_id: str


class RetryPayment(Command, key="order_id"):
    order_id: str


class OrderShipped(Event, key="order_id"):
    order_id: str


class Restocked(Event):
    sku: str


class GetOrder(Query):
    order_id: str


class Refund(Command):
    order_id: str


orders = Service("orders")
payments = Service("payments")
billing = Service("billing")


@orders.command(PlaceOrder, sends=[ChargeCard])
def place(cmd, ctx): ...


@orders.on(PaymentFailed, sends=[RetryPayment])
def payment_failed(event, ctx): ...


@orders.query(GetOrder, emits=[OrderShipped])  # query-side-effects
def get_order(query): ...


@orders.on(Restocked, key="warehouse_id")  # missing-key-field, unfed-subscription
def restocked(event): ...


@payments.command(ChargeCard, emits=[PaymentFailed])
def charge(cmd, ctx): ...


@payments.command(RetryPayment, emits=[PaymentFailed], sends=[Refund])  # cycle; Refund has no owner
def retry(cmd, ctx): ...


@billing.command(ChargeCard, emits=[OrderShipped])  # ChargeCard's second owner
def charge_too(cmd, ctx): ...
