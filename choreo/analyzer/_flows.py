"""Flows: what each entry point sets in motion, as a tree, with its depth and fan-out.

How this works: an *entry point* is a command or event that no handler in the system emits or
sends, so it comes from outside (a client, a timer, an HTTP endpoint). When a service declares it
in ``Service(emits=..., sends=...)``, that service is its origin; otherwise it comes from outside
the system. From each entry point we walk the graph: a message goes to every handler of its type,
each handler to the messages it declares, and so on. A message already on the current path is a
cycle and is not walked again; a message walked earlier in the same flow (a diamond) is shown as
such instead of being repeated, so the tree stays as small as the graph.

``depth`` is the longest chain of handlers the entry point can trigger (cycles counted once);
``fan_out`` the largest number of handlers one message of the flow reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from ._graph import HandlerRef, handlers, message_id, messages, producers

__all__ = ["Hop", "Step", "Flow", "entry_points", "find_flows"]

Repeat = Literal["cycle", "seen"]


@dataclass(frozen=True)
class Step:
    """One handler run inside a flow, and the messages it may produce."""

    handler: HandlerRef
    outputs: tuple[Hop, ...]


@dataclass(frozen=True)
class Hop:
    """One message inside a flow; ``repeat`` says why it is not walked again here."""

    message: str
    kind: str
    steps: tuple[Step, ...] = ()
    repeat: Repeat | None = None


@dataclass(frozen=True)
class Flow:
    """Everything one entry point can set in motion.

    ``origins`` are the services that originate the entry point outside handlers; empty means
    it comes from outside the system.
    """

    entry: str
    kind: str
    origins: tuple[str, ...]
    root: Hop
    depth: int
    fan_out: int
    services: tuple[str, ...]
    messages: tuple[str, ...]

    @property
    def source(self) -> str:
        """``"outside"`` or the originating services, for display."""
        return ", ".join(self.origins) if self.origins else "outside"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output: the measures and the tree."""
        return {
            "entry": self.entry,
            "kind": self.kind,
            "origins": list(self.origins),
            "depth": self.depth,
            "fan_out": self.fan_out,
            "services": list(self.services),
            "messages": list(self.messages),
            "tree": _hop_dict(self.root),
        }


def _hop_dict(hop: Hop) -> dict[str, Any]:
    out: dict[str, Any] = {"message": hop.message, "kind": hop.kind}
    if hop.repeat:
        out["repeat"] = hop.repeat
        return out
    out["handlers"] = [
        {
            "service": s.handler.service,
            "handler": s.handler.name,
            "key": s.handler.key_field,
            "broadcast": s.handler.broadcast,
            "where": s.handler.location.where,
            "outputs": [_hop_dict(o) for o in s.outputs],
        }
        for s in hop.steps
    ]
    return out


def entry_points(g: nx.MultiDiGraph) -> list[str]:
    """Commands and events no handler produces: commands first, then events, each by name.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import build_graph
    >>> g = build_graph(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", emits=("OrderPlaced",)),)),)))
    >>> entry_points(g)
    ['PlaceOrder']
    """
    found = []
    for m in messages(g):
        if m["kind"] not in ("command", "event"):
            continue
        if any(p.handler is not None for p in producers(g, m["name"])):
            continue
        found.append((0 if m["kind"] == "command" else 1, m["name"]))
    return [name for _, name in sorted(found)]


def find_flows(g: nx.MultiDiGraph) -> list[Flow]:
    """One :class:`Flow` per entry point, in :func:`entry_points` order.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import build_graph
    >>> g = build_graph(SystemSpec(services=(
    ...     ServiceSpec("orders", handlers=(HandlerSpec("place", "command", "PlaceOrder", emits=("OrderPlaced",)),)),
    ...     ServiceSpec("mail", handlers=(HandlerSpec("notify", "event", "OrderPlaced"),)))))
    >>> [(f.entry, f.depth, f.services) for f in find_flows(g)]
    [('PlaceOrder', 2, ('orders', 'mail'))]
    """
    return [_Walker(g).flow(entry) for entry in entry_points(g)]


@dataclass
class _Walker:
    g: nx.MultiDiGraph
    expanded: set[str] = field(default_factory=set)
    services: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    fan_out: int = 0
    depth_memo: dict[str, int] = field(default_factory=dict)

    def flow(self, entry: str) -> Flow:
        root = self.hop(entry, path=())
        origins = tuple(dict.fromkeys(p.service for p in producers(self.g, entry) if p.handler is None))
        return Flow(
            entry=entry,
            kind=self.kind(entry),
            origins=origins,
            root=root,
            depth=self.depth(entry, path=frozenset())[0],
            fan_out=self.fan_out,
            services=tuple(self.services),
            messages=tuple(self.messages),
        )

    def kind(self, message: str) -> str:
        return str(self.g.nodes[message_id(message)]["kind"])

    def hop(self, message: str, path: tuple[str, ...]) -> Hop:
        if message in path:
            return Hop(message, self.kind(message), repeat="cycle")
        if message in self.expanded:
            return Hop(message, self.kind(message), repeat="seen")
        self.expanded.add(message)
        if message not in self.messages:
            self.messages.append(message)
        hs = list(handlers(self.g, message))
        self.fan_out = max(self.fan_out, len(hs))
        steps = []
        for h in hs:
            if h.service not in self.services:
                self.services.append(h.service)
            outputs = tuple(self.hop(out, path + (message,)) for out in dict.fromkeys(h.outputs))
            steps.append(Step(h, outputs))
        return Hop(message, self.kind(message), tuple(steps))

    def depth(self, message: str, path: frozenset[str]) -> tuple[int, bool]:
        """(longest handler chain from ``message``, whether a cycle cut it short on this path)."""
        if message in self.depth_memo:
            return self.depth_memo[message], False
        best, cut = 0, False
        inner = path | {message}
        for h in handlers(self.g, message):
            longest = 0
            for out in h.outputs:
                if out in inner:
                    cut = True
                    continue
                d, c = self.depth(out, inner)
                cut = cut or c
                longest = max(longest, d)
            best = max(best, 1 + longest)
        if not cut:  # the answer does not depend on the path that led here
            self.depth_memo[message] = best
        return best, cut
