"""The shop's message types."""

from __future__ import annotations

import msgspec

from choreo import Command, Event, Query


class Address(msgspec.Struct, frozen=True):
    street: str
    city: str
    country: str = "NL"


class OrderAccepted(msgspec.Struct, frozen=True):
    order_id: str


class OrderView(msgspec.Struct, frozen=True):
    order_id: str
    status: str
    ship_to: Address


class PlaceOrder(Command, idempotency=["customer_id", "cart_id"], returns=OrderAccepted):
    """A customer checks out a cart."""

    customer_id: str
    cart_id: str
    total_cents: int
    ship_to: Address


class GetOrder(Query, key="order_id", returns=OrderView):
    order_id: str


class RefundPayment(Command, key="order_id", idempotency=["order_id"]):
    order_id: str
    reason: str


class OrderPlaced(Event, key="order_id"):
    order_id: str
    total_cents: int
    ship_to: Address


class PaymentCaptured(Event, key="order_id"):
    order_id: str


class PaymentFailed(Event, key="order_id"):
    order_id: str
    reason: str


class PaymentRefunded(Event, key="order_id"):
    order_id: str


class OrderShipped(Event, key="order_id"):
    order_id: str
    tracking: str


class OrderCancelled(Event, key="order_id"):
    order_id: str
