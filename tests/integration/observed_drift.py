"""The services of :mod:`observed` as an older revision of their code declares them: payments
does not declare that it emits PaymentTaken (``choreo graph TARGET --peer --observed`` test)."""

from __future__ import annotations

from choreo import Service

from .observed import OrderPlaced, PaymentTaken, PlaceOrder, Shipped

orders = Service("orders")
payments = Service("payments")
shipping = Service("shipping")


@orders.command(PlaceOrder, emits=[OrderPlaced])
def place_order(cmd: PlaceOrder, ctx) -> str:  # type: ignore[no-untyped-def]
    return cmd.order_id


@payments.on(OrderPlaced)
def take_payment(ev: OrderPlaced) -> None:
    pass


@shipping.on(PaymentTaken, emits=[Shipped])
def ship(ev: PaymentTaken) -> None:
    pass
