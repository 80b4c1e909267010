"""The flow graph: services and message types as a networkx MultiDiGraph built from a SystemSpec.

How this works: every service and every message type becomes a node (ids ``service:NAME`` and
``message:NAME``). A handler becomes a ``handles`` edge from its message type to its service,
carrying the handler's whole declaration; what a handler (or the service outside its handlers)
emits or sends becomes an ``emits``/``sends`` edge from the service to the message type. So a
path service -> message -> service is one hop of the choreography.

Every attribute is plain JSON data (str, int, float, bool, None, list, dict: never a tuple), so
the node-link JSON of the graph reads back *equal*, and :func:`graph_to_spec` rebuilds the very
SystemSpec the graph came from (handler order, per-service message declarations and all).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import networkx as nx

from ..errors import ChoreoUsageError
from ..spec import HandlerSpec, MessageSpec, ServiceSpec, SystemSpec
from ..terminal import short_name

__all__ = [
    "GRAPH_FORMAT",
    "Location",
    "build_graph",
    "graph_to_spec",
    "service_id",
    "message_id",
    "services",
    "messages",
    "handlers",
    "producers",
    "message_spec_of",
]

GRAPH_FORMAT = "choreo-graph/1"
SERVICE_LEVEL = "(service)"  # the ``handles`` of a produce edge made by the service outside handlers


def service_id(name: str) -> str:
    """The node id of a service: ``service_id("orders") == "service:orders"``."""
    return f"service:{name}"


def message_id(name: str) -> str:
    """The node id of a message type: ``message_id("OrderPlaced") == "message:OrderPlaced"``."""
    return f"message:{name}"


@dataclass(frozen=True)
class Location:
    """Where something is declared: ``Location("orders.place", "shop.orders", 31)``."""

    what: str
    module: str
    line: int

    @property
    def where(self) -> str:
        """``module:line`` (``?`` when the declaration carries no position)."""
        if not self.module:
            return "?"
        return f"{self.module}:{self.line}" if self.line else self.module

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


def build_graph(spec: SystemSpec, name: str = "") -> nx.MultiDiGraph:
    """The flow graph of a system.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> g = build_graph(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", emits=("OrderPlaced",)),)),)))
    >>> sorted(g.nodes)
    ['message:OrderPlaced', 'message:PlaceOrder', 'service:orders']
    >>> sorted(k for _, _, k in g.edges(keys=True))
    ['emits@PlaceOrder', 'handles']
    """
    seen: dict[str, ServiceSpec] = {}
    for s in spec.services:
        if s.name in seen:
            other = seen[s.name]
            raise ChoreoUsageError(
                f"two services are named {s.name!r}: declared at {Location('', other.module, other.line).where} "
                f"and {Location('', s.module, s.line).where}; a service name must be unique in a system"
            )
        seen[s.name] = s

    g: nx.MultiDiGraph = nx.MultiDiGraph(name=name, format=GRAPH_FORMAT, services=[s.name for s in spec.services])
    system_messages = {n: _plain(m) for n, m in spec.messages.items()}

    def add_message(msg: str, kind_hint: str) -> str:
        node = message_id(msg)
        if node not in g:
            declared = system_messages.get(msg)
            kind = declared["kind"] if declared else kind_hint
            g.add_node(node, type="message", kind=kind, name=msg, spec=declared)
        return node

    for msg, m in spec.messages.items():  # declared types first, so their order is the spec's
        add_message(msg, m.kind)
    for s in spec.services:
        own = {m.name: _plain(m) for m in s.messages}
        g.add_node(
            service_id(s.name),
            type="service",
            kind="service",
            name=s.name,
            module=s.module,
            line=s.line,
            partitions=s.partitions,
            doc=s.doc,
            emits=list(s.emits),
            sends=list(s.sends),
            messages=[m.name for m in s.messages],
            message_overrides={n: m for n, m in own.items() if system_messages.get(n) != m},
        )
    for s in spec.services:
        svc = service_id(s.name)
        for index, h in enumerate(s.handlers):
            g.add_edge(
                add_message(h.message, h.kind),
                svc,
                key="handles",
                relation="handles",
                handler=h.name,
                kind=h.kind,
                key_field=h.key,
                broadcast=h.broadcast,
                retries=h.retries,
                emits=list(h.emits),
                sends=list(h.sends),
                module=h.module,
                line=h.line,
                index=index,
            )
            for relation, names in (("emits", h.emits), ("sends", h.sends)):
                for out in names:
                    g.add_edge(
                        svc,
                        add_message(out, "event" if relation == "emits" else "command"),
                        key=f"{relation}@{h.message}",
                        relation=relation,
                        handler=h.name,
                        handles=h.message,
                        module=h.module,
                        line=h.line,
                    )
        for relation, names in (("emits", s.emits), ("sends", s.sends)):
            for out in names:
                g.add_edge(
                    svc,
                    add_message(out, "event" if relation == "emits" else "command"),
                    key=f"{relation}@{SERVICE_LEVEL}",
                    relation=relation,
                    handler=None,
                    handles=None,
                    module=s.module,
                    line=s.line,
                )
    for s in spec.services:  # types a service declares but never mentions (hand-written specs)
        for m in s.messages:
            add_message(m.name, m.kind)
    return g


def graph_to_spec(g: nx.MultiDiGraph) -> SystemSpec:
    """The SystemSpec a graph was built from (``graph_to_spec(build_graph(s)) == s``).

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> s = SystemSpec(services=(ServiceSpec("orders"),))
    >>> graph_to_spec(build_graph(s)) == s
    True
    """
    if g.graph.get("format") != GRAPH_FORMAT:
        raise ChoreoUsageError(
            f"not a choreo flow graph: graph attribute format is {g.graph.get('format')!r}, expected {GRAPH_FORMAT!r}"
        )
    system: dict[str, MessageSpec] = {}
    for _, data in g.nodes(data=True):
        if data["type"] == "message" and data["spec"] is not None:
            system[data["name"]] = msgspec.convert(data["spec"], MessageSpec)
    services_out = []
    for name in g.graph["services"]:
        node = g.nodes[service_id(name)]
        handler_edges = sorted(
            ((u, d) for u, _, d in g.in_edges(service_id(name), data=True) if d["relation"] == "handles"),
            key=lambda ud: ud[1]["index"],
        )
        overrides = node["message_overrides"]
        services_out.append(
            ServiceSpec(
                name=name,
                handlers=tuple(
                    HandlerSpec(
                        name=d["handler"],
                        kind=d["kind"],
                        message=g.nodes[u]["name"],
                        key=d["key_field"],
                        broadcast=d["broadcast"],
                        emits=tuple(d["emits"]),
                        sends=tuple(d["sends"]),
                        retries=d["retries"],
                        module=d["module"],
                        line=d["line"],
                    )
                    for u, d in handler_edges
                ),
                emits=tuple(node["emits"]),
                sends=tuple(node["sends"]),
                messages=tuple(
                    msgspec.convert(overrides[m], MessageSpec) if m in overrides else system[m]
                    for m in node["messages"]
                ),
                partitions=node["partitions"],
                doc=node["doc"],
                module=node["module"],
                line=node["line"],
            )
        )
    return SystemSpec(services=tuple(services_out), messages=system)


def _plain(m: MessageSpec) -> dict[str, Any]:
    # through JSON itself: exactly what a JSON round trip gives back (lists, never tuples), and a copy
    return msgspec.json.decode(msgspec.json.encode(m))  # type: ignore[no-any-return]


# ---- reading the graph (shared by flows, lints and renderers) ---------------------------------


def services(g: nx.MultiDiGraph) -> list[str]:
    """Service names in declaration order."""
    return list(g.graph["services"])


def messages(g: nx.MultiDiGraph) -> list[dict[str, Any]]:
    """The message nodes' attributes, in node order."""
    return [d for _, d in g.nodes(data=True) if d["type"] == "message"]


@dataclass(frozen=True)
class HandlerRef:
    """One handler as the graph holds it (a ``handles`` edge)."""

    service: str
    name: str
    message: str
    kind: str
    key_field: str | None
    broadcast: bool
    emits: tuple[str, ...]
    sends: tuple[str, ...]
    module: str
    line: int

    @property
    def label(self) -> str:
        """``service.handler``: ``orders.place``."""
        return f"{self.service}.{short_name(self.name)}"

    @property
    def location(self) -> Location:
        return Location(self.label, self.module, self.line)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.emits + self.sends


def handlers(g: nx.MultiDiGraph, message: str | None = None) -> Iterator[HandlerRef]:
    """Every handler (of one message type when given), in service then declaration order."""
    order = {name: i for i, name in enumerate(g.graph["services"])}
    candidates: Iterable[tuple[str, str, dict[str, Any]]]
    if message is None:
        candidates = g.edges(data=True)
    else:
        candidates = g.out_edges(message_id(message), data=True) if message_id(message) in g else []
    edges = [(order[g.nodes[v]["name"]], d["index"], u, v, d) for u, v, d in candidates if d["relation"] == "handles"]
    for _, _, u, v, d in sorted(edges, key=lambda e: (e[0], e[1])):
        yield HandlerRef(
            service=g.nodes[v]["name"],
            name=d["handler"],
            message=g.nodes[u]["name"],
            kind=d["kind"],
            key_field=d["key_field"],
            broadcast=d["broadcast"],
            emits=tuple(d["emits"]),
            sends=tuple(d["sends"]),
            module=d["module"],
            line=d["line"],
        )


@dataclass(frozen=True)
class Producer:
    """A declared emit or send: by a handler, or by the service outside handlers (``handler`` None)."""

    service: str
    handler: str | None
    relation: str
    module: str
    line: int

    @property
    def label(self) -> str:
        return f"{self.service}.{short_name(self.handler)}" if self.handler else f"service {self.service}"

    @property
    def location(self) -> Location:
        return Location(self.label, self.module, self.line)


def producers(g: nx.MultiDiGraph, message: str) -> list[Producer]:
    """Who emits or sends a message type, per declaration."""
    node = message_id(message)
    if node not in g:
        return []
    return [
        Producer(g.nodes[u]["name"], d["handler"], d["relation"], d["module"], d["line"])
        for u, _, d in g.in_edges(node, data=True)
    ]


def drawn_edges(g: nx.MultiDiGraph) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Edges to draw: parallel edges of one relation merged, as ``(u, v, relation, [attrs...])``."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for u, v, d in g.edges(data=True):
        groups.setdefault((u, v, d["relation"]), []).append(d)
    return [(u, v, rel, ds) for (u, v, rel), ds in groups.items()]


def handler_label(edge: dict[str, Any], message_node: dict[str, Any]) -> str:
    """What to write on a ``handles`` edge: its key when it is not the type's own, and broadcast."""
    own_key = (message_node.get("spec") or {}).get("key")
    bits = []
    if edge["key_field"] and edge["key_field"] != own_key:
        bits.append(f"by {edge['key_field']}")
    if edge["broadcast"]:
        bits.append("broadcast")
    return ", ".join(bits)


def message_spec_of(g: nx.MultiDiGraph, message: str) -> dict[str, Any] | None:
    """The declaration of a message type as plain data: the system's, else the first service's."""
    node = g.nodes.get(message_id(message))
    if node is None:
        return None
    if node["spec"] is not None:
        return node["spec"]  # type: ignore[no-any-return]
    for s in services(g):
        override = g.nodes[service_id(s)]["message_overrides"].get(message)
        if override is not None:
            return override  # type: ignore[no-any-return]
    return None


def message_location(g: nx.MultiDiGraph, message: str) -> Location | None:
    """Where a message type is declared, when known."""
    spec = message_spec_of(g, message)
    if spec is None or not spec.get("module"):
        return None
    return Location(f"{spec['kind']} {message}", spec["module"], spec["line"])


def service_location(g: nx.MultiDiGraph, service: str) -> Location:
    node = g.nodes[service_id(service)]
    return Location(f"service {service}", node["module"], node["line"])
