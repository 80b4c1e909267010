"""payments: charges each order once its stock is reserved; declines above the card's limit."""

from choreo import Service

from .catalog import CARD_LIMITS
from .messages import Charge, GetCharges, PaymentCaptured, PaymentDeclined, StockReserved

payments = Service("payments")

_charges: list[Charge] = []


@payments.on(StockReserved, emits=[PaymentCaptured, PaymentDeclined])
def charge(event: StockReserved, ctx) -> None:
    limit = CARD_LIMITS.get(event.customer_id, 0)
    if event.total_cents > limit:
        ctx.emit(PaymentDeclined(order_id=event.order_id, customer_id=event.customer_id,
                                 reason=f"{event.total_cents} cents is above the card's limit of {limit}"))
        return
    _charges.append(Charge(event.order_id, event.customer_id, event.total_cents))
    ctx.emit(PaymentCaptured(order_id=event.order_id, customer_id=event.customer_id, amount_cents=event.total_cents))


@payments.query(GetCharges)
def get_charges(query: GetCharges) -> list[Charge]:
    return list(_charges)
