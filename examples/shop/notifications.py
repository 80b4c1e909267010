"""notifications: tells the customer how their order ended (shipped, or cancelled and why)."""

from choreo import Service

from .messages import GetNotices, Notice, OrderCancelled, OrderShipped

notifications = Service("notifications")

_sent: list[Notice] = []


@notifications.on(OrderShipped)
def shipped(event: OrderShipped) -> None:
    _sent.append(Notice(event.customer_id, event.order_id, f"your order {event.order_id} is on its way: {event.tracking}"))


@notifications.on(OrderCancelled)
def cancelled(event: OrderCancelled) -> None:
    _sent.append(Notice(event.customer_id, event.order_id, f"your order {event.order_id} was cancelled ({event.reason})"))


@notifications.query(GetNotices)
def get_notices(query: GetNotices) -> list[Notice]:
    return list(_sent)
