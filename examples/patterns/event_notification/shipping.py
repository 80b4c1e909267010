"""shipping: needs the new address, which the event does not carry, so it calls back customers.

The call-back reads the address as it is *now*, not as it was when the event was emitted: fine
here (the latest address is the right one for a label), and the usual catch of the pattern.
"""

from choreo import Service

from .messages import AddressChanged, GetCustomer, GetLabel

shipping = Service("shipping")

_labels: dict[str, str] = {}


@shipping.on(AddressChanged, sends=[GetCustomer])
async def refresh_label(event: AddressChanged, ctx) -> None:
    customer = await ctx.ask(GetCustomer(event.customer_id))
    if customer is not None:
        _labels[event.customer_id] = customer.address


@shipping.query(GetLabel)
def get_label(query: GetLabel) -> str | None:
    return _labels.get(query.customer_id)
