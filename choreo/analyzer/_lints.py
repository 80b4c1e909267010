"""Lints: what is wrong or risky in a choreography, each finding naming its culprits and where.

How this works: each rule is a function from the flow graph to findings, registered in
:data:`RULES` with its code, default severity and a one-line summary (``choreo lint --rules``
prints the table). A :class:`Finding` carries its severity, a one-line message naming the
services and message types involved, the declarations (module:line) to look at, a hint saying
what to do, and the graph edges to highlight when the graph is drawn.

Cycles are found between *handlers*, not services: a service that handles A and, in another
handler, emits B is not a loop unless one handler's output comes back to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import networkx as nx

from ..errors import ChoreoUsageError
from ._graph import (
    HandlerRef,
    Location,
    Producer,
    handlers,
    message_id,
    message_location,
    message_spec_of,
    messages,
    producers,
    service_id,
    service_location,
    services,
)

__all__ = ["Finding", "Rule", "RULES", "lint", "MAX_CYCLES"]

Severity = Literal["error", "warning"]
MAX_CYCLES = 50  # cycles reported one by one; more are summarised in one finding
_SEVERITY_ORDER = {"error": 0, "warning": 1}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


@dataclass(frozen=True)
class Finding:
    """One problem, with everything needed to find and fix it.

    >>> f = Finding("no-owner", "error", "command ChargeCard has no owner", messages=("ChargeCard",))
    >>> f.severity, f.messages
    ('error', ('ChargeCard',))
    """

    code: str
    severity: Severity
    message: str
    services: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    locations: tuple[Location, ...] = ()
    hint: str = ""
    edges: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def where(self) -> str:
        """Every location as ``what at module:line``, joined with ``; ``."""
        return "; ".join(str(loc) for loc in self.locations)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "services": list(self.services),
            "messages": list(self.messages),
            "locations": [
                {"what": loc.what, "module": loc.module, "line": loc.line, "where": loc.where} for loc in self.locations
            ],
            "hint": self.hint,
        }


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    summary: str
    check: Callable[[nx.MultiDiGraph], Iterable[Finding]]


def lint(g: nx.MultiDiGraph, ignore: Iterable[str] = ()) -> list[Finding]:
    """Every finding of every rule (except ``ignore``d codes): errors first, then by rule and name.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import build_graph
    >>> g = build_graph(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", sends=("ChargeCard",)),)),)))
    >>> [f.message for f in lint(g, ignore=["unknown-type"])]  # the types are declared nowhere here
    ['command ChargeCard has no owner: sent by orders.place']
    """
    skip = set(ignore)
    unknown = skip - set(RULES)
    if unknown:
        raise ChoreoUsageError(f"unknown rule(s) {sorted(unknown)}; known: {', '.join(RULES)}")
    order = {code: i for i, code in enumerate(RULES)}
    found = [f for code, rule in RULES.items() if code not in skip for f in rule.check(g)]
    return sorted(found, key=lambda f: (_SEVERITY_ORDER[f.severity], order[f.code], f.messages, f.services))


# ---- the rules --------------------------------------------------------------------------------


def _produce_edges(ps: Iterable[Producer], message: str) -> tuple[tuple[str, str], ...]:
    return tuple(dict.fromkeys((service_id(p.service), message_id(message)) for p in ps))


def _handle_edges(hs: Iterable[HandlerRef]) -> tuple[tuple[str, str], ...]:
    return tuple((message_id(h.message), service_id(h.service)) for h in hs)


def _with_decl(g: nx.MultiDiGraph, message: str, locs: Iterable[Location]) -> tuple[Location, ...]:
    decl = message_location(g, message)
    return (*locs, *([decl] if decl else []))


def _labels(items: Iterable[Producer | HandlerRef]) -> str:
    return ", ".join(dict.fromkeys(i.label for i in items))


def _count(n: int) -> str:
    return _NUMBERS.get(n, str(n))


def check_unconsumed_event(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        name = m["name"]
        ps = producers(g, name)
        if m["kind"] != "event" or not ps or next(handlers(g, name), None) is not None:
            continue
        yield Finding(
            "unconsumed-event",
            "warning",
            f"event {name} is emitted by {_labels(ps)} but no service consumes it",
            services=tuple(dict.fromkeys(p.service for p in ps)),
            messages=(name,),
            locations=_with_decl(g, name, (p.location for p in ps)),
            hint=f"subscribe a handler with @svc.on({name}), or stop declaring it in emits=",
            edges=_produce_edges(ps, name),
        )


def check_unfed_subscription(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        name = m["name"]
        if m["kind"] != "event" or producers(g, name):
            continue
        hs = list(handlers(g, name))
        if not hs:
            continue
        yield Finding(
            "unfed-subscription",
            "warning",
            f"{_labels(hs)} subscribe{'s' if len(hs) == 1 else ''} to event {name}, which no service emits",
            services=tuple(dict.fromkeys(h.service for h in hs)),
            messages=(name,),
            locations=_with_decl(g, name, (h.location for h in hs)),
            hint=f"declare {name} in the emits= of the handler that emits it, or in Service(emits=...) "
            "when a service emits it outside handlers",
            edges=_handle_edges(hs),
        )


def check_no_owner(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        name, kind = m["name"], m["kind"]
        ps = producers(g, name)
        if kind not in ("command", "query") or not ps or next(handlers(g, name), None) is not None:
            continue
        verb = "sent" if kind == "command" else "asked"
        yield Finding(
            "no-owner",
            "error",
            f"{kind} {name} has no owner: {verb} by {_labels(ps)}",
            services=tuple(dict.fromkeys(p.service for p in ps)),
            messages=(name,),
            locations=_with_decl(g, name, (p.location for p in ps)),
            hint=f"exactly one service must handle it: add @svc.{kind}({name}) to the service that owns it",
            edges=_produce_edges(ps, name),
        )


def check_several_owners(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        name, kind = m["name"], m["kind"]
        hs = list(handlers(g, name))
        owners = list(dict.fromkeys(h.service for h in hs))
        if kind not in ("command", "query") or len(owners) < 2:
            continue
        yield Finding(
            "several-owners",
            "error",
            f"{kind} {name} has {_count(len(owners))} owners: {', '.join(owners)}",
            services=tuple(owners),
            messages=(name,),
            locations=_with_decl(g, name, (h.location for h in hs)),
            hint=f"a {kind} has exactly one owning service: keep one handler, or split it into two types",
            edges=_handle_edges(hs),
        )


def check_query_side_effects(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for h in handlers(g):
        if h.kind != "query" or not h.outputs:
            continue
        parts = [f"emits {', '.join(h.emits)}" if h.emits else "", f"sends {', '.join(h.sends)}" if h.sends else ""]
        yield Finding(
            "query-side-effects",
            "error",
            f"query handler {h.label} for {h.message} declares {' and '.join(p for p in parts if p)}",
            services=(h.service,),
            messages=(h.message, *h.outputs),
            locations=(h.location,),
            hint="a query only reads state: move the side effects to a command handler",
            edges=(
                (message_id(h.message), service_id(h.service)),
                *((service_id(h.service), message_id(o)) for o in h.outputs),
            ),
        )


def check_missing_key_field(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        spec = message_spec_of(g, m["name"])
        if spec is None or spec.get("key") is None:
            continue
        fields = [f["name"] for f in spec["fields"]]
        if spec["key"] not in fields:
            decl = message_location(g, m["name"])
            yield Finding(
                "missing-key-field",
                "error",
                f"{spec['kind']} {m['name']} is keyed by {spec['key']!r}, "
                f"a field it lacks (fields: {', '.join(fields)})",
                messages=(m["name"],),
                locations=(decl,) if decl else (),
                hint="name one of the type's fields in key=",
            )
    for h in handlers(g):
        spec = message_spec_of(g, h.message)
        if h.key_field is None or spec is None:
            continue
        fields = [f["name"] for f in spec["fields"]]
        if h.key_field in fields or h.key_field == spec.get("key"):
            continue
        yield Finding(
            "missing-key-field",
            "error",
            f"{h.label} is keyed by {h.key_field!r}, a field {h.message} lacks (fields: {', '.join(fields) or 'none'})",
            services=(h.service,),
            messages=(h.message,),
            locations=_with_decl(g, h.message, (h.location,)),
            hint=f"pass key= one of the fields of {h.message}",
            edges=_handle_edges((h,)),
        )


def check_unordered_producers(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for h in handlers(g):
        if h.key_field is None or h.kind == "query":
            continue
        ps = producers(g, h.message)
        sources = list(dict.fromkeys(p.service for p in ps))
        if len(sources) < 2:
            continue
        yield Finding(
            "unordered-producers",
            "warning",
            f"{h.label} consumes {h.message} keyed by {h.key_field} from {_count(len(sources))} services "
            f"({', '.join(sources)}): order per key holds within one producer, not across them",
            services=(h.service, *sources),
            messages=(h.message,),
            locations=(h.location, *(p.location for p in ps)),
            hint="have one service produce the keyed type, or make the handler tolerate any order across producers "
            "(versions, last-writer-wins)",
            edges=(*_produce_edges(ps, h.message), *_handle_edges((h,))),
        )


def check_cycles(g: nx.MultiDiGraph) -> Iterator[Finding]:
    hg: nx.DiGraph = nx.DiGraph()
    refs: dict[tuple[str, str], HandlerRef] = {}
    for h in handlers(g):
        refs[(h.service, h.message)] = h
        hg.add_node((h.service, h.message))
    for h in refs.values():
        for out in h.outputs:
            for nxt in handlers(g, out):
                hg.add_edge((h.service, h.message), (nxt.service, nxt.message))
    cycles = [_rotate(c) for c in islice(nx.simple_cycles(hg), MAX_CYCLES + 1)]
    for cycle in sorted(cycles[:MAX_CYCLES]):
        hops = [refs[node] for node in cycle]
        path = " -> ".join([*(h.service for h in hops), hops[0].service])
        via = ", ".join(h.message for h in hops)
        steps = []
        edges: list[tuple[str, str]] = []
        for h, nxt in zip(hops, [*hops[1:], hops[0]], strict=True):
            verb = "emits" if nxt.message in h.emits else "sends"
            steps.append(f"{h.label} {verb} {nxt.message}")
            edges += [
                (service_id(h.service), message_id(nxt.message)),
                (message_id(nxt.message), service_id(nxt.service)),
            ]
        yield Finding(
            "cycle",
            "warning",
            f"cycle: {path} via {via}",
            services=tuple(dict.fromkeys(h.service for h in hops)),
            messages=tuple(h.message for h in hops),
            locations=tuple(h.location for h in hops),
            hint="; ".join(steps) + ". Make sure the loop ends (a retry limit, a terminal state) "
            "or break it with a different type",
            edges=tuple(edges),
        )
    if len(cycles) > MAX_CYCLES:
        yield Finding(
            "cycle",
            "warning",
            f"more than {MAX_CYCLES} cycles: only the first {MAX_CYCLES} are listed",
            hint="the choreography is densely looped; look at the services above first",
        )


def _rotate(cycle: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = cycle.index(min(cycle))
    return cycle[start:] + cycle[:start]


def check_unknown_type(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        if message_spec_of(g, m["name"]) is not None:
            continue
        users: list[Producer | HandlerRef] = [*producers(g, m["name"]), *handlers(g, m["name"])]
        yield Finding(
            "unknown-type",
            "error",
            f"{m['name']} is used by {_labels(users)} but declared nowhere in the system",
            services=tuple(dict.fromkeys(u.service for u in users)),
            messages=(m["name"],),
            locations=tuple(u.location for u in users),
            hint="include the message type's declaration (spec.messages), or fix the name",
        )


_SHAPE = ("kind", "fields", "key", "idempotency", "returns", "defs")


def check_type_conflict(g: nx.MultiDiGraph) -> Iterator[Finding]:
    for m in messages(g):
        name = m["name"]
        variants: dict[str, list[str]] = {}  # shape -> services declaring it that way
        shapes: dict[str, dict[str, Any]] = {}
        base = m["spec"]
        for s in services(g):
            node = g.nodes[service_id(s)]
            if name not in node["messages"]:
                continue
            spec = node["message_overrides"].get(name, base)
            if spec is None:
                continue
            shape = {k: spec.get(k) for k in _SHAPE}
            tag = repr(shape)
            variants.setdefault(tag, []).append(s)
            shapes[tag] = shape
        if len(variants) < 2:
            continue
        first, *rest = shapes.values()
        differ = [k for k in _SHAPE if any(other[k] != first[k] for other in rest)]
        groups = [" and ".join(v) for v in variants.values()]
        yield Finding(
            "type-conflict",
            "error" if "kind" in differ else "warning",
            f"{name} is declared differently by {' / '.join(groups)}: {', '.join(differ)} differ",
            services=tuple(s for v in variants.values() for s in v),
            messages=(name,),
            locations=tuple(service_location(g, s) for v in variants.values() for s in v),
            hint="every service must agree on a type's shape: share one declaration, or evolve it compatibly",
        )


RULES: dict[str, Rule] = {
    r.code: r
    for r in (
        Rule("no-owner", "error", "a command or query that is sent but that no service handles", check_no_owner),
        Rule("several-owners", "error", "a command or query handled by more than one service", check_several_owners),
        Rule("query-side-effects", "error", "a query handler that declares emits or sends", check_query_side_effects),
        Rule(
            "missing-key-field",
            "error",
            "a keyed type or subscription naming a field the type lacks",
            check_missing_key_field,
        ),
        Rule(
            "unknown-type",
            "error",
            "a message type used but declared nowhere (specs from JSON or a mesh)",
            check_unknown_type,
        ),
        Rule(
            "type-conflict",
            "warning",
            "services declaring one type name with different shapes (an error when even the kind differs)",
            check_type_conflict,
        ),
        Rule("unconsumed-event", "warning", "an event emitted that no service consumes", check_unconsumed_event),
        Rule("unfed-subscription", "warning", "an event subscribed to that no service emits", check_unfed_subscription),
        Rule("cycle", "warning", "handlers that can trigger each other in a loop", check_cycles),
        Rule(
            "unordered-producers",
            "warning",
            "a keyed subscription fed by several producing services (no order across producers)",
            check_unordered_producers,
        ),
    )
}
