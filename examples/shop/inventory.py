"""inventory: reserves stock for each order, and puts it back when the order is cancelled.

Its state is per key (``ctx.state``): a :class:`Stock` per SKU, a :class:`Reservation` per
order. OrderPlaced comes keyed by the order, and the stock lives under each SKU's key, so
inventory sends itself one ReserveStock per SKU (keyed by the SKU: handled where its stock is);
each answers with a StockChecked keyed by the order, and the order's reservation collects them.
All reserved: StockReserved. Some short: the reserved units go back (ReleaseStock), OutOfStock.
Both kinds of state move with their partition, and have a standby copy (``replicas=1``): the
SKUs' answers come back to the order's key, so its writes there reach the standby ahead of
their acknowledgements (see the README's Handler state).
"""

import msgspec

from choreo import Service

from .catalog import INITIAL_STOCK
from .messages import (
    GetStock,
    OrderPlaced,
    OutOfStock,
    PaymentDeclined,
    ReleaseStock,
    ReserveStock,
    StockChecked,
    StockReserved,
)


class Stock(msgspec.Struct, frozen=True):
    """Per SKU: units on hand (a SKU never touched has its opening stock from the catalog)."""

    on_hand: int
    refused: int = 0  # reservations turned away for want of stock


class Reservation(msgspec.Struct, frozen=True):
    """Per order: the units it needs, and what each SKU answered."""

    customer_id: str
    total_cents: int
    needed: dict[str, int]  # SKU -> units
    reserved: list[str] = []  # SKUs whose units are set aside for this order
    short: list[str] = []  # SKUs there was not enough of
    released: bool = False  # the reserved units went back (the order was cancelled)


inventory = Service("inventory", state=[Stock, Reservation], replicas=1)


def _stock(ctx, sku: str) -> Stock:
    return ctx.state.get(Stock) or Stock(INITIAL_STOCK[sku])


@inventory.on(OrderPlaced, sends=[ReserveStock])
def reserve(event: OrderPlaced, ctx) -> None:
    needed: dict[str, int] = {}
    for line in event.lines:
        needed[line.sku] = needed.get(line.sku, 0) + line.qty
    ctx.state.put(Reservation(event.customer_id, event.total_cents, needed))
    for sku, qty in sorted(needed.items()):
        ctx.send(ReserveStock(sku=sku, order_id=event.order_id, qty=qty))


@inventory.command(ReserveStock, emits=[StockChecked])
def reserve_line(cmd: ReserveStock, ctx) -> None:
    stock = _stock(ctx, cmd.sku)
    ok = stock.on_hand >= cmd.qty
    if ok:
        ctx.state.put(msgspec.structs.replace(stock, on_hand=stock.on_hand - cmd.qty))
    else:  # written too: the standby then has this message's id, and a redelivery is a duplicate
        ctx.state.put(msgspec.structs.replace(stock, refused=stock.refused + 1))
    ctx.emit(StockChecked(order_id=cmd.order_id, sku=cmd.sku, qty=cmd.qty, reserved=ok))


@inventory.on(StockChecked, emits=[StockReserved, OutOfStock], sends=[ReleaseStock])
def checked(event: StockChecked, ctx) -> None:
    r = ctx.state.get(Reservation)
    if r is None or event.sku in r.reserved or event.sku in r.short:
        return
    if event.reserved:
        r = msgspec.structs.replace(r, reserved=[*r.reserved, event.sku])
    else:
        r = msgspec.structs.replace(r, short=[*r.short, event.sku])
    if len(r.reserved) + len(r.short) == len(r.needed):  # every SKU has answered
        if r.short:
            _release(ctx, event.order_id, r)
            r = msgspec.structs.replace(r, released=True)
            ctx.emit(OutOfStock(order_id=event.order_id, customer_id=r.customer_id, skus=sorted(r.short)))
        else:
            ctx.emit(StockReserved(order_id=event.order_id, customer_id=r.customer_id, total_cents=r.total_cents))
    ctx.state.put(r)


@inventory.on(PaymentDeclined, sends=[ReleaseStock])
def release(event: PaymentDeclined, ctx) -> None:
    r = ctx.state.get(Reservation)
    if r is None or r.released:
        return
    _release(ctx, event.order_id, r)
    ctx.state.put(msgspec.structs.replace(r, released=True))


def _release(ctx, order_id: str, r: Reservation) -> None:
    for sku in sorted(r.reserved):
        ctx.send(ReleaseStock(sku=sku, order_id=order_id, qty=r.needed[sku]))


@inventory.command(ReleaseStock)
def release_line(cmd: ReleaseStock, ctx) -> None:
    stock = _stock(ctx, cmd.sku)
    ctx.state.put(msgspec.structs.replace(stock, on_hand=stock.on_hand + cmd.qty))


@inventory.query(GetStock)
def get_stock(query: GetStock, ctx) -> int:
    return _stock(ctx, query.sku).on_hand
