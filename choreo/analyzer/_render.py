"""One entry point for every output format: ``render(analysis, "svg")``.

How this works: :data:`FORMATS` maps each format name to its renderer, whether the output is
binary and the file suffixes that select it (``-o flow.svg`` means ``--format svg``). Text
formats return ``str``; ``png`` returns ``bytes``. ``queries="draw"`` draws query types as
nodes in the drawings (dot, svg, png, html) instead of folding them into their services. svg, png and html need Graphviz and raise
:class:`GraphvizMissing` with install instructions when it is absent.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ChoreoUsageError
from ._analysis import Analysis
from ._asyncapi import render_asyncapi
from ._dot import GraphvizMissing, render_dot, run_graphviz
from ._formats import FORMATS, Format, format_for_path
from ._html import render_html
from ._mermaid import render_mermaid
from ._nodelink import render_json
from ._text import Style, render_text

__all__ = ["FORMATS", "Format", "GraphvizMissing", "render", "format_for_path"]


def render(analysis: Analysis, fmt: str = "text", style: Style | None = None, *, queries: str = "fold") -> str | bytes:
    """The analysis in one format (see :data:`FORMATS`).

    >>> from choreo.spec import SystemSpec, ServiceSpec
    >>> from choreo.analyzer import analyze
    >>> render(analyze(SystemSpec(services=(ServiceSpec("orders"),))), "mermaid").splitlines()[0]
    'flowchart LR'
    """
    renderers: dict[str, Callable[[], str | bytes]] = {
        "text": lambda: render_text(analysis, style or Style()),
        "dot": lambda: render_dot(analysis, queries=queries),
        "svg": lambda: run_graphviz(render_dot(analysis, queries=queries), "svg").decode(),
        "png": lambda: run_graphviz(render_dot(analysis, queries=queries), "png"),
        "mermaid": lambda: render_mermaid(analysis),
        "json": lambda: render_json(analysis),
        "asyncapi": lambda: render_asyncapi(analysis),
        "html": lambda: render_html(analysis, queries=queries),
    }
    if fmt not in renderers:
        raise ChoreoUsageError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return renderers[fmt]()
