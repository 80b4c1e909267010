"""notifications: tells the customer how their order ended (shipped, or cancelled and why).

It keeps what it sent about each order as that order's state (``ctx.state``), so GetNotices
answers from the order's key, and a notice sent twice would show as two.
"""

import msgspec

from choreo import Service

from .messages import GetNotices, Notice, OrderCancelled, OrderShipped


class Notices(msgspec.Struct, frozen=True):
    """Per order: every notice sent about it."""

    sent: list[Notice] = []


notifications = Service("notifications", state=[Notices], replicas=1)


def _send(ctx, notice: Notice) -> None:
    notices = ctx.state.get(Notices) or Notices()
    ctx.state.put(Notices([*notices.sent, notice]))


@notifications.on(OrderShipped)
def shipped(event: OrderShipped, ctx) -> None:
    _send(ctx, Notice(event.customer_id, event.order_id, f"your order {event.order_id} is on its way: {event.tracking}"))


@notifications.on(OrderCancelled)
def cancelled(event: OrderCancelled, ctx) -> None:
    _send(ctx, Notice(event.customer_id, event.order_id, f"your order {event.order_id} was cancelled ({event.reason})"))


@notifications.query(GetNotices)
def get_notices(query: GetNotices, ctx) -> list[Notice]:
    notices = ctx.state.get(Notices)
    return [] if notices is None else list(notices.sent)
