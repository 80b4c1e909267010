"""orders: owns each order's life, and keeps the read model that GetOrder answers from.

Its state is per key (``ctx.state``, moving with its partition, with a standby copy). CreateOrder
is keyed by the order book, whose :class:`OrderBook` gives each order the next number (1, 2,
3...: one sequence, so one key, and order creation goes one at a time through its owner). The
read model is an :class:`Order` under each order's key, built from the flow's events, OrderPlaced
included; since events from different services may arrive in any order, a status only moves
forward, and each event fills in what it knows.
"""

import msgspec

from choreo import Service

from .catalog import total_cents
from .messages import (
    CreateOrder,
    GetOrder,
    GetOrderBook,
    Line,
    OrderBook,
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    OrderView,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    StockReserved,
)


class Order(msgspec.Struct, frozen=True):
    """Per order: what the events told so far (number 0: OrderPlaced has not come yet)."""

    number: int = 0
    customer_id: str = ""
    lines: list[Line] = []
    total_cents: int = 0
    status: str = ""
    tracking: str = ""
    reason: str = ""


orders = Service("orders", state=[OrderBook, Order], replicas=1)

_RANK = {"": -1, "placed": 0, "reserved": 1, "paid": 2, "shipped": 3, "cancelled": 3}


def _advance(ctx, status: str, **changes) -> None:
    order = ctx.state.get(Order) or Order()
    if _RANK[status] > _RANK[order.status]:
        changes["status"] = status
    ctx.state.put(msgspec.structs.replace(order, **changes))


@orders.command(CreateOrder, emits=[OrderPlaced])
def create_order(cmd: CreateOrder, ctx) -> None:
    # Runs once per checkout: the retries of this cart carry the same idempotency key, so the
    # node acknowledges them without calling this handler.
    book = ctx.state.get(OrderBook) or OrderBook()
    ctx.state.put(OrderBook(book.numbered + 1))
    ctx.emit(OrderPlaced(order_id=cmd.order_id, number=book.numbered + 1, customer_id=cmd.customer_id,
                         lines=cmd.lines, total_cents=total_cents(cmd.lines)))


@orders.on(OrderPlaced)
def order_placed(event: OrderPlaced, ctx) -> None:
    _advance(ctx, "placed", number=event.number, customer_id=event.customer_id, lines=event.lines,
             total_cents=event.total_cents)


@orders.on(StockReserved)
def stock_reserved(event: StockReserved, ctx) -> None:
    _advance(ctx, "reserved")


@orders.on(OutOfStock, emits=[OrderCancelled])
def out_of_stock(event: OutOfStock, ctx) -> None:
    reason = "out of stock: " + ", ".join(event.skus)
    _advance(ctx, "cancelled", reason=reason)
    ctx.emit(OrderCancelled(order_id=event.order_id, customer_id=event.customer_id, reason=reason))


@orders.on(PaymentCaptured)
def payment_captured(event: PaymentCaptured, ctx) -> None:
    _advance(ctx, "paid")


@orders.on(PaymentDeclined, emits=[OrderCancelled])
def payment_declined(event: PaymentDeclined, ctx) -> None:
    reason = "payment declined: " + event.reason
    _advance(ctx, "cancelled", reason=reason)
    ctx.emit(OrderCancelled(order_id=event.order_id, customer_id=event.customer_id, reason=reason))


@orders.on(OrderShipped)
def order_shipped(event: OrderShipped, ctx) -> None:
    _advance(ctx, "shipped", tracking=event.tracking)


@orders.query(GetOrder)
def get_order(query: GetOrder, ctx) -> OrderView | None:
    order = ctx.state.get(Order)
    if order is None or not order.number:
        return None
    return OrderView(query.order_id, order.number, order.customer_id, order.status, order.lines, order.total_cents,
                     order.tracking, order.reason)


@orders.query(GetOrderBook)
def get_order_book(query: GetOrderBook, ctx) -> OrderBook:
    return ctx.state.get(OrderBook) or OrderBook()
