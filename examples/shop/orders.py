"""orders: owns each order's life, and keeps the read model that GetOrder answers from.

Its state is per key (``ctx.state``, moving with its partition, with a standby copy): an
:class:`OrderView` under each order's key, built from the flow's events; since events from
different services may arrive in either order, a row's status only moves forward. Orders are
numbered 1, 2, 3... by the order book, one more key: the order sends it NumberOrder (all keyed
by the book), and the number comes back as OrderNumbered under the order's key.
"""

import msgspec

from choreo import Service

from .catalog import total_cents
from .messages import (
    CreateOrder,
    GetOrder,
    GetOrderBook,
    NumberOrder,
    OrderBook,
    OrderCancelled,
    OrderNumbered,
    OrderPlaced,
    OrderShipped,
    OrderView,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    StockReserved,
)

orders = Service("orders", state=[OrderView, OrderBook], replicas=1)

_RANK = {"placed": 0, "reserved": 1, "paid": 2, "shipped": 3, "cancelled": 3}


def _advance(ctx, status: str, **changes) -> None:
    view = ctx.state.get(OrderView)
    if view is None or _RANK[status] < _RANK[view.status]:
        return
    ctx.state.put(msgspec.structs.replace(view, status=status, **changes))


@orders.command(CreateOrder, emits=[OrderPlaced], sends=[NumberOrder])
def create_order(cmd: CreateOrder, ctx) -> None:
    # Runs once per checkout: the retries of this cart carry the same idempotency key, so the
    # node acknowledges them without calling this handler.
    total = total_cents(cmd.lines)
    ctx.state.put(OrderView(cmd.order_id, 0, cmd.customer_id, "placed", cmd.lines, total))
    ctx.send(NumberOrder(order_id=cmd.order_id))
    ctx.emit(OrderPlaced(order_id=cmd.order_id, customer_id=cmd.customer_id, lines=cmd.lines, total_cents=total))


@orders.command(NumberOrder, emits=[OrderNumbered])
def number_order(cmd: NumberOrder, ctx) -> None:
    book = ctx.state.get(OrderBook) or OrderBook()
    ctx.state.put(OrderBook(book.numbered + 1))
    ctx.emit(OrderNumbered(order_id=cmd.order_id, number=book.numbered + 1))


@orders.on(OrderNumbered)
def order_numbered(event: OrderNumbered, ctx) -> None:
    view = ctx.state.get(OrderView)
    if view is not None:
        ctx.state.put(msgspec.structs.replace(view, number=event.number))


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
    return ctx.state.get(OrderView)


@orders.query(GetOrderBook)
def get_order_book(query: GetOrderBook, ctx) -> OrderBook:
    return ctx.state.get(OrderBook) or OrderBook()
