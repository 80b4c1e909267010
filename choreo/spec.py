"""Declarations as plain data: what nodes gossip, what the analyzer reads, what JSON holds.

The runtime objects (:class:`~choreo.service.Service`, message classes) carry Python
callables; these structs carry only what another process needs to know: names, kinds, fields
with their JSON schemas, keys, what each handler emits and sends, and where it was declared.
They encode to JSON and MessagePack and decode back with validation::

    spec = system_spec([orders, payments])
    assert SystemSpec.from_json(spec.to_json()) == spec

A :class:`~choreo.service.Service` makes its own spec (``orders.spec()``); this module knows
nothing of services beyond that method, so declarations depend on their plain-data form and
never the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, Protocol

import msgspec

from .messages import Kind, Message, message_options

__all__ = ["FieldSpec", "MessageSpec", "HandlerSpec", "ServiceSpec", "SystemSpec", "Declares", "message_spec", "system_spec"]


class FieldSpec(msgspec.Struct, frozen=True):
    name: str
    type: str
    required: bool
    schema: dict[str, Any] = {}


class MessageSpec(msgspec.Struct, frozen=True):
    name: str
    kind: Kind
    fields: tuple[FieldSpec, ...]
    key: str | None = None
    idempotency: tuple[str, ...] | Literal["body"] | None = None
    dedup_ttl: float = 300.0
    dedup_max: int = 100_000
    returns: dict[str, Any] | None = None
    doc: str = ""
    module: str = ""
    line: int = 0
    defs: dict[str, Any] = {}

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


class HandlerSpec(msgspec.Struct, frozen=True):
    name: str
    kind: Kind
    message: str
    key: str | None = None
    broadcast: bool = False
    emits: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    retries: int = 0
    module: str = ""
    line: int = 0


class ServiceSpec(msgspec.Struct, frozen=True):
    name: str
    handlers: tuple[HandlerSpec, ...] = ()
    emits: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    messages: tuple[MessageSpec, ...] = ()
    partitions: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 64  # validated when decoded (a hello, a JSON spec)
    doc: str = ""
    state: tuple[str, ...] = ()  # the state types its handlers keep per key
    replicas: Annotated[int, msgspec.Meta(ge=0, le=1)] = 0
    module: str = ""
    line: int = 0

    def handler_for(self, message: str) -> HandlerSpec | None:
        for h in self.handlers:
            if h.message == message:
                return h
        return None


class SystemSpec(msgspec.Struct, frozen=True):
    """Every service of a system and every message type they mention."""

    services: tuple[ServiceSpec, ...]
    messages: dict[str, MessageSpec] = {}

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> SystemSpec:
        return msgspec.json.decode(data, type=cls)


def _type_text(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def message_spec(cls: type[Message]) -> MessageSpec:
    """The plain-data declaration of one message type, with a JSON schema per field."""
    options = message_options(cls)
    (schema,), components = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
    own = components.get(cls.__name__, {})
    properties = own.get("properties", {})
    fields = tuple(
        FieldSpec(
            name=info.encode_name,
            type=_type_text(info.type),
            required=info.required,
            schema=properties.get(info.encode_name, {}),
        )
        for info in msgspec.structs.fields(cls)
    )
    defs = {k: v for k, v in components.items() if k != cls.__name__}
    returns = None
    if options.returns is not None:
        (returns,), more = msgspec.json.schema_components([options.returns], ref_template="#/$defs/{name}")
        defs.update(more)
    return MessageSpec(
        name=options.name,
        kind=options.kind,
        fields=fields,
        key=options.key,
        idempotency=options.idempotency,
        dedup_ttl=options.dedup_ttl,
        dedup_max=options.dedup_max,
        returns=returns,
        doc=(cls.__doc__ or "").strip(),
        module=options.module,
        line=options.line,
        defs=defs,
    )


class Declares(Protocol):
    """Anything that can state its declarations as a :class:`ServiceSpec` (a Service does)."""

    def spec(self) -> ServiceSpec: ...


def system_spec(services: Iterable[Declares | ServiceSpec]) -> SystemSpec:
    """Combine services (objects or specs) into one system; message types are merged by name."""
    specs = tuple(s if isinstance(s, ServiceSpec) else s.spec() for s in services)
    messages: dict[str, MessageSpec] = {}
    for s in specs:
        for m in s.messages:
            messages.setdefault(m.name, m)
    return SystemSpec(services=specs, messages=dict(sorted(messages.items())))
