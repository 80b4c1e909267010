"""api: the REST backend behind the API gateway. POST /orders arrives here as PlaceOrder.

Stateless (run as many as you like): it checks the request, names the order after the intent
and hands it to orders as a CreateOrder. Every HTTP attempt runs this handler again (each has a
new request id); it is CreateOrder's idempotency key that makes the retries one order.
"""

from choreo import Service

from .catalog import PRICES, order_id
from .messages import CreateOrder, OrderAccepted, PlaceOrder

api = Service("api")


@api.command(PlaceOrder, sends=[CreateOrder])
def place_order(cmd: PlaceOrder, ctx) -> OrderAccepted:
    unknown = [line.sku for line in cmd.lines if line.sku not in PRICES]
    if unknown or not cmd.lines or any(line.qty < 1 for line in cmd.lines):
        raise ValueError(f"bad cart {cmd.cart_id}: unknown SKUs {unknown} or an empty/negative line")
    oid = order_id(cmd.customer_id, cmd.cart_id)
    ctx.send(CreateOrder(order_id=oid, customer_id=cmd.customer_id, cart_id=cmd.cart_id, lines=cmd.lines))
    return OrderAccepted(order_id=oid, request_id=cmd.request_id)
