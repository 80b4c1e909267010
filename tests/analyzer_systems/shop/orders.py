"""Orders: owns the order's life."""

from choreo import Service

from .messages import GetOrder, OrderAccepted, OrderCancelled, OrderPlaced, PaymentFailed, PaymentRefunded, PlaceOrder

orders = Service("orders")


@orders.command(PlaceOrder, emits=[OrderPlaced])
def place(cmd, ctx):
    ctx.emit(OrderPlaced(order_id=cmd.cart_id, total_cents=cmd.total_cents, ship_to=cmd.ship_to))
    return OrderAccepted(order_id=cmd.cart_id)


@orders.on(PaymentFailed, emits=[OrderCancelled])
def payment_failed(event, ctx):
    ctx.emit(OrderCancelled(order_id=event.order_id))


@orders.on(PaymentRefunded, emits=[OrderCancelled])
def refunded(event, ctx):
    ctx.emit(OrderCancelled(order_id=event.order_id))


@orders.query(GetOrder)
def get_order(query):
    return None
