"""inventory: reserves stock for each order, and puts it back when the payment is declined.

One instance holds all the stock (a second one would hold a second, separate stock); events
about one order arrive in order, and the handlers run one at a time, so a reservation is never
double-counted. Reservations are remembered per order, which makes the release exact.
"""

from choreo import Service

from .catalog import INITIAL_STOCK
from .messages import GetStock, OrderPlaced, OutOfStock, PaymentDeclined, StockReserved

inventory = Service("inventory")

_stock: dict[str, int] = dict(INITIAL_STOCK)
_reserved: dict[str, list[tuple[str, int]]] = {}


@inventory.on(OrderPlaced, emits=[StockReserved, OutOfStock])
def reserve(event: OrderPlaced, ctx) -> None:
    short = sorted({line.sku for line in event.lines if _stock[line.sku] < line.qty})
    if short:
        ctx.emit(OutOfStock(order_id=event.order_id, customer_id=event.customer_id, skus=short))
        return
    for line in event.lines:
        _stock[line.sku] -= line.qty
    _reserved[event.order_id] = [(line.sku, line.qty) for line in event.lines]
    ctx.emit(StockReserved(order_id=event.order_id, customer_id=event.customer_id, total_cents=event.total_cents))


@inventory.on(PaymentDeclined)
def release(event: PaymentDeclined) -> None:
    for sku, qty in _reserved.pop(event.order_id, []):
        _stock[sku] += qty


@inventory.query(GetStock)
def get_stock(query: GetStock) -> dict[str, int]:
    return dict(_stock)
