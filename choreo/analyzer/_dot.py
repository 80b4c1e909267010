"""Graphviz output: DOT text, and SVG/PNG through the ``dot`` program when it is installed.

How this works: the flows read top to bottom, by stage: an entry point at the top, then the
service that handles it, what that service emits or sends, the services those reach, and so on,
so the drawing grows in height with the depth of the flows and stays about as wide as their
widest stage (the shop fits a README's width at its natural size, where its text is 11 pt).
Services are rounded blue boxes, events yellow ellipses, commands green arrows (``cds``);
emits and handles are plain edges, command sends bold. Queries are *folded* by default: they
do not drive a flow, so instead of a hexagon with dashed edges across the drawing, the service
that answers them says ``answers GetOrder`` and the one that asks ``asks GetOrder``
(``queries="draw"`` draws them; a query a finding names is always drawn). Entry points have a
double border, and those that come from outside the system hang off a small black "outside"
dot. Nodes and edges that a finding involves are outlined red (error) or orange (warning), with
the findings in their tooltips. The legend shows exactly what the drawing uses, nothing else.

Every node and edge carries an ``id`` and a ``class`` (``node service``, ``edge sends``...), so
the HTML page can find them in the SVG.
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


QUERIES = ("fold", "draw")


class Drawn:
    """What one drawing shows: the folded queries, and each thing the legend must explain."""

    def __init__(self, analysis: Analysis, queries: str) -> None:
        if queries not in QUERIES:
            raise ValueError(f"queries must be one of {', '.join(QUERIES)}, got {queries!r}")
        g = analysis.graph
        self.folded: set[str] = set()
        if queries == "fold":
            for node, d in g.nodes(data=True):
                involved = analysis.node_notes.get(node) or any(
                    analysis.edge_notes.get(e) for e in (*g.in_edges(node), *g.out_edges(node))
                )
                if d["type"] == "message" and d["kind"] == "query" and not involved:
                    self.folded.add(node)
        self.kinds: list[str] = []  # node kinds drawn
        self.features: set[str] = set()  # entry, outside, sends, asks, labels, folded, never-seen, undeclared

    def see(self, *features: str) -> None:
        self.features.update(features)


def render_dot(analysis: Analysis, *, queries: str = "fold") -> str:
    """The flow graph as DOT source, flows top to bottom (see the module docstring).

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import analyze
    >>> render_dot(analyze(SystemSpec(services=(ServiceSpec("orders"),)))).splitlines()[0]
    'digraph choreo {'
    """
    drawn = Drawn(analysis, queries)
    title = html.escape(analysis.name) if analysis.name else "choreo"
    summary = analysis.summary()
    label = _Html(f'<B>{title}</B><BR/><FONT POINT-SIZE="11">{html.escape(summary)}</FONT>')
    graph_attrs = _attrs(rankdir="TB", label=label, labelloc="t", fontname="Helvetica", fontsize=15, nodesep=0.15,
                         ranksep=0.45, newrank="true", tooltip=f"{analysis.name}: {summary}" if analysis.name else summary)  # fmt: skip
    body = [*_nodes(analysis, drawn), *_outside(analysis, drawn), *_edges(analysis, drawn)]
    return "\n".join([
        "digraph choreo {",
        f"  graph {graph_attrs};",
        '  node [fontname="Helvetica", fontsize=11, style="filled", margin="0.08,0.04"];',
        '  edge [fontname="Helvetica", fontsize=10, color="#4a5568", arrowsize=0.7];',
        *body,
        *_legend(analysis, drawn),
        "}",
    ]) + "\n"  # fmt: skip


def _names(names: list[str], per_line: int = 2) -> str:
    """Query names for a service label, a few per line so that the box stays narrow."""
    rows = [", ".join(html.escape(n) for n in names[i : i + per_line]) for i in range(0, len(names), per_line)]
    return "<BR/>".join(rows)


def _folded_lines(analysis: Analysis, drawn: Drawn, service: str) -> str:
    """``answers GetOrder, GetOrders`` / ``asks GetStock`` under a service's name, for folded queries."""
    g = analysis.graph
    answers = sorted(g.nodes[u]["name"] for u, _, d in g.in_edges(service, data=True)
                     if u in drawn.folded and d["relation"] == "handles")  # fmt: skip
    asks = sorted({g.nodes[v]["name"] for _, v, d in g.out_edges(service, data=True)
                   if v in drawn.folded and d["relation"] == "sends"})  # fmt: skip
    lines = []
    if answers:
        lines.append(f"answers {_names(answers)}")
    if asks:
        lines.append(f"asks {_names(asks)}")
    if lines:
        drawn.see("folded")
    return "".join(f'<BR/><FONT POINT-SIZE="9" COLOR="#6b46c1">{line}</FONT>' for line in lines)


