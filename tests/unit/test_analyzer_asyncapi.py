"""The AsyncAPI document validates against the official AsyncAPI 3.0.0 JSON schema and says the right things.

The schema is vendored under tests/schemas/asyncapi/ (see the README there for where it came from).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choreo import Command, Event, Service
from choreo.analyzer import analyze, render
from choreo.analyzer._load import collect_services
from choreo.spec import system_spec

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "asyncapi" / "asyncapi-3.0.0.json"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["properties"]["asyncapi"]["const"] == "3.0.0"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def asyncapi(module: str) -> dict[str, Any]:
    analysis = analyze(system_spec(collect_services(module)), name=module)
    return json.loads(render(analysis, "asyncapi"))


def assert_valid(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10])


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (stuck at {part!r})"
        node = node[part]
    return node


def all_refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == "$ref"] + [r for v in value.values() for r in all_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in all_refs(v)]
    return []


@pytest.mark.parametrize("module", ["analyzer_systems.shop", "analyzer_systems.broken", "analyzer_systems.warned"])
def test_validates_against_the_official_schema(validator, module) -> None:
    assert_valid(validator, asyncapi(module))


def test_the_validator_does_reject_a_wrong_document(validator) -> None:
    # a negative control, so a schema that accepts anything cannot pass the test above
    doc = asyncapi("analyzer_systems.shop")
    doc["operations"]["orders.receive.PlaceOrder"]["action"] = "publish"  # AsyncAPI 2 wording
    assert list(validator.iter_errors(doc))
    doc = asyncapi("analyzer_systems.shop")
    doc["asyncapi"] = "2.6.0"
    assert list(validator.iter_errors(doc))


@pytest.mark.parametrize("module", ["analyzer_systems.shop", "analyzer_systems.broken"])
def test_every_reference_resolves_inside_the_document(module) -> None:
    doc = asyncapi(module)
    refs = all_refs(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)


def test_channels_operations_and_payloads(validator) -> None:
    doc = asyncapi("analyzer_systems.shop")
    names = {
        "PlaceOrder",
        "GetOrder",
        "RefundPayment",
        "OrderPlaced",
        "PaymentCaptured",
        "PaymentFailed",
        "PaymentRefunded",
        "OrderShipped",
        "OrderCancelled",
    }
    assert {k for k in doc["channels"] if not k.endswith(".reply")} == names
    assert doc["channels"]["OrderPlaced"]["address"] == "OrderPlaced"
    ops = doc["operations"]
    assert ops["orders.send.OrderPlaced"]["action"] == "send"
    assert ops["payments.receive.OrderPlaced"]["action"] == "receive"
    assert ops["storefront.send.PlaceOrder"]["x-choreo-producers"] == [
        {"handler": None, "module": "analyzer_systems.shop.storefront", "line": 7}
    ]
    assert ops["payments.receive.OrderPlaced"]["tags"] == [{"name": "payments"}]
    assert {k.split(".")[0] for k in ops} == {"orders", "payments", "shipping", "notifications", "storefront"}
    # one operation per (service, direction, type), even when two handlers of orders emit one type
    assert "orders.send.OrderCancelled" in ops
    # the payload: the fields with their JSON schemas, references moved to components/schemas
    channel_message = resolve(doc, ops["orders.receive.PlaceOrder"]["messages"][0]["$ref"])
    assert channel_message == {"$ref": "#/components/messages/PlaceOrder"}
    payload = resolve(doc, channel_message["$ref"])["payload"]
    assert list(payload["properties"]) == ["customer_id", "cart_id", "total_cents", "ship_to"]
    assert payload["required"] == ["customer_id", "cart_id", "total_cents", "ship_to"]
    assert payload["properties"]["ship_to"] == {"$ref": "#/components/schemas/Address"}
    assert resolve(doc, "#/components/schemas/Address")["properties"]["city"] == {"type": "string"}
    # a command's reply carries its declared result type
    reply = ops["orders.receive.PlaceOrder"]["reply"]
    reply_message = resolve(doc, reply["messages"][0]["$ref"])
    assert resolve(doc, reply_message["$ref"])["payload"] == {"$ref": "#/components/schemas/OrderAccepted"}
    assert resolve(doc, reply["channel"]["$ref"])["address"] is None
    assert "reply" not in ops["orders.send.OrderPlaced"]


class Address(msgspec.Struct):
    street: str


class OtherAddress(msgspec.Struct):
    lines: list[str]


OtherAddress.__name__ = "Address"  # another codebase's Address: same name, different shape


class Moved(Event):
    to: Address


class Relocated(Command):
    to: OtherAddress


def test_definitions_with_one_name_and_two_shapes_stay_apart(validator) -> None:
    movers = Service("movers", emits=[Moved], sends=[Relocated])

    @movers.command(Relocated)
    def relocate(cmd): ...

    @movers.on(Moved)
    def moved(event): ...

    doc = json.loads(render(analyze(system_spec([movers])), "asyncapi"))
    assert_valid(validator, doc)
    moved_ref = doc["components"]["messages"]["Moved"]["payload"]["properties"]["to"]["$ref"]
    relocated_ref = doc["components"]["messages"]["Relocated"]["payload"]["properties"]["to"]["$ref"]
    assert moved_ref != relocated_ref
    assert "street" in resolve(doc, moved_ref)["properties"]
    assert "lines" in resolve(doc, relocated_ref)["properties"]


def _example_packages() -> list[str]:
    """Every runnable example (a package under examples/ whose __init__ declares SYSTEM), as
    ``shop`` or ``patterns.cqrs``: read from the files, so collecting the tests imports nothing."""
    root = REPO / "examples"
    if not root.is_dir():
        return []
    return sorted(
        ".".join(p.parent.relative_to(root).parts)
        for p in root.rglob("__init__.py")
        if any(line.startswith("SYSTEM") for line in p.read_text().splitlines())
    )


@pytest.mark.parametrize(
    "example",
    _example_packages()
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason="no example packages under examples/ yet: "
                "each one's AsyncAPI document is validated once it lands"
            ),
        )
    ],
)
def test_every_example_validates(validator, example, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    try:
        services = collect_services(f"examples.{example}")
    except Exception as exc:  # an example with no Service (a script) has nothing to document
        if "no choreo.Service found" in str(exc):
            pytest.skip(str(exc))
        raise
    doc = json.loads(render(analyze(system_spec(services), name=example), "asyncapi"))
    assert_valid(validator, doc)
    for ref in all_refs(doc):
        resolve(doc, ref)
