"""HTML output: one self-contained page to explore the flow graph, offline.

How this works: the SVG from Graphviz is inlined (its XML prolog and DOCTYPE stripped), shown at
its natural size, where its text reads as in the README; the page's styles and script
(``page.css``, ``page.js`` beside this module) are inlined too, and the graph's facts go in as
JSON, so the file opens from disk in any browser, fetches nothing and can be attached to a CI
run as is. On the page: drag to pan, the wheel or the buttons to zoom (1:1 and fit), click a
service or message to highlight the flows it takes part in and read its declaration, handlers and
findings, type in the search box to find a name (Enter goes to the first), and click a name in
the findings table to go to it on the drawing. Served by ``choreo graph --peer ... --live``
(:mod:`choreo.analyzer.live`), the page also polls ``live.json`` and writes the mesh's rates,
lag and errors on the edges and services, refreshed.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from .. import __version__
from ..terminal import short_name
from ._analysis import Analysis
from ._dot import OUTSIDE, render_dot, run_graphviz
from ._graph import message_id, service_id
from ._text import render_flows

__all__ = ["render_html", "page_data"]

HINT = "Click a service or message to see the flows it takes part in. Drag to move, wheel to zoom."


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _svg(analysis: Analysis, queries: str) -> str:
    svg = run_graphviz(render_dot(analysis, queries=queries), "svg").decode()
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def page_data(analysis: Analysis, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the page's script knows of the graph: nodes, edges, flows and findings (plain JSON data)."""
    g = analysis.graph
    nodes: dict[str, dict[str, Any]] = {}
    for node, d in g.nodes(data=True):
        if d["type"] == "service":
            where = f"{d['module']}:{d['line']}" if d["module"] else ""
            handlers = [
                f"{short_name(e['handler'])}: {g.nodes[u]['name']}"
                + (f" -> {', '.join([*e['emits'], *e['sends']])}" if e["emits"] or e["sends"] else "")
                for u, _, e in g.in_edges(node, data=True)
            ]
            answers = sorted(g.nodes[u]["name"] for u, _, e in g.in_edges(node, data=True) if g.nodes[u]["kind"] == "query")
            asks = sorted({g.nodes[v]["name"] for _, v in g.out_edges(node) if g.nodes[v]["kind"] == "query"})
        else:
            spec = d["spec"] or {}
            where = f"{spec['module']}:{spec['line']}" if spec.get("module") else ""
            key = f" (key {spec['key']})" if spec.get("key") else ""
            handlers = [f"{g.nodes[v]['name']}.{short_name(e['handler'])}{key}" for _, v, e in g.out_edges(node, data=True)]
            answers, asks = [], []
        findings = [i for i, f in enumerate(analysis.findings) if f in analysis.node_notes.get(node, [])]
        nodes[node] = {"name": d["name"], "kind": d["kind"], "where": where, "handlers": handlers,
                       "answers": answers, "asks": asks, "findings": findings}  # fmt: skip
    edges = [[u, v, d["relation"], f"edge:{u}->{v}:{d['relation']}"] for u, v, d in g.edges(data=True)]
    flows = []
    for f in analysis.flows:
        members = [service_id(s) for s in (*f.services, *f.origins)] + [message_id(m) for m in f.messages]
        flows.append({"entry": f.entry, "source": f.source, "nodes": members + ([] if f.origins else [OUTSIDE])})
    findings = [{"severity": f.severity, "message": f.message} for f in analysis.findings]
    return {"nodes": nodes, "edges": edges, "flows": flows, "findings": findings, "hint": HINT, "live": live,
            "paths": paths(analysis)}  # fmt: skip


