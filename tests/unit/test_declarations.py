"""The declaration API: message types, services, and their plain-data specs."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

import choreo
from choreo import ChoreoUsageError, Command, Event, Query, Service, ValidationError, message_options
from choreo.messages import decode, encode, idempotency_id
from choreo.spec import SystemSpec, system_spec


class OrderPlaced(Event, key="order_id", dedup_ttl=60, dedup_max=500):
    order_id: str
    total_cents: int
    note: str = ""


class Receipt(msgspec.Struct):
    order_id: str


class PlaceOrder(Command, idempotency=["customer_id", "cart_id"], returns=Receipt):
    customer_id: str
    cart_id: str
    request_id: str


class GetOrder(Query, key="order_id"):
    order_id: str


def test_public_api_is_pinned() -> None:
    assert set(choreo.__all__) == {
        "Backpressure", "ChoreoError", "ChoreoUsageError", "Command", "Context", "DataDirError", "DeliveryTimeout",
        "Event", "StoreError", "StoreFull",
        "Handler", "HandlerFailed", "Message", "MessageTooLarge", "NoOwner", "Node", "NodeConfig", "NodeProcess",
        "NodeStopped", "NotAllowed", "NotJoined", "Permissions", "Policy", "ProtocolError", "Query", "RetryPolicy", "Security", "Service", "State",
        "UndeclaredMessage", "Undeliverable", "ValidationError", "message_options",
    }
    for name in choreo.__all__:
        assert getattr(choreo, name) is not None


def test_help_lists_every_public_class_even_those_loaded_lazily() -> None:
    import subprocess
    import sys

    code = "import choreo, pydoc; print(pydoc.render_doc(choreo, renderer=pydoc.plaintext))"
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    classes = {line.strip().split("(")[0].removeprefix("class ") for line in text.splitlines() if line.strip().startswith("class ")}
    public = {n for n in choreo.__all__ if isinstance(getattr(choreo, n), type)}
    assert public <= classes, f"help(choreo) does not list {sorted(public - classes)}"
    assert {"Node", "NodeConfig", "NodeProcess"} <= set(dir(choreo))


def test_options_are_read_from_class_keywords() -> None:
    o = message_options(OrderPlaced)
    assert (o.name, o.kind, o.key, o.dedup_ttl, o.dedup_max) == ("OrderPlaced", "event", "order_id", 60, 500)
    assert message_options(PlaceOrder).idempotency == ("customer_id", "cart_id")
    assert message_options(PlaceOrder).returns is Receipt
    assert message_options(GetOrder).kind == "query"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"key": "nope"}, "key field 'nope' is not a field"),
        ({"idempotency": ["a", "zz"]}, "idempotency names fields the type lacks: ['zz']"),
        ({"idempotency": "everything"}, "idempotency must be a list of field names or 'body'"),
        ({"idempotency": []}, "idempotency names no field"),
        ({"dedup_ttl": 0}, "dedup_ttl must be > 0"),
        ({"dedup_max": 0}, "dedup_max must be >= 1"),
        ({"returns": int}, "events have no result"),
    ],
)
def test_bad_options_are_refused_with_the_reason(kwargs: dict, error: str) -> None:
    with pytest.raises(ChoreoUsageError, match=error.replace("[", r"\[").replace("]", r"\]")):
        type("Bad", (Event,), {"__annotations__": {"a": str}}, **kwargs)


def test_decode_validates_and_names_the_field() -> None:
    body = encode(OrderPlaced(order_id="o-1", total_cents=5))
    assert decode(OrderPlaced, body) == OrderPlaced("o-1", 5)
    with pytest.raises(ValidationError, match=r"OrderPlaced.total_cents = 'five': Expected `int`, got `str`"):
        decode(OrderPlaced, msgspec.msgpack.encode({"order_id": "o", "total_cents": "five"}))
    with pytest.raises(ValidationError, match="missing required field `total_cents`"):
        decode(OrderPlaced, msgspec.msgpack.encode({"order_id": "o"}))
    with pytest.raises(ValidationError, match="not valid MessagePack"):
        decode(OrderPlaced, b"\xc1")


def test_idempotency_key_ignores_other_fields_and_is_stable() -> None:
    a = idempotency_id(PlaceOrder(customer_id="c", cart_id="k", request_id="r1"))
    b = idempotency_id(PlaceOrder(customer_id="c", cart_id="k", request_id="r2"))
    c = idempotency_id(PlaceOrder(customer_id="c", cart_id="other", request_id="r1"))
    assert a == b and a != c and len(a) == 16
    # the same on every host and Python run: SHA-256 of the name and the fields' MessagePack
    assert a == hashlib.sha256(b"PlaceOrder\x00" + bytes([0x92, 0xA1, 0x63, 0xA1, 0x6B])).digest()[:16]
    assert idempotency_id(OrderPlaced("o", 1)) is None


def test_body_idempotency_covers_every_field() -> None:
    class Transfer(Command, idempotency="body"):
        src: str
        amount: int

    assert idempotency_id(Transfer("a", 1)) == idempotency_id(Transfer("a", 1))
    assert idempotency_id(Transfer("a", 1)) != idempotency_id(Transfer("a", 2))


def test_service_decorators_check_kinds_and_duplicates() -> None:
    svc = Service("orders")
    with pytest.raises(ChoreoUsageError, match=r"PlaceOrder is a command, not a event: use @orders.command"):
        svc.on(PlaceOrder)
    with pytest.raises(ChoreoUsageError, match="emits lists PlaceOrder, a command; expected events"):
        svc.command(PlaceOrder, emits=[PlaceOrder])

    @svc.command(PlaceOrder, emits=[OrderPlaced])
    def place(cmd, ctx):
        return Receipt(cmd.cart_id)

    with pytest.raises(ChoreoUsageError, match="already handles PlaceOrder in .*place"):
        svc.command(PlaceOrder)(lambda c: None)
    h = svc.handlers["PlaceOrder"]
    assert (h.kind, h.takes_context, h.is_async, h.emits) == ("command", True, False, (OrderPlaced,))
    assert h.where.endswith(f":{place.__code__.co_firstlineno}")


def test_query_handler_that_declares_effects_cannot_run() -> None:
    svc = Service("reads")

    @svc.query(GetOrder, emits=[OrderPlaced])
    def get(q):
        return None

    with pytest.raises(ChoreoUsageError, match="declares emits/sends; queries have no side effects"):
        svc.validate()


def test_two_classes_with_one_wire_name_are_refused() -> None:
    class A(Event, name="Same"):
        x: int

    class B(Event, name="Same"):
        y: int

    svc = Service("s", emits=[A, B])
    with pytest.raises(ChoreoUsageError, match="two different classes share the wire name 'Same'"):
        svc.validate()


def test_spec_round_trips_through_json() -> None:
    svc = Service("orders", emits=[OrderPlaced])

    @svc.command(PlaceOrder, emits=[OrderPlaced])
    async def place(cmd):
        return Receipt(cmd.cart_id)

    @svc.query(GetOrder)
    def get(q):
        return None

    spec = system_spec([svc])
    assert SystemSpec.from_json(spec.to_json()) == spec
    (s,) = spec.services
    assert {h.message for h in s.handlers} == {"PlaceOrder", "GetOrder"}
    fields = {f.name: f for f in spec.messages["OrderPlaced"].fields}
    assert fields["total_cents"].schema == {"type": "integer"} and fields["note"].required is False
    assert spec.messages["PlaceOrder"].returns == {"$ref": "#/$defs/Receipt"}
    assert "Receipt" in spec.messages["PlaceOrder"].defs


def test_messages_construct_like_plain_msgspec_structs() -> None:
    from choreo.messages import FAST_CONSTRUCTION

    class Point(Event, key="name"):
        name: str
        x: int = 0
        tags: list[str] = []

    assert Point("a", 1) == Point(name="a", x=1) == Point(x=1, name="a")
    assert Point("b").tags == [] and Point("b").tags is not Point("c").tags
    with pytest.raises(TypeError, match="Unexpected keyword argument 'y'"):
        Point(name="a", y=2)
    with pytest.raises(TypeError, match="Missing required argument 'name'"):
        Point()
    import platform
    import sys

    if platform.python_implementation() == "CPython" and sys.version_info < (3, 12):
        assert FAST_CONSTRUCTION, "message classes lost msgspec's fast constructor (see messages._enable_vectorcall)"