def _nodes(analysis: Analysis, drawn: Drawn) -> list[str]:
    entries = {f.entry: f for f in analysis.flows}
    lines = []
    for node, d in analysis.graph.nodes(data=True):
        if node in drawn.folded:
            continue
        kind = d["kind"]
        if kind not in drawn.kinds:
            drawn.kinds.append(kind)
            drawn.kinds.sort(key=list(COLOURS).index)
        fill, line = COLOURS.get(kind, ("#ffffff", "#000000"))
        severity = analysis.node_severity(node)
        if d["type"] == "service":
            label = _Html(f"<B>{html.escape(d['name'])}</B>{_folded_lines(analysis, drawn, node)}")
            where = f" ({d['module']}:{d['line']})" if d["module"] else ""
            tip = f"service {d['name']}{where}"
            style = "rounded,filled,bold"
        else:
            spec = d["spec"] or {}
            key = spec.get("key")
            small = f'<BR/><FONT POINT-SIZE="9">key {html.escape(key)}</FONT>' if key else ""
            label = _Html(f"{html.escape(d['name'])}{small}")
            where = f" ({spec['module']}:{spec['line']})" if spec.get("module") else ""
            entry = entries.get(d["name"])
            tip = f"{kind} {d['name']}{where}" + (f"\nentry point from {entry.source}" if entry else "")
            style = "filled"
            if entry:
                drawn.see("entry")
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
            **{"class": f"{kind}" + (f" {severity}" if severity else "")},
        )
        lines.append(f"  {_q(node)} {attrs};")
    return lines


def _outside(analysis: Analysis, drawn: Drawn) -> list[str]:
    """A small black dot for "outside the system", pointing at the entry points nobody in it originates."""
    from_outside = [f for f in analysis.flows if not f.origins and message_id(f.entry) not in drawn.folded]
    if not from_outside:
        return []
    drawn.see("outside")
    dot = _attrs(label="", shape="circle", width=0.15, fillcolor="#1a202c", color="#1a202c", xlabel="outside",
                 fontsize=10, tooltip="outside the system (clients, timers, other systems)", id=OUTSIDE,
                 **{"class": "outside"})  # fmt: skip
    lines = [f"  {_q(OUTSIDE)} {dot};"]
    for f in from_outside:
        arrow = _attrs(style="dashed", color="#718096", id=f"edge:{OUTSIDE}->{message_id(f.entry)}:from",
                       **{"class": "from-outside"})  # fmt: skip
        lines.append(f"  {_q(OUTSIDE)} -> {_q(message_id(f.entry))} {arrow};")
    return lines


def _edges(analysis: Analysis, drawn: Drawn) -> list[str]:
    g = analysis.graph
    lines = []
    for u, v, relation, ds in drawn_edges(g):
        if u in drawn.folded or v in drawn.folded:
            continue
        label: str | None = None
        style: str | None = None
        if relation == "handles":
            d = ds[0]
            label = handler_label(d, g.nodes[u]) or None
            keyed = f" keyed by {d['key_field']}" if d["key_field"] else ""
            tip = f"{g.nodes[v]['name']}.{short_name(d['handler'])} handles {g.nodes[u]['name']}{keyed}"
            if label:
                drawn.see("labels")
        else:
            target_kind = g.nodes[v]["kind"]
            verb = "asks" if target_kind == "query" else relation
            who = [f".{short_name(d['handler'])}" if d["handler"] else " (outside handlers)" for d in ds]
            tip = "\n".join(f"{g.nodes[u]['name']}{w} {verb} {g.nodes[v]['name']}" for w in who)
            style = "dashed" if target_kind == "query" else ("bold" if relation == "sends" else None)
            drawn.see("asks" if target_kind == "query" else relation)
        severity = analysis.edge_severity(u, v)
        colour = SEVERITY_COLOUR[severity] if severity else None
        seen = analysis.edge_observed(u, v, relation)
        if seen is not None and seen.status == "never-seen":
            style = "dotted" if style != "bold" else "dotted,bold"
            colour = colour or NEVER_SEEN_COLOUR
            tip += "\nnever seen in the spans read"
            drawn.see("never-seen")
        elif seen is not None:
            tip += f"\nseen: {seen.count} message{'' if seen.count == 1 else 's'}"
        attrs = _attrs(
            label=label,
            style=style,
            color=colour,
            penwidth=2.2 if severity else None,
            tooltip=_tooltip(tip, analysis.edge_notes.get((u, v), [])),
            id=f"edge:{u}->{v}:{relation}",
            **{"class": relation + (f" {severity}" if severity else "")},
        )
        lines.append(f"  {_q(u)} -> {_q(v)} {attrs};")
    for e in analysis.observed or ():
        if e.status != "undeclared":
            continue
        drawn.see("undeclared")
        for node in (e.source, e.target):
            if node not in g:
                kind = "service" if node.startswith("service:") else "event"
                lines.append(f"  {_q(node)} " + _attrs(label=node.split(":", 1)[1], shape=SHAPES[kind],
                             style="dashed", color=UNDECLARED_COLOUR, tooltip=f"{node}: observed, not declared",
                             id=node, **{"class": f"{kind} undeclared"}) + ";")  # fmt: skip
        attrs = _attrs(
            label=f"undeclared x{e.count}",
            color=UNDECLARED_COLOUR,
            fontcolor=UNDECLARED_COLOUR,
            penwidth=2.2,
            style="dashed",
            tooltip=f"{e.label(g)}: seen {e.count} times in the spans, declared by nobody",
            id=f"edge:{e.source}->{e.target}:{e.relation}",
            **{"class": f"{e.relation} undeclared"},
        )
        lines.append(f"  {_q(e.source)} -> {_q(e.target)} {attrs};")
    return lines


