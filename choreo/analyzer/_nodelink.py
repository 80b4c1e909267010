"""JSON output: the flow graph in networkx's node-link form, plus the findings, and back.

How this works: the graph's attributes are already plain JSON data (see ``_graph``), so
:func:`to_node_link` only lists nodes (``id`` plus attributes) and edges (``source``, ``target``,
``key`` plus attributes) the way ``networkx.node_link_data(g, edges="edges")`` does; networkx
reads the document too. The findings ride along under ``findings`` for CI tools and are ignored
on the way back: they are derived, and recomputed from the graph. Written by hand rather than
through networkx so the format does not change with the networkx version.
"""

from __future__ import annotations

import json
from typing import Any

import networkx as nx

from ..errors import ChoreoUsageError
from ._analysis import Analysis
from ._graph import GRAPH_FORMAT

__all__ = ["to_node_link", "from_node_link", "render_json"]


def to_node_link(g: nx.MultiDiGraph) -> dict[str, Any]:
    """The graph as node-link data (JSON-ready).

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import build_graph
    >>> data = to_node_link(build_graph(SystemSpec(services=(ServiceSpec("orders"),))))
    >>> data["nodes"][0]["id"], data["multigraph"]
    ('service:orders', True)
    """
    return {
        "directed": True,
        "multigraph": True,
        "graph": dict(g.graph),
        "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)],
        "edges": [{"source": u, "target": v, "key": k, **d} for u, v, k, d in g.edges(keys=True, data=True)],
    }


def from_node_link(data: dict[str, Any]) -> nx.MultiDiGraph:
    """The graph back from :func:`to_node_link` data (``from_node_link(to_node_link(g))`` equals ``g``)."""
    if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
        raise ChoreoUsageError("not node-link data: expected an object with 'nodes' and 'edges'")
    graph_attrs = data.get("graph", {})
    if graph_attrs.get("format") != GRAPH_FORMAT:
        raise ChoreoUsageError(
            f"node-link data of format {graph_attrs.get('format')!r}, expected {GRAPH_FORMAT!r}: "
            "write it with 'choreo graph TARGET --format json'"
        )
    g: nx.MultiDiGraph = nx.MultiDiGraph(**graph_attrs)
    for node in data["nodes"]:
        attrs = dict(node)
        g.add_node(attrs.pop("id"), **attrs)
    for edge in data["edges"]:
        attrs = dict(edge)
        u, v, k = attrs.pop("source"), attrs.pop("target"), attrs.pop("key")
        g.add_edge(u, v, key=k, **attrs)
    return g


def render_json(analysis: Analysis) -> str:
    """Node-link JSON of the graph, with the findings under ``findings``."""
    doc = to_node_link(analysis.graph)
    doc["findings"] = [f.to_dict() for f in analysis.findings]
    if analysis.observed is not None and analysis.observation is not None:
        obs = analysis.observation
        doc["observed"] = {
            "spans": obs.spans,
            "unattributed": obs.unattributed,
            "first": obs.first,
            "last": obs.last,
            "edges": [e.to_dict() for e in analysis.observed],
        }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
