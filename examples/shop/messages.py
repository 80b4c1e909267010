"""The shop's message types: what the mobile app sends, what the services tell each other, and
the state each service keeps per key (``ctx.state``)."""

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


class CreateOrder(Command, key="book", idempotency=["customer_id", "cart_id"]):
    """api -> orders. Identified by the *intent* (this customer checks out this cart): the
    retries of one checkout, whatever their request ids, are one message to orders. Keyed by
    the order book, which gives each order the next number: one sequence, one key."""

    order_id: str
    customer_id: str
    cart_id: str
    lines: list[Line]
    book: str = "orders"


class OrderPlaced(Event, key="order_id"):
    order_id: str
    number: int  # the shop's order number
    customer_id: str
    lines: list[Line]
    total_cents: int


class ReserveStock(Command, key="sku"):
    """inventory -> inventory: set aside one line of an order, at the SKU's key (where its stock is)."""

    sku: str
    order_id: str
    qty: int


class ReleaseStock(Command, key="sku"):
    """inventory -> inventory: put a reserved line back (the order was cancelled)."""

    sku: str
    order_id: str
    qty: int


class StockChecked(Event, key="order_id"):
    """inventory -> inventory: one line's answer, back under the order's key."""

    order_id: str
    sku: str
    qty: int
    reserved: bool  # False: not enough on hand


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
    number: int  # the shop's order number: 1, 2, 3...
    customer_id: str
    status: str  # placed, reserved, paid, shipped, cancelled
    lines: list[Line]
    total_cents: int
    tracking: str = ""
    reason: str = ""


class GetOrder(Query, key="order_id", returns=OrderView | None):
    order_id: str


class OrderBook(msgspec.Struct, frozen=True):
    """orders' state under the book's key: how many orders it has numbered."""

    numbered: int = 0


class GetOrderBook(Query, key="book", returns=OrderBook):
    """Back office: how many orders were created (each got the next number)."""

    book: str = "orders"


class GetStock(Query, key="sku", returns=int):
    """Back office: units of one SKU on hand (ask each SKU of the catalog for the whole stock)."""

    sku: str


class Charge(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    amount_cents: int


class GetCharges(Query, key="order_id", returns=list[Charge]):
    """Back office: the charges payments made for one order."""

    order_id: str


class Notice(msgspec.Struct, frozen=True):
    customer_id: str
    order_id: str
    text: str


class GetNotices(Query, key="order_id", returns=list[Notice]):
    """Back office: the notices sent about one order."""

    order_id: str
