"""quotes: the status store the caller polls. It hears of each request and of each reply.

The two events come from different senders and may arrive in either order: a reply that comes
first is kept, and the request then does not turn it back into "pending".
"""

from choreo import Service

from .messages import GetQuote, QuoteReady, QuoteRequested, QuoteStatus

quotes = Service("quotes")

_status: dict[str, QuoteStatus] = {}


@quotes.on(QuoteRequested)
def requested(event: QuoteRequested) -> None:
    _status.setdefault(event.request_id, QuoteStatus(event.request_id, "pending"))


@quotes.on(QuoteReady)
def ready(event: QuoteReady) -> None:
    _status[event.request_id] = QuoteStatus(event.request_id, "ready", event.price_cents, event.priced_by)


@quotes.query(GetQuote)
def get_quote(query: GetQuote) -> QuoteStatus | None:
    return _status.get(query.request_id)
