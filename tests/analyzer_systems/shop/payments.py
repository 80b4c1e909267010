"""Payments: charges orders, refunds them on request."""

from choreo import Service

from .messages import OrderPlaced, PaymentCaptured, PaymentFailed, PaymentRefunded, RefundPayment

payments = Service("payments")


@payments.on(OrderPlaced, emits=[PaymentCaptured, PaymentFailed])
def charge(event, ctx):
    ctx.emit(PaymentCaptured(order_id=event.order_id))


@payments.command(RefundPayment, emits=[PaymentRefunded])
def refund(cmd, ctx):
    ctx.emit(PaymentRefunded(order_id=cmd.order_id))
