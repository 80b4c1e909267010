"""billing: keeps its own copy of what it needs of each customer, fed by CustomerUpdated.

It never asks customers anything, so it keeps issuing invoices when customers is down. The copy
is eventually consistent; a version number keeps an older update from overwriting a newer one.
"""

from choreo import Service

from .messages import CustomerUpdated, Invoice, IssueInvoice

billing = Service("billing")

_copy: dict[str, CustomerUpdated] = {}


@billing.on(CustomerUpdated)
def remember(event: CustomerUpdated) -> None:
    known = _copy.get(event.customer_id)
    if known is None or event.version > known.version:
        _copy[event.customer_id] = event


@billing.command(IssueInvoice, retries=0)
def issue(cmd: IssueInvoice, ctx) -> Invoice:
    customer = _copy.get(cmd.customer_id)
    if customer is None:
        raise LookupError(f"billing has never heard of customer {cmd.customer_id}")
    return Invoice(cmd.invoice_id, cmd.customer_id, f"{customer.name}, {customer.address}", cmd.amount_cents,
                   ctx.instance)
