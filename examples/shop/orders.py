"""orders: owns each order's life, and keeps the read model that GetOrder answers from.

Orders are numbered as they are created (1, 2, 3...), the way a shop's customers see them: a
checkout handled twice would show up as a second number. Every message about one order is keyed
by its id, so it reaches orders in order. The read model is a projection of the flow's events;
since events from different services may arrive in either order (payments' PaymentCaptured and
shipping's OrderShipped travel on different channels), a row's status only moves forward.
"""

from choreo import Service

from .catalog import total_cents
from .messages import (
    CreateOrder,
    GetOrder,
    GetOrders,
    OrderCancelled,
    OrderPlaced,
    OrderShipped,
    OrderView,
    OutOfStock,
    PaymentCaptured,
    PaymentDeclined,
    StockReserved,
)

orders = Service("orders")

_RANK = {"placed": 0, "reserved": 1, "paid": 2, "shipped": 3, "cancelled": 3}
_views: dict[str, OrderView] = {}
_created: list[str] = []  # order ids by order number


def _advance(order_id: str, status: str, **changes) -> None:
    view = _views.get(order_id)
    if view is None or _RANK[status] < _RANK[view.status]:
        return
    _views[order_id] = OrderView(**{**_asdict(view), "status": status, **changes})


def _asdict(view: OrderView) -> dict:
    return {f: getattr(view, f) for f in view.__struct_fields__}


@orders.command(CreateOrder, emits=[OrderPlaced])
def create_order(cmd: CreateOrder, ctx) -> None:
    # Runs once per checkout: the retries of this cart carry the same idempotency key, so the
    # node acknowledges them without calling this handler.
    total = total_cents(cmd.lines)
    _created.append(cmd.order_id)
    _views[cmd.order_id] = OrderView(cmd.order_id, len(_created), cmd.customer_id, "placed", cmd.lines, total)
    ctx.emit(OrderPlaced(order_id=cmd.order_id, customer_id=cmd.customer_id, lines=cmd.lines, total_cents=total))


@orders.on(StockReserved)
def stock_reserved(event: StockReserved) -> None:
    _advance(event.order_id, "reserved")


@orders.on(OutOfStock, emits=[OrderCancelled])
def out_of_stock(event: OutOfStock, ctx) -> None:
    reason = "out of stock: " + ", ".join(event.skus)
    _advance(event.order_id, "cancelled", reason=reason)
    ctx.emit(OrderCancelled(order_id=event.order_id, customer_id=event.customer_id, reason=reason))


@orders.on(PaymentCaptured)
def payment_captured(event: PaymentCaptured) -> None:
    _advance(event.order_id, "paid")


@orders.on(PaymentDeclined, emits=[OrderCancelled])
def payment_declined(event: PaymentDeclined, ctx) -> None:
    reason = "payment declined: " + event.reason
    _advance(event.order_id, "cancelled", reason=reason)
    ctx.emit(OrderCancelled(order_id=event.order_id, customer_id=event.customer_id, reason=reason))


@orders.on(OrderShipped)
def order_shipped(event: OrderShipped) -> None:
    _advance(event.order_id, "shipped", tracking=event.tracking)


@orders.query(GetOrder)
def get_order(query: GetOrder) -> OrderView | None:
    return _views.get(query.order_id)


@orders.query(GetOrders)
def get_orders(query: GetOrders) -> list[OrderView]:
    return [_views[oid] for oid in _created]
