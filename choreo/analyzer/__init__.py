"""The choreography made visible: a flow graph built from declarations, checked and drawn.

The analyzer reads declarations only (a :class:`~choreo.spec.SystemSpec`, from imported
modules, a JSON file or a running mesh); it never imports the node runtime or the transport.
The pieces, each in its own module:

- ``_graph``: the networkx MultiDiGraph of services and message types, and back to the spec;
- ``_flows``: the entry points and what each sets in motion (depth, fan-out);
- ``_lints``: the rules and their findings (severity, culprits, module:line);
- ``_analysis``: the three together, as renderers want them;
- ``_load``: modules/packages, JSON files and ``--peer`` as sources of a SystemSpec;
- ``_text``, ``_dot``, ``_mermaid``, ``_nodelink``, ``_asyncapi``, ``_html``: the renderers,
  dispatched by ``_render``;
- ``commands``: the ``choreo graph``, ``choreo lint`` and ``choreo flows`` subcommands.

Example::

    from choreo.analyzer import analyze, load_spec, render
    spec, name = load_spec("examples.shop")
    analysis = analyze(spec, name=name)
    print(render(analysis, "text"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - the names below are loaded lazily by __getattr__
    from ._analysis import Analysis, analyze
    from ._flows import Flow, Hop, Step, entry_points, find_flows
    from ._graph import GRAPH_FORMAT, Location, build_graph, graph_to_spec, message_id, service_id
    from ._lints import RULES, Finding, Rule, lint
    from ._load import LoadError, load_spec
    from ._nodelink import from_node_link, to_node_link
    from ._render import FORMATS, GraphvizMissing, render

# Loaded on first use, so that the CLI (which imports choreo.analyzer.commands to build its
# parser) does not pay for networkx on `choreo --help` or on other subcommands.
_EXPORTS = {
    "_analysis": ("Analysis", "analyze"),
    "_flows": ("Flow", "Hop", "Step", "entry_points", "find_flows"),
    "_graph": ("GRAPH_FORMAT", "Location", "build_graph", "graph_to_spec", "message_id", "service_id"),
    "_lints": ("RULES", "Finding", "Rule", "lint"),
    "_load": ("LoadError", "load_spec"),
    "_nodelink": ("from_node_link", "to_node_link"),
    "_render": ("FORMATS", "GraphvizMissing", "render"),
}
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [  # the same names as _EXPORTS, spelled out for tools (a test keeps the two equal)
    "Analysis", "FORMATS", "Finding", "Flow", "GRAPH_FORMAT", "GraphvizMissing", "Hop", "LoadError", "Location",
    "RULES", "Rule", "Step", "analyze", "build_graph", "entry_points", "find_flows", "from_node_link",
    "graph_to_spec", "lint", "load_spec", "message_id", "render", "service_id", "to_node_link",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
