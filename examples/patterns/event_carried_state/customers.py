"""customers: owns customer data, and publishes every change with the full new state."""

from choreo import Service

from .messages import CustomerUpdated, UpdateCustomer

customers = Service("customers")

_versions: dict[str, int] = {}


@customers.command(UpdateCustomer, emits=[CustomerUpdated])
def update(cmd: UpdateCustomer, ctx) -> int:
    if cmd.version <= _versions.get(cmd.customer_id, 0):
        return _versions[cmd.customer_id]  # an old edit: nothing changes
    _versions[cmd.customer_id] = cmd.version
    ctx.emit(CustomerUpdated(cmd.customer_id, cmd.version, cmd.name, cmd.address))
    return cmd.version