#: What the legend says of each drawn thing (feature -> text), in its order.
LEGEND_TEXT = {
    "entry": "double border: an entry point (a flow starts there)",
    "outside": "black dot: outside the system (clients, timers)",
    "edges": "arrow: a service emits an event; a message goes to the service that handles it",
    "sends": "bold arrow: a service sends a command",
    "asks": "dashed arrow: a service asks a query",
    "from-outside": "dashed arrow from the dot: the entry point comes from outside",
    "labels": "edge label: keyed by another field than the type's key, or broadcast",
    "folded": "answers / asks: the queries a service answers or asks (folded)",
    "never-seen": "dotted grey arrow: declared, never seen in the spans read",
    "undeclared": "pink dashed arrow: seen in the spans, declared by nobody",
    "error": "red outline: involved in an error-level finding",
    "warning": "orange outline: involved in a warning",
}


def legend_entries(analysis: Analysis, drawn: Drawn) -> list[tuple[str, str]]:
    """``(feature, text)`` for exactly what the drawing uses (call after drawing it)."""
    features = set(drawn.features) | {"edges"}
    if "outside" in features:
        features.add("from-outside")
    features.update({f.severity for f in analysis.findings})
    return [(k, text) for k, text in LEGEND_TEXT.items() if k in features]


def _legend(analysis: Analysis, drawn: Drawn) -> list[str]:
    """One box under the last stage of the flows: a swatch of each kind of node drawn, then a line
    per other thing the drawing uses (double border, the outside dot, bold and dashed arrows...)."""
    swatches = []
    for kind in drawn.kinds:
        fill, line = COLOURS.get(kind, ("#ffffff", "#000000"))
        rounded = ' STYLE="rounded"' if kind in ("service", "event") else ""
        text = f"<B>{kind}</B>" if kind == "service" else kind
        swatches.append(f'<TD BGCOLOR="{fill}" COLOR="{line}" BORDER="1"{rounded}>{text}</TD>')
    span = max(len(swatches), 1)
    rows = [f'<TR><TD ALIGN="LEFT" COLSPAN="{span}"><B>legend</B></TD></TR>']
    if swatches:
        rows.append("<TR>" + "".join(swatches) + "</TR>")
    rows += [f'<TR><TD ALIGN="LEFT" COLSPAN="{span}">{html.escape(text)}</TD></TR>'
             for _, text in legend_entries(analysis, drawn)]  # fmt: skip
    table = _Html(
        '<TABLE BORDER="1" STYLE="rounded" COLOR="#a0aec0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="2">'
        + "".join(rows)
        + "</TABLE>"
    )
    legend = _q("legend")
    lines = [
        f"  {legend} " + _attrs(label=table, shape="plaintext", style="", fontsize=10, id="legend",
                                tooltip="what the drawing shows", **{"class": "legend"}) + ";",  # fmt: skip
        f"  {{ rank=sink; {legend}; }}",
    ]
    for node in _deepest(analysis, drawn):  # under the last stage of the flows, not beside them
        lines.append(f"  {_q(node)} -> {legend} [style=invis, weight=0];")
    return lines


def _deepest(analysis: Analysis, drawn: Drawn) -> list[str]:
    """The drawn nodes of the last stage: furthest from the entry points along the drawn edges
    (a cycle counts as one stage)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(n for n in analysis.graph if n not in drawn.folded)
    g.add_edges_from((u, v) for u, v, _, _ in drawn_edges(analysis.graph) if u in g and v in g)
    if not g:
        return []
    stages = nx.condensation(g)
    depth: dict[int, int] = {}
    for c in nx.topological_sort(stages):
        depth[c] = max((depth[p] + 1 for p in stages.predecessors(c)), default=0)
    last = max(depth.values())
    return sorted(n for c, d in depth.items() if d == last for n in stages.nodes[c]["members"])


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
