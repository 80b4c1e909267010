"""The output formats, their file suffixes and whether they are binary: a table with no imports.

How this works: the CLI needs the format names to build its argument parser, and building the
parser must stay cheap (``choreo --help`` should not import networkx), so the table lives here,
apart from the renderers that ``_render`` dispatches to.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORMATS", "Format", "format_for_path"]


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    suffixes: tuple[str, ...]
    binary: bool = False


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("text", "flow trees and findings for the terminal (colour on a TTY)", (".txt",)),
        Format("dot", "Graphviz DOT source", (".dot", ".gv")),
        Format("svg", "SVG drawn by Graphviz", (".svg",)),
        Format("png", "PNG drawn by Graphviz", (".png",), binary=True),
        Format("mermaid", "Mermaid flowchart for Markdown", (".mmd", ".mermaid")),
        Format(
            "json", "node-link JSON of the graph, with findings; 'choreo graph FILE.json' reads it back", (".json",)
        ),
        Format("asyncapi", "AsyncAPI 3.0.0 document (JSON)", ()),
        Format("html", "one self-contained page: drawing, findings, flows", (".html", ".htm")),
    )
}


def format_for_path(path: str) -> str | None:
    """The format a file name asks for: ``format_for_path("flow.svg") == "svg"``; None when unknown."""
    lowered = path.lower()
    for f in FORMATS.values():
        if any(lowered.endswith(s) for s in f.suffixes):
            return f.name
    return None