def paths(analysis: Analysis) -> dict[str, dict[str, list[str]]]:
    """For each service and message: the nodes and edges on the paths through it, handler by handler.

    A message leads on only through the handlers that take it, and a handler only to what *it*
    declares: clicking payments lights up what reaches payments and what payments' own handlers
    set in motion, not everything its neighbours do.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import analyze
    >>> a = analyze(SystemSpec(services=(
    ...     ServiceSpec("a", handlers=(HandlerSpec("go", "command", "Go", emits=("Went",)),
    ...                                HandlerSpec("stop", "command", "Stop"))),
    ...     ServiceSpec("b", handlers=(HandlerSpec("w", "event", "Went"),)))))
    >>> sorted(paths(a)["message:Went"]["nodes"])
    ['message:Go', 'message:Went', 'outside', 'service:a', 'service:b']
    """
    import networkx as nx

    g = analysis.graph
    steps = nx.DiGraph()
    owner: dict[Any, str] = {}  # step -> its service node
    produced: dict[tuple[str, str], list[Any]] = {}  # (service node, message node) -> steps producing it
    for u, v, d in g.edges(data=True):
        if d["relation"] == "handles":
            step = ("step", v, d["handler"])
            owner[step] = v
            steps.add_edge(u, step)
            for out in (*d["emits"], *d["sends"]):
                steps.add_edge(step, message_id(out))
                produced.setdefault((v, message_id(out)), []).append(step)
        elif d["handler"] is None:
            origin = ("origin", u)
            owner[origin] = u
            steps.add_edge(origin, v)
            produced.setdefault((u, v), []).append(origin)
    outside = {message_id(f.entry) for f in analysis.flows if not f.origins}
    out: dict[str, dict[str, list[str]]] = {}
    for node in g.nodes:
        starts = [node] if node in steps else []
        starts += [s for s, svc in owner.items() if svc == node]
        keep: set[Any] = set(starts)
        for s in starts:
            keep |= nx.ancestors(steps, s) | nx.descendants(steps, s)
        drawn = {owner.get(k, k) for k in keep if k in owner or k in g} | {node}
        edges = []
        for u, v, d in g.edges(data=True):
            rel = d["relation"]
            if rel == "handles":
                lit = u in keep and ("step", v, d["handler"]) in keep
            else:
                lit = v in keep and any(p in keep for p in produced.get((u, v), ()))
            if lit:
                edges.append(f"edge:{u}->{v}:{rel}")
        for entry in outside & keep:
            drawn.add(OUTSIDE)
            edges.append(f"edge:{OUTSIDE}->{entry}:from")
        out[node] = {"nodes": sorted(drawn), "edges": sorted(set(edges))}
    return out


def _culprits(analysis: Analysis, services: tuple[str, ...], messages: tuple[str, ...]) -> str:
    links = [
        f"<a class='culprit' href='#{html.escape(node, quote=True)}' data-node='{html.escape(node, quote=True)}'>"
        f"{html.escape(name)}</a>"
        for node, name in [*((service_id(s), s) for s in services), *((message_id(m), m) for m in messages)]
        if node in analysis.graph
    ]
    return ", ".join(links)


def _findings(analysis: Analysis) -> str:
    if not analysis.findings:
        return "<p class='ok'>no findings</p>"
    rows = []
    for f in analysis.findings:
        where = "<br>".join(
            f"{html.escape(loc.what)} <span class='where'>{html.escape(loc.where)}</span>" for loc in f.locations
        )
        rows.append(
            f"<tr class='{f.severity}'><td><span class='sev'>{f.severity}</span></td>"
            f"<td class='where'>{html.escape(f.code)}</td>"
            f"<td>{html.escape(f.message)}<div class='hint'>{html.escape(f.hint)}</div></td>"
            f"<td>{_culprits(analysis, f.services, f.messages)}</td><td>{where}</td></tr>"
        )
    return (
        "<table><thead><tr><th>severity</th><th>rule</th><th>finding</th><th>about</th><th>declared at</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table>"
        + f"<p>{len(analysis.errors)} errors, {len(analysis.warnings)} warnings</p>"
    )


def render_html(analysis: Analysis, *, queries: str = "fold", live: dict[str, Any] | None = None) -> str:
    """The page as text; needs Graphviz for the drawing (raises :class:`GraphvizMissing` without it).

    ``live``: ``{"url": "live.json", "interval": 2.0}`` when the page is served with live data.

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import analyze
    >>> render_html(analyze(SystemSpec(services=(ServiceSpec("orders"),))))[:15]  # doctest: +SKIP
    '<!doctype html>'
    """
    title = analysis.name or "choreo system"
    data = json.dumps(page_data(analysis, live), separators=(",", ":")).replace("</", "<\\/")
    live_status = "<span class='status live' id='live-status'>live: waiting for the mesh</span>" if live else ""
    return (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{html.escape(title)}: choreography</title>\n<style>{_asset('page.css')}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1>\n<p class='summary'>{html.escape(analysis.summary())}</p></header>\n"
        "<div class='toolbar'><input id='search' type='search' placeholder='find a service or message' "
        "aria-label='find a service or message'> <button id='zoom-in' title='zoom in'>+</button>"
        "<button id='zoom-out' title='zoom out'>&minus;</button><button id='actual' title='natural size'>1:1</button>"
        f"<button id='fit' title='the whole drawing'>fit</button> <span class='status' id='status'></span> {live_status}</div>\n"
        f"<div class='layout'><div id='viewport'>\n{_svg(analysis, queries)}\n</div>\n<aside id='details' class='quiet'></aside></div>\n"
        f"<section><h2>Findings</h2>\n{_findings(analysis)}\n"
        f"<h2>Flows</h2>\n<pre>{html.escape(render_flows(analysis))}</pre></section>\n"
        f"<footer>generated by choreo {__version__}; this page fetches nothing"
        + (" but live.json from the command that serves it" if live else "")
        + "</footer>\n"
        f"<script type='application/json' id='choreo-data'>{data}</script>\n<script>{_asset('page.js')}</script>\n"
        "</body>\n</html>\n"
    )
