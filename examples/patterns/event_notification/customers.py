"""customers: the owner of customer data. It tells the world an address changed, nothing more."""

from choreo import Service

from .messages import AddressChanged, ChangeAddress, Customer, GetCustomer

customers = Service("customers")

_customers: dict[str, Customer] = {}


@customers.command(ChangeAddress, emits=[AddressChanged])
def change_address(cmd: ChangeAddress, ctx) -> None:
    before = _customers.get(cmd.customer_id)
    _customers[cmd.customer_id] = Customer(cmd.customer_id, cmd.address, (before.changes if before else 0) + 1)
    ctx.emit(AddressChanged(customer_id=cmd.customer_id, change_id=cmd.change_id))


@customers.query(GetCustomer)
def get_customer(query: GetCustomer) -> Customer | None:
    return _customers.get(query.customer_id)
