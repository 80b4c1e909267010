"""Mermaid output: a ``flowchart LR`` that code hosting sites render in Markdown.

How this works: the same picture as the DOT output in Mermaid's syntax. Node ids are derived
from names (``s_orders``, ``m_OrderPlaced``), made safe and unique; labels are quoted. Services
are rounded boxes, events stadiums, commands parallelograms, queries hexagons; command sends are
thick links, query asks dotted. Findings become the ``error``/``warning`` classes on nodes and
``linkStyle`` lines on the links they involve.
"""

from __future__ import annotations

import re

from ._analysis import Analysis
from ._graph import drawn_edges, handler_label, message_id

__all__ = ["render_mermaid"]

_SHAPES = {
    "service": ('("', '")'),
    "event": ('(["', '"])'),
    "command": ('[/"', '"/]'),
    "query": ('{{"', '"}}'),
}
_CLASSES = {
    "service": "fill:#dbe9f6,stroke:#2b6cb0,color:#1a202c",
    "event": "fill:#fff4c2,stroke:#b7791f,color:#1a202c",
    "command": "fill:#d9f2d9,stroke:#2f855a,color:#1a202c",
    "query": "fill:#eadcf5,stroke:#6b46c1,color:#1a202c",
    "outside": "fill:#1a202c,stroke:#1a202c,color:#ffffff",
    "entry": "stroke-width:3px",
    "warning": "stroke:#dd6b20,stroke-width:3px",
    "error": "stroke:#c53030,stroke-width:4px",
}
_LINK_STYLE = {"error": "stroke:#c53030,stroke-width:3px", "warning": "stroke:#dd6b20,stroke-width:3px"}


def _label(text: str) -> str:
    """Text for a quoted Mermaid label: ``#`` and ``"`` as Mermaid entity codes."""
    return text.replace("#", "#35;").replace('"', "#quot;")


def render_mermaid(analysis: Analysis) -> str:
    """The flow graph as a Mermaid flowchart.

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import analyze
    >>> print(render_mermaid(analyze(SystemSpec(services=(ServiceSpec("orders"),)))).splitlines()[1])
      s_orders("orders"):::service
    """
    g = analysis.graph
    ids: dict[str, str] = {}
    used: set[str] = set()

    def node_id(node: str) -> str:
        if node not in ids:
            prefix, _, name = node.partition(":")
            base = f"{prefix[0]}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
            candidate, n = base, 2
            while candidate in used:
                candidate, n = f"{base}_{n}", n + 1
            used.add(candidate)
            ids[node] = candidate
        return ids[node]

    lines = ["flowchart LR"]
    entries = {f.entry for f in analysis.flows}
    classes: dict[str, list[str]] = {"entry": [], "warning": [], "error": []}
    for node, d in g.nodes(data=True):
        open_, close = _SHAPES.get(d["kind"], ('["', '"]'))
        lines.append(f"  {node_id(node)}{open_}{_label(d['name'])}{close}:::{d['kind']}")
        if d["type"] == "message" and d["name"] in entries:
            classes["entry"].append(node_id(node))
        severity = analysis.node_severity(node)
        if severity:
            classes[severity].append(node_id(node))
    links: list[str] = []
    link_severity: dict[str, list[int]] = {"error": [], "warning": []}
    outside = [f for f in analysis.flows if not f.origins]
    if outside:
        lines.append('  outside(("outside")):::outside')
        for f in outside:
            links.append(f"  outside -.-> {node_id(message_id(f.entry))}")
    for u, v, relation, ds in drawn_edges(g):
        if relation == "handles":
            label = handler_label(ds[0], g.nodes[u])
            arrow = f'-->|"{_label(label)}"|' if label else "-->"
        elif g.nodes[v]["kind"] == "query":
            arrow = "-.->"
        else:
            arrow = "==>" if relation == "sends" else "-->"
        severity = analysis.edge_severity(u, v)
        if severity:
            link_severity[severity].append(len(links))
        links.append(f"  {node_id(u)} {arrow} {node_id(v)}")
    lines += links
    for name, style in _CLASSES.items():
        lines.append(f"  classDef {name} {style}")
    for name, members in classes.items():
        if members:
            lines.append(f"  class {','.join(members)} {name}")
    for severity, indexes in link_severity.items():
        if indexes:
            lines.append(f"  linkStyle {','.join(map(str, indexes))} {_LINK_STYLE[severity]}")
    return "\n".join(lines) + "\n"
