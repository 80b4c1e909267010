"""Shipping and notifications."""

from choreo import Service

from .messages import OrderCancelled, OrderShipped, PaymentCaptured

shipping = Service("shipping")
notifications = Service("notifications")


@shipping.on(PaymentCaptured, emits=[OrderShipped])
def ship(event, ctx):
    ctx.emit(OrderShipped(order_id=event.order_id, tracking="T-" + event.order_id))


@notifications.on(OrderShipped, broadcast=True)
def tell_shipped(event):
    pass


@notifications.on(OrderCancelled)
def tell_cancelled(event):
    pass
