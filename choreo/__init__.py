"""choreo: a brokerless choreography runtime for event-driven services.

Declare message types and services; run each service as its own process; choreo delivers
events, commands and queries over ZeroMQ with acknowledgements, deduplication, per-key order
and backpressure, and draws the flow from the declarations::

    from choreo import Command, Event, Service

    class PlaceOrder(Command, idempotency=["cart_id"]):
        cart_id: str

    class OrderPlaced(Event, key="order_id"):
        order_id: str

    orders = Service("orders")

    @orders.command(PlaceOrder, emits=[OrderPlaced])
    def place(cmd, ctx):
        ctx.emit(OrderPlaced(order_id=cmd.cart_id))
"""

from .errors import (
    Backpressure,
    ChoreoError,
    ChoreoUsageError,
    DataDirError,
    DeliveryTimeout,
    HandlerFailed,
    MessageTooLarge,
    NoOwner,
    NotAllowed,
    NodeStopped,
    NotJoined,
    ProtocolError,
    StoreError,
    StoreFull,
    UndeclaredMessage,
    Undeliverable,
    ValidationError,
)
from .config import NodeConfig
from .messages import Command, Event, Message, Query, message_options
from .service import Context, Handler, RetryPolicy, Service, State
from .trust import Permissions, Policy, Security

__version__ = "0.1.0"

# The runtime (ZeroMQ) loads on first use, so that the declarations and the analyzer can be
# imported without it.
_LAZY = {
    "Node": ("choreo.node", "Node"),
    "NodeProcess": ("choreo.launch", "NodeProcess"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'choreo' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, so that help(choreo) and dir(choreo) list Node, NodeConfig, NodeProcess
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Backpressure",
    "ChoreoError",
    "ChoreoUsageError",
    "Command",
    "Context",
    "DataDirError",
    "DeliveryTimeout",
    "Event",
    "Handler",
    "HandlerFailed",
    "Message",
    "MessageTooLarge",
    "NoOwner",
    "Node",
    "NodeConfig",
    "NodeProcess",
    "NotAllowed",
    "NodeStopped",
    "NotJoined",
    "Permissions",
    "Policy",
    "ProtocolError",
    "Query",
    "RetryPolicy",
    "Security",
    "Service",
    "State",
    "StoreError",
    "StoreFull",
    "UndeclaredMessage",
    "Undeliverable",
    "ValidationError",
    "message_options",
]
