"""payments: charges each order once its stock is reserved; declines above the card's limit.

Its state is a :class:`Payment` per order (``ctx.state``, keyed like the order's events, moving
with its partition, with a standby copy): every charge made for the order, so a charge made
twice would show as two, and GetCharges answers from the order's key.
"""

import msgspec

from choreo import Service

from .catalog import CARD_LIMITS
from .messages import Charge, GetCharges, PaymentCaptured, PaymentDeclined, StockReserved


class Payment(msgspec.Struct, frozen=True):
    """Per order: the charges made for it (one, for a paid order), or why it was declined."""

    charges: list[Charge] = []
    declined: str = ""


payments = Service("payments", state=[Payment], replicas=1)


@payments.on(StockReserved, emits=[PaymentCaptured, PaymentDeclined])
def charge(event: StockReserved, ctx) -> None:
    payment = ctx.state.get(Payment) or Payment()
    limit = CARD_LIMITS.get(event.customer_id, 0)
    if event.total_cents > limit:
        reason = f"{event.total_cents} cents is above the card's limit of {limit}"
        ctx.state.put(msgspec.structs.replace(payment, declined=reason))
        ctx.emit(PaymentDeclined(order_id=event.order_id, customer_id=event.customer_id, reason=reason))
        return
    charged = Charge(event.order_id, event.customer_id, event.total_cents)
    ctx.state.put(msgspec.structs.replace(payment, charges=[*payment.charges, charged]))
    ctx.emit(PaymentCaptured(order_id=event.order_id, customer_id=event.customer_id, amount_cents=event.total_cents))


@payments.query(GetCharges)
def get_charges(query: GetCharges, ctx) -> list[Charge]:
    payment = ctx.state.get(Payment)
    return [] if payment is None else list(payment.charges)
