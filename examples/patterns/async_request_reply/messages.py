"""Asynchronous request-reply: ask for a quote now, collect the answer later by its request id."""

from __future__ import annotations

import msgspec

from choreo import Event, Query


class QuoteRequested(Event, key="request_id"):
    request_id: str  # the correlation id: the caller keeps it to find the reply
    product: str
    quantity: int


class QuoteReady(Event, key="request_id"):
    request_id: str
    price_cents: int
    priced_by: str


class QuoteStatus(msgspec.Struct, frozen=True):
    request_id: str
    status: str  # "pending" or "ready"
    price_cents: int | None = None
    priced_by: str = ""


class GetQuote(Query, key="request_id", returns=QuoteStatus | None):
    """The status endpoint the caller polls (GET /quotes/{request_id})."""

    request_id: str
