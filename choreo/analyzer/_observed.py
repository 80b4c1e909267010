"""Observed vs declared: the edges a running mesh actually used, against the declared graph.

How this works: spans (what nodes recorded of the messages they handled, as plain dicts from
the ``spans`` system query) say two things. A span of type T handled by service S is a
``handles`` edge T -> S. A span whose cause is the message M says that whoever handled M
produced T: a ``emits`` (event) or ``sends`` (command, query) edge from M's service to T; when
M was handled by several services, the one whose handler declares T is credited, and the edge is
left unattributed when none or several do. A span without a cause came from outside handlers:
it counts as an observation of every service-level ``emits``/``sends`` declaration of its type
(a client cannot be told from a service producing outside its handlers).

:func:`compare` matches these against the graph's edges: each declared edge is *seen* (with how
many messages) or *never seen* in the spans at hand, and each observed edge that nobody declared
is *undeclared*. Spans live in bounded rings, so "never seen" means "not in the recent spans":
traffic decides what can be observed. The analyzer still reads no runtime: spans are data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ._graph import message_id, service_id

__all__ = ["ObservedEdge", "Observation", "observe", "compare"]

ZERO = "0" * 32
OUTSIDE_HANDLERS = "outside handlers"  # who produced a message the service originates itself


@dataclass(frozen=True)
class ObservedEdge:
    """One edge of the comparison: ``source -> target`` with its relation and status."""

    source: str  # node id: service:NAME or message:NAME
    target: str
    relation: str  # handles | emits | sends
    status: str  # seen | never-seen | undeclared
    count: int  # messages observed on it
    handlers: tuple[str, ...] = ()  # declared handler names (empty for undeclared edges)

    def label(self, g: nx.MultiDiGraph) -> str:
        def name(node: str) -> str:
            return g.nodes[node]["name"] if node in g else node.split(":", 1)[1]

        return f"{name(self.source)} --{self.relation}--> {name(self.target)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "relation": self.relation,
            "status": self.status,
            "count": self.count,
            "handlers": list(self.handlers),
        }


@dataclass
class Observation:
    """What the spans show, before comparison."""

    edges: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)  # (u, v, relation) -> message ids
    from_outside: dict[str, set[str]] = field(default_factory=dict)  # type -> ids of messages without a cause
    spans: int = 0
    unattributed: int = 0  # produced messages whose producer could not be told
    first: float = 0.0
    last: float = 0.0


def _relation(kind: str | None) -> str:
    return "emits" if kind in (None, "event") else "sends"


def observe(spans: Iterable[Mapping[str, Any]], g: nx.MultiDiGraph) -> Observation:
    """Observed edges from spans (dicts with msg_id, cause_id, type, service, handler, received)."""
    obs = Observation()
    spans = list(spans)
    handled_by: dict[str, set[tuple[str, str]]] = {}
    times = []
    for s in spans:
        handled_by.setdefault(s["msg_id"], set()).add((s["service"], s["handler"]))
        times.append(s.get("received", 0.0))
    declared_outputs: dict[tuple[str, str], set[str]] = {}
    for u, _v, d in g.edges(data=True):
        if d["relation"] == "handles":
            svc = g.nodes[_v]["name"]
            declared_outputs[(svc, d["handler"])] = set(d["emits"]) | set(d["sends"])
    seen_messages: set[tuple[str, str, str]] = set()
    for s in spans:
        obs.spans += 1
        mtype, msg = s["type"], s["msg_id"]
        kind = g.nodes[message_id(mtype)]["kind"] if message_id(mtype) in g else None
        key = (message_id(mtype), service_id(s["service"]), "handles")
        obs.edges.setdefault(key, set()).add(msg)
        if (msg, s["service"], mtype) in seen_messages:
            continue
        seen_messages.add((msg, s["service"], mtype))
        cause = s.get("cause_id", ZERO)
        if s.get("replay"):
            continue  # a replayed dead letter: handled again, but nobody produced it now
        if cause == ZERO:
            obs.from_outside.setdefault(mtype, set()).add(msg)
            continue
        producers = handled_by.get(cause)
        if not producers:
            obs.unattributed += 1  # the cause's spans are gone from the rings (or on a node not asked)
            continue
        services = {svc for svc, _ in producers}
        if len(services) > 1:
            declaring = {svc for svc, h in producers if mtype in declared_outputs.get((svc, h), ())}
            if len(declaring) != 1:
                obs.unattributed += 1
                continue
            services = declaring
        (producer,) = services
        obs.edges.setdefault((service_id(producer), message_id(mtype), _relation(kind)), set()).add(msg)
    if times:
        obs.first, obs.last = min(times), max(times)
    return obs


def compare(g: nx.MultiDiGraph, obs: Observation) -> list[ObservedEdge]:
    """Every declared edge (seen or never seen) and every undeclared observed edge, in graph order."""
    declared: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for u, v, d in g.edges(data=True):
        declared.setdefault((u, v, d["relation"]), []).append(d)
    out = []
    for (u, v, relation), ds in declared.items():
        msgs = set(obs.edges.get((u, v, relation), ()))
        if relation != "handles" and any(d["handler"] is None for d in ds):
            msgs |= obs.from_outside.get(g.nodes[v]["name"], set())  # produced outside handlers
        names = tuple(sorted({d["handler"] or OUTSIDE_HANDLERS for d in ds}))
        out.append(ObservedEdge(u, v, relation, "seen" if msgs else "never-seen", len(msgs), names))
    for (u, v, relation), msgs in obs.edges.items():
        if (u, v, relation) not in declared:
            out.append(ObservedEdge(u, v, relation, "undeclared", len(msgs)))
    return out
