"""The shop's message types: what the mobile app sends, and what the services tell each other."""

from __future__ import annotations

import msgspec

from choreo import Command, Event, Query


class Line(msgspec.Struct, frozen=True):
    sku: str
    qty: int


class OrderAccepted(msgspec.Struct, frozen=True):
    """The api's answer (HTTP 202): where the order will be, whichever attempt got through."""

    order_id: str
    request_id: str


class PlaceOrder(Command, returns=OrderAccepted):
    """POST /orders from the mobile app.

    ``request_id`` is what the API gateway assigns to each HTTP attempt: a retry gets a new one.
    It identifies the *attempt*, not the order, so it is deliberately not an idempotency key:
    deduplicating on it would let every retry through (the article's story).
    """

    request_id: str
    customer_id: str
    cart_id: str
    lines: list[Line]


class CreateOrder(Command, key="order_id", idempotency=["customer_id", "cart_id"]):
    """api -> orders. Identified by the *intent* (this customer checks out this cart): the
    retries of one checkout, whatever their request ids, are one message to orders."""

    order_id: str
    customer_id: str
    cart_id: str
    lines: list[Line]


class OrderPlaced(Event, key="order_id"):
    order_id: str
    customer_id: str
    lines: list[Line]
    total_cents: int


class StockReserved(Event, key="order_id"):
    order_id: str
    customer_id: str
    total_cents: int


class OutOfStock(Event, key="order_id"):
    order_id: str
    customer_id: str
    skus: list[str]


class PaymentCaptured(Event, key="order_id"):
    order_id: str
    customer_id: str
    amount_cents: int


class PaymentDeclined(Event, key="order_id"):
    order_id: str
    customer_id: str
    reason: str


class OrderShipped(Event, key="order_id"):
    order_id: str
    customer_id: str
    tracking: str


class OrderCancelled(Event, key="order_id"):
    order_id: str
    customer_id: str
    reason: str


class OrderView(msgspec.Struct, frozen=True):
    """The read model's row of one order (what GET /orders/{id} shows)."""

    order_id: str
    number: int  # the shop's order number, given when the order is created: 1, 2, 3...
    customer_id: str
    status: str  # placed, reserved, paid, shipped, cancelled
    lines: list[Line]
    total_cents: int
    tracking: str = ""
    reason: str = ""


class GetOrder(Query, key="order_id", returns=OrderView | None):
    order_id: str


class GetOrders(Query, returns=list[OrderView]):
    """Back office: every order created, by order number."""


class Charge(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    amount_cents: int


class GetCharges(Query, returns=list[Charge]):
    """Back office: every charge payments made, in order."""


class GetStock(Query, returns=dict[str, int]):
    """Back office: units on hand per SKU."""


class Notice(msgspec.Struct, frozen=True):
    customer_id: str
    order_id: str
    text: str


class GetNotices(Query, returns=list[Notice]):
    """Back office: every notice sent to customers, in order."""
