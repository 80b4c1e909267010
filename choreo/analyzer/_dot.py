"""Graphviz output: DOT text, and SVG/PNG through the ``dot`` program when it is installed.

How this works: services are rounded blue boxes, events yellow ellipses, commands green arrows
(``cds``), queries purple hexagons; emits are plain edges, command sends bold, query asks dashed.
Entry points get a double border, and those that come from outside the system hang off a small
black "outside" dot. Nodes and edges that a finding involves are outlined red (error) or orange
(warning), with the findings in their tooltips (shown on hover in SVG). A legend explains it all.
"""

from __future__ import annotations

import html
import shutil
import subprocess

from ..errors import ChoreoError
from ._analysis import Analysis
from ._graph import drawn_edges, handler_label, message_id, short_name
from ._lints import Finding

__all__ = ["GraphvizMissing", "GraphvizFailed", "render_dot", "run_graphviz", "INSTALL_GRAPHVIZ"]

INSTALL_GRAPHVIZ = (
    "Graphviz's 'dot' program was not found on PATH; it draws svg, png and html output. Install it "
    "(Debian/Ubuntu: sudo apt-get install graphviz; Fedora: sudo dnf install graphviz; macOS: brew install graphviz; "
    "Windows: winget install graphviz), or choose --format dot, mermaid, json or asyncapi, which need nothing"
)

COLOURS = {
    "service": ("#dbe9f6", "#2b6cb0"),
    "event": ("#fff4c2", "#b7791f"),
    "command": ("#d9f2d9", "#2f855a"),
    "query": ("#eadcf5", "#6b46c1"),
}
SHAPES = {"service": "box", "event": "ellipse", "command": "cds", "query": "hexagon"}
SEVERITY_COLOUR = {"error": "#c53030", "warning": "#dd6b20"}
NEVER_SEEN_COLOUR = "#a0aec0"  # --observed: a declared edge no span shows
UNDECLARED_COLOUR = "#d53f8c"  # --observed: an edge spans show and nobody declares
OUTSIDE = "outside"


class GraphvizMissing(ChoreoError):
    """The ``dot`` program is not installed; the message says how to install it."""


class GraphvizFailed(ChoreoError):
    """``dot`` ran but failed or did not finish; the message carries its error output."""


def _q(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _Html(str):
    """An HTML-like label, written as ``<...>`` instead of quoted (its text is escaped by the caller)."""


def _attrs(**attrs: object) -> str:
    parts = []
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, _Html):
            parts.append(f"{k}=<{v}>")
        else:
            parts.append(f"{k}={_q(str(v))}")
    return "[" + ", ".join(parts) + "]"


def _tooltip(base: str, notes: list[Finding]) -> str:
    return "\n".join([base, *(f"{f.severity}: {f.message}" for f in notes)])


def render_dot(analysis: Analysis) -> str:
    """The flow graph as DOT source.

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import analyze
    >>> render_dot(analyze(SystemSpec(services=(ServiceSpec("orders"),)))).splitlines()[0]
    'digraph choreo {'
    """
    title = f"{analysis.name}: {analysis.summary()}" if analysis.name else analysis.summary()
    graph_attrs = _attrs(rankdir="LR", label=title, labelloc="t", fontname="Helvetica", fontsize=14,
                         nodesep=0.3, ranksep=0.7, tooltip=title)  # fmt: skip
    out = [
        "digraph choreo {",
        f"  graph {graph_attrs};",
        '  node [fontname="Helvetica", fontsize=11, style="filled"];',
        '  edge [fontname="Helvetica", fontsize=9, color="#4a5568", arrowsize=0.7];',
        *_nodes(analysis),
        *_outside(analysis),
        *_edges(analysis),
        *_legend(),
        "}",
    ]
    return "\n".join(out) + "\n"


def _nodes(analysis: Analysis) -> list[str]:
    entries = {f.entry: f for f in analysis.flows}
    lines = []
    for node, d in analysis.graph.nodes(data=True):
        kind = d["kind"]
        fill, line = COLOURS.get(kind, ("#ffffff", "#000000"))
        severity = analysis.node_severity(node)
        if d["type"] == "service":
            label = _Html(f"<B>{html.escape(d['name'])}</B>")
            where = f" ({d['module']}:{d['line']})" if d["module"] else ""
            tip = f"service {d['name']}{where}"
            style = "rounded,filled,bold"
        else:
            spec = d["spec"] or {}
            key = spec.get("key")
            small = f'<BR/><FONT POINT-SIZE="8">key {html.escape(key)}</FONT>' if key else ""
            label = _Html(f"{html.escape(d['name'])}{small}")
            where = f" ({spec['module']}:{spec['line']})" if spec.get("module") else ""
            entry = entries.get(d["name"])
            tip = f"{kind} {d['name']}{where}" + (f"\nentry point from {entry.source}" if entry else "")
            style = "filled"
        attrs = _attrs(
            label=label,
            shape=SHAPES.get(kind, "box"),
            style=style,
            fillcolor=fill,
            color=SEVERITY_COLOUR[severity] if severity else line,
            penwidth=3 if severity == "error" else (2.5 if severity else None),
            peripheries=2 if d["type"] == "message" and d["name"] in entries else None,
            tooltip=_tooltip(tip, analysis.node_notes.get(node, [])),
            id=node,
        )
        lines.append(f"  {_q(node)} {attrs};")
    return lines


