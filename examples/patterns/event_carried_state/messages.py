"""Event-carried state transfer: the event carries the whole new state of the customer."""

from __future__ import annotations

import msgspec

from choreo import Command, Event


class UpdateCustomer(Command, key="customer_id", idempotency=["customer_id", "version"]):
    customer_id: str
    version: int  # the CRM's edit counter: one update per version
    name: str
    address: str


class CustomerUpdated(Event, key="customer_id"):
    """The customer as it is after the update: everything a consumer needs, no call-back."""

    customer_id: str
    version: int
    name: str
    address: str


class Invoice(msgspec.Struct, frozen=True):
    invoice_id: str
    customer_id: str
    bill_to: str  # name and address, from billing's own copy
    amount_cents: int
    issued_by: str


class IssueInvoice(Command, key="customer_id", idempotency=["invoice_id"], returns=Invoice):
    invoice_id: str
    customer_id: str
    amount_cents: int
