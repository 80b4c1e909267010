"""One analysis of a system: its graph, flows and findings together, as every renderer wants them.

How this works: :func:`analyze` builds the graph from a SystemSpec, walks the flows and runs the
lints once; renderers read the result, including which nodes and edges the findings touch (the
worst severity wins) so every drawing highlights the same culprits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx

from ..spec import SystemSpec
from ._flows import Flow, find_flows
from ._graph import build_graph, message_id, service_id
from ._lints import Finding, lint
from ._observed import Observation, ObservedEdge

__all__ = ["Analysis", "analyze"]

_RANK = {"error": 2, "warning": 1}


@dataclass(frozen=True)
class Analysis:
    """A system's flow graph, flows and findings (see :func:`analyze`)."""

    name: str
    spec: SystemSpec
    graph: nx.MultiDiGraph
    flows: list[Flow]
    findings: list[Finding]
    node_notes: dict[str, list[Finding]] = field(default_factory=dict)
    edge_notes: dict[tuple[str, str], list[Finding]] = field(default_factory=dict)
    #: observed vs declared (``choreo graph --observed``): every edge with its status, and what was read
    observed: list[ObservedEdge] | None = None
    observation: Observation | None = None

    def edge_observed(self, u: str, v: str, relation: str) -> ObservedEdge | None:
        """The observed-vs-declared status of a drawn edge, when the analysis has one."""
        for e in self.observed or ():
            if (e.source, e.target, e.relation) == (u, v, relation):
                return e
        return None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def node_severity(self, node: str) -> str | None:
        """The worst severity of the findings that involve a node, or None."""
        return _worst(self.node_notes.get(node, ()))

    def edge_severity(self, u: str, v: str) -> str | None:
        """The worst severity of the findings that involve an edge, or None."""
        return _worst(self.edge_notes.get((u, v), ()))

    def summary(self) -> str:
        """``"3 services, 7 message types (2 commands, 4 events, 1 query), 2 entry points"``."""
        kinds: dict[str, int] = {}
        for _, d in self.graph.nodes(data=True):
            if d["type"] == "message":
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        n_services = len(self.graph.graph["services"])
        n_messages = sum(kinds.values())
        plural = {"command": "commands", "event": "events", "query": "queries"}
        parts = [f"{kinds[k]} {k if kinds[k] == 1 else plural[k]}" for k in plural if k in kinds]
        return (
            f"{_plural(n_services, 'service')}, {_plural(n_messages, 'message type')}"
            + (f" ({', '.join(parts)})" if parts else "")
            + f", {_plural(len(self.flows), 'entry point')}"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _worst(findings: Iterable[Finding]) -> str | None:
    best = None
    for f in findings:
        if best is None or _RANK[f.severity] > _RANK[best]:
            best = f.severity
    return best


def analyze(spec: SystemSpec, name: str = "", ignore: Iterable[str] = ()) -> Analysis:
    """Build the graph, walk the flows and lint, in one go.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> a = analyze(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", sends=("ChargeCard",)),)),)), name="shop")
    >>> [f.entry for f in a.flows], a.errors[0].message
    (['PlaceOrder'], 'command ChargeCard has no owner: sent by orders.place')
    """
    g = build_graph(spec, name=name)
    findings = lint(g, ignore=ignore)
    node_notes: dict[str, list[Finding]] = {}
    edge_notes: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        for node in [*(service_id(s) for s in f.services), *(message_id(m) for m in f.messages)]:
            if node in g and f not in node_notes.setdefault(node, []):
                node_notes[node].append(f)
        for edge in f.edges:
            edge_notes.setdefault(edge, []).append(f)
    return Analysis(name, spec, g, find_flows(g), findings, node_notes, edge_notes)