def _outside(analysis: Analysis) -> list[str]:
    """A small black dot for "outside the system", pointing at the entry points nobody in it originates."""
    from_outside = [f for f in analysis.flows if not f.origins]
    if not from_outside:
        return []
    dot = _attrs(label="", shape="circle", width=0.15, fillcolor="#1a202c", color="#1a202c", xlabel="outside",
                 fontsize=9, tooltip="outside the system (clients, timers, other systems)")  # fmt: skip
    arrow = _attrs(style="dashed", color="#718096")
    return [f"  {_q(OUTSIDE)} {dot};"] + [
        f"  {_q(OUTSIDE)} -> {_q(message_id(f.entry))} {arrow};" for f in from_outside
    ]


def _edges(analysis: Analysis) -> list[str]:
    g = analysis.graph
    lines = []
    for u, v, relation, ds in drawn_edges(g):
        label: str | None = None
        style: str | None = None
        if relation == "handles":
            d = ds[0]
            label = handler_label(d, g.nodes[u]) or None
            keyed = f" keyed by {d['key_field']}" if d["key_field"] else ""
            tip = f"{g.nodes[v]['name']}.{short_name(d['handler'])} handles {g.nodes[u]['name']}{keyed}"
        else:
            target_kind = g.nodes[v]["kind"]
            verb = "asks" if target_kind == "query" else relation
            who = [f".{short_name(d['handler'])}" if d["handler"] else " (outside handlers)" for d in ds]
            tip = "\n".join(f"{g.nodes[u]['name']}{w} {verb} {g.nodes[v]['name']}" for w in who)
            style = "dashed" if target_kind == "query" else ("bold" if relation == "sends" else None)
        severity = analysis.edge_severity(u, v)
        colour = SEVERITY_COLOUR[severity] if severity else None
        seen = analysis.edge_observed(u, v, relation)
        if seen is not None and seen.status == "never-seen":
            style = "dotted" if style != "bold" else "dotted,bold"
            colour = colour or NEVER_SEEN_COLOUR
            tip += "\nnever seen in the spans read"
        elif seen is not None:
            tip += f"\nseen: {seen.count} message{'' if seen.count == 1 else 's'}"
        attrs = _attrs(
            label=label,
            style=style,
            color=colour,
            penwidth=2.2 if severity else None,
            tooltip=_tooltip(tip, analysis.edge_notes.get((u, v), [])),
        )
        lines.append(f"  {_q(u)} -> {_q(v)} {attrs};")
    for e in analysis.observed or ():
        if e.status != "undeclared":
            continue
        for node in (e.source, e.target):
            if node not in g:
                kind = "service" if node.startswith("service:") else "event"
                lines.append(f"  {_q(node)} " + _attrs(label=node.split(":", 1)[1], shape=SHAPES[kind],
                             style="dashed", color=UNDECLARED_COLOUR, tooltip=f"{node}: observed, not declared") + ";")  # fmt: skip
        attrs = _attrs(
            label=f"undeclared x{e.count}",
            color=UNDECLARED_COLOUR,
            fontcolor=UNDECLARED_COLOUR,
            penwidth=2.2,
            style="dashed",
            tooltip=f"{e.label(g)}: seen {e.count} times in the spans, declared by nobody",
        )
        lines.append(f"  {_q(e.source)} -> {_q(e.target)} {attrs};")
    return lines


def _legend() -> list[str]:
    """A row of sample shapes, chained by invisible edges so that it lies flat beside the graph."""
    lines = ["  subgraph cluster_legend {", '    label="legend"; fontsize=10; style="dashed"; color="#a0aec0";']
    names = []
    for kind in ("service", "event", "command", "query"):
        fill, line = COLOURS[kind]
        style = "rounded,filled,bold" if kind == "service" else "filled"
        names.append(_q("legend:" + kind))
        lines.append(
            f"    {names[-1]} "
            + _attrs(label=kind, shape=SHAPES[kind], style=style, fillcolor=fill, color=line, fontsize=9, tooltip=kind)
            + ";"
        )
    for severity, colour in SEVERITY_COLOUR.items():
        names.append(_q("legend:" + severity))
        lines.append(
            f"    {names[-1]} "
            + _attrs(
                label=f"{severity} finding",
                shape="box",
                style="filled",
                fillcolor="#ffffff",
                color=colour,
                penwidth=2.5,
                fontsize=9,
                tooltip=f"involved in a {severity}-level finding",
            )
            + ";"
        )
    lines.append(f"    {' -> '.join(names)} [style=invis];")
    lines.append("  }")
    return lines


def run_graphviz(dot_source: str, fmt: str, timeout: float = 60.0) -> bytes:
    """Render DOT source with Graphviz (``fmt`` is ``"svg"`` or ``"png"``); :class:`GraphvizMissing` without it.

    >>> run_graphviz("digraph { a -> b }", "svg")[:5]  # doctest: +SKIP
    b'<?xml'
    """
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissing(INSTALL_GRAPHVIZ)
    try:
        done = subprocess.run(
            [exe, f"-T{fmt}"], input=dot_source.encode(), capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise GraphvizFailed(f"Graphviz 'dot -T{fmt}' did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise GraphvizFailed(
            f"Graphviz 'dot -T{fmt}' failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout
