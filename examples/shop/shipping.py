"""shipping: ships every paid order. The tracking number follows from the order id, so a
redelivered PaymentCaptured (were it ever handled twice) would name the same parcel."""

import hashlib

from choreo import Service

from .messages import OrderShipped, PaymentCaptured

shipping = Service("shipping")


@shipping.on(PaymentCaptured, emits=[OrderShipped])
def ship(event: PaymentCaptured, ctx) -> None:
    tracking = "TRK" + hashlib.sha256(event.order_id.encode()).hexdigest()[:10].upper()
    ctx.emit(OrderShipped(order_id=event.order_id, customer_id=event.customer_id, tracking=tracking))
