"""Event notification: the event says *that* something changed, and who to ask for the rest."""

from __future__ import annotations

import msgspec

from choreo import Command, Event, Query


class ChangeAddress(Command, key="customer_id", idempotency=["customer_id", "change_id"]):
    customer_id: str
    change_id: str
    address: str


class AddressChanged(Event, key="customer_id"):
    """A thin event: no address in it. Whoever needs the address asks customers for it."""

    customer_id: str
    change_id: str


class Customer(msgspec.Struct, frozen=True):
    customer_id: str
    address: str
    changes: int


class GetCustomer(Query, key="customer_id", returns=Customer | None):
    customer_id: str


class GetLabel(Query, key="customer_id", returns=str | None):
    """The address shipping prints on this customer's parcels."""

    customer_id: str


class GetTrail(Query, returns=list[str]):
    """Every change audit was told about, as 'customer_id/change_id'."""
