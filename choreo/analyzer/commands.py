"""The analyzer's subcommands: ``choreo graph``, ``choreo lint`` and ``choreo flows``.

How this works: :func:`register` adds the three subparsers to the CLI's parser and sets each
one's ``func``; ``choreo.cli`` calls it like every other command module's ``register``. Building
the parsers imports nothing heavy (the format table only); the analyzer itself is imported when a
command runs. Every command reads its TARGET the same way (module or package name, ``.json``
file, or ``--peer``), and returns the process exit code: ``lint`` 1 when a finding at or above
``--fail-on`` exists, otherwise 0; a target that cannot be read raises, and the CLI exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import ChoreoUsageError
from ..keys_commands import add_client_key_options, use_client_keys
from ._formats import FORMATS, format_for_path

if TYPE_CHECKING:  # pragma: no cover
    from ._analysis import Analysis
    from ..terminal import Style

__all__ = ["register", "run_graph", "run_lint", "run_flows"]

_SOURCE_HELP = (
    "a module or package to import (examples.shop: every choreo.Service it declares), "
    "or a .json file written by 'choreo graph --format json'"
)


def register(subparsers: Any) -> None:
    """Add ``graph``, ``lint`` and ``flows`` to the CLI (``subparsers`` from ``add_subparsers()``).

    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="choreo")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["lint", "examples.shop"]).func.__name__
    'run_lint'
    """
    graph = subparsers.add_parser(
        "graph",
        help="draw the flow graph of a system",
        description="Build the flow graph of a system from its declarations and render it: a tree of flows and "
        "the findings (text), or a drawing (dot, svg, png, mermaid, html), or data (json, asyncapi).",
    )
    _source_arguments(graph)
    graph.add_argument(
        "-f",
        "--format",
        choices=list(FORMATS),
        default=None,
        help="output format (default: from the -o suffix, else text): "
        + "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()),
    )
    _output_arguments(graph)
    graph.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="RULE[,RULE]",
        help="leave out findings of these rules (see 'choreo lint --rules')",
    )
    graph.add_argument(
        "--observed",
        action="store_true",
        help="with --peer: compare with the recent spans of every node of the mesh; mark declared edges never "
        "seen and observed edges nobody declared (text, json, dot, svg, png, html). With a TARGET too, the "
        "declarations come from TARGET and the observations from the mesh",
    )
    graph.add_argument(
        "--spans", type=int, default=10_000, metavar="N", help="with --observed: recent spans read per node (10000)"
    )
    graph.add_argument(
        "--queries", choices=["fold", "draw"], default="fold",
        help="in drawings (dot, svg, png, html): fold queries into the services that answer and ask them "
        "(default), or draw them as nodes",
    )  # fmt: skip
    graph.add_argument(
        "--live", action="store_true",
        help="with --peer: serve the HTML page on 127.0.0.1 with the mesh's rates, lag and errors on the drawing, "
        "refreshed every --interval seconds, until Ctrl-C",
    )  # fmt: skip
    graph.add_argument("--port", type=int, default=0, help="with --live: the port to serve on (default: a free one)")
    graph.add_argument("--interval", type=float, default=2.0, help="with --live: seconds between refreshes (2)")
    graph.set_defaults(func=run_graph)

    lint = subparsers.add_parser(
        "lint",
        help="check a system's declarations; exit 1 on errors",
        description="Check the declarations of a system: commands without or with several owners, events nobody "
        "consumes, subscriptions nobody feeds, cycles, query handlers with side effects, missing key fields, "
        "keyed types from several producers. Exit status: 0 clean, 1 findings at or above --fail-on, 2 the "
        "target could not be read.",
    )
    _source_arguments(lint, required=False)
    lint.add_argument("-f", "--format", choices=["text", "json"], default="text", help="output format (default: text)")
    _output_arguments(lint)
    lint.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="RULE[,RULE]",
        help="leave out findings of these rules (repeatable, comma-separated)",
    )
    lint.add_argument(
        "--fail-on",
        choices=["error", "warning"],
        default="error",
        help="lowest severity that makes the exit status 1 (default: error)",
    )
    lint.add_argument("--rules", action="store_true", help="list the rules with their severity, and exit")
    lint.set_defaults(func=run_lint)

    flows = subparsers.add_parser(
        "flows",
        help="list what each entry point sets in motion",
        description="For each entry point (a command or event that no handler produces, so it comes from outside), "
        "the tree of handlers and messages it reaches, with its depth, fan-out, services and messages.",
    )
    _source_arguments(flows)
    flows.add_argument("-f", "--format", choices=["text", "json"], default="text", help="output format (default: text)")
    _output_arguments(flows)
    flows.add_argument("--entry", metavar="TYPE", help="only the flow that starts at this message type")
    flows.set_defaults(func=run_flows)


def _source_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("target", nargs="?", metavar="TARGET", help=_SOURCE_HELP)
    parser.add_argument(
        "--peer",
        metavar="tcp://HOST:PORT",
        help="read the declarations of a running mesh from one of its nodes instead of TARGET "
        "(KEY@tcp://HOST:PORT in a secure mesh)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for --peer (default: 5)")
    add_client_key_options(parser)


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    parser.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour text output: auto (on a terminal, unless NO_COLOR is set), always, never",
    )


# ---- running -----------------------------------------------------------------------------------


def _analysis(args: argparse.Namespace, ignore: list[str] | None = None) -> Analysis:
    from ._analysis import analyze
    from ._load import load_spec

    observed = getattr(args, "observed", False)
    if args.target is None and args.peer is None:
        raise ChoreoUsageError(f"choreo {args.command}: give a TARGET (module, package or .json file) or --peer")
    if observed and args.peer is None:
        raise ChoreoUsageError("choreo graph --observed reads spans from a running mesh: give --peer tcp://HOST:PORT")
    if args.target is not None and args.peer is not None and not observed:
        raise ChoreoUsageError(f"choreo {args.command}: give a TARGET or --peer, not both (unless --observed)")
    if args.target is not None and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory are importable
    if args.peer is not None:
        use_client_keys(args)  # --keys/--as: the key to ask a secure mesh with
    if args.target is not None:
        spec, name = load_spec(args.target, timeout=args.timeout)
    else:
        spec, name = load_spec(peer=args.peer, timeout=args.timeout)
    analysis = analyze(spec, name=name, ignore=ignore or ())
    if observed:
        analysis = _with_observations(analysis, args)
    return analysis


def _with_observations(analysis: Analysis, args: argparse.Namespace) -> Analysis:
    """The analysis with observed-vs-declared edges, from the recent spans of every live node."""
    import dataclasses
    import importlib

    from ._observed import compare, observe

    mesh = importlib.import_module("choreo.observe.mesh")  # the CLI's client side: only for --observed
    try:
        nodes = mesh.discover(args.peer, args.timeout)
    except Exception as exc:
        raise ChoreoUsageError(f"could not read the mesh at {args.peer}: {type(exc).__name__}: {exc}") from exc
    spans, failed = [], []
    for node, answer in mesh.gather(nodes, "spans", {"limit": max(args.spans, 1)}, args.timeout):
        if isinstance(answer, Exception):
            failed.append(node.name)
        else:
            spans.extend(answer)
    if failed:
        print(f"choreo: warning: no spans from {', '.join(failed)}", file=sys.stderr)
    obs = observe(spans, analysis.graph)
    return dataclasses.replace(analysis, observed=compare(analysis.graph, obs), observation=obs)


def _codes(values: list[str]) -> list[str]:
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def _style(args: argparse.Namespace, stream: IO[str]) -> Style:
    from ..terminal import style_for

    return style_for(stream, args.color, to_file=bool(args.output), sample="├─└│↻")


def _write(args: argparse.Namespace, content: str | bytes) -> None:
    if args.output:
        if isinstance(content, bytes):
            Path(args.output).write_bytes(content)
        else:
            Path(args.output).write_text(content, encoding="utf-8")
        print(f"choreo: wrote {args.output}", file=sys.stderr)
        return
    if isinstance(content, bytes):
        if sys.stdout.isatty():
            raise ChoreoUsageError("png is binary: write it to a file with -o FILE.png")
        sys.stdout.flush()
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(content)
        sys.stdout.flush()


def run_graph(args: argparse.Namespace) -> int:
    """``choreo graph TARGET [--format F] [-o FILE]``: render the graph; exit 0."""
    from ._render import render

    if args.live:
        return _serve_live(args)
    fmt = _graph_format(args)
    if args.observed and fmt in ("mermaid", "asyncapi"):
        raise ChoreoUsageError(f"--observed is shown in text, json, dot, svg, png and html output, not {fmt}")
    analysis = _analysis(args, ignore=_codes(args.ignore))
    _write(args, render(analysis, fmt, _style(args, sys.stdout), queries=args.queries))
    return 0


def _serve_live(args: argparse.Namespace) -> int:
    """``choreo graph --peer P --live``: the HTML page with the mesh's numbers, served until Ctrl-C."""
    import importlib

    from ._graph import drawn_edges
    from ._html import render_html

    if args.peer is None:
        raise ChoreoUsageError("choreo graph --live shows a running mesh: give --peer tcp://HOST:PORT")
    if args.output or args.format not in (None, "html"):
        raise ChoreoUsageError("choreo graph --live serves the HTML page: leave out -o and --format")
    if not args.interval > 0:
        raise ChoreoUsageError(f"--interval must be > 0 seconds, got {args.interval}")
    if not 0 <= args.port <= 65535:
        raise ChoreoUsageError(f"--port must be in 0..65535, got {args.port}")
    analysis = _analysis(args, ignore=_codes(args.ignore))
    live = importlib.import_module("choreo.observe.live")  # the CLI's client side: only for --live
    edges = [(u, v, rel) for u, v, rel, _ in drawn_edges(analysis.graph)]
    collector = live.LiveMap(args.peer, edges, window=max(5.0, 2 * args.interval), timeout=args.timeout)
    page = render_html(analysis, queries=args.queries, live={"url": "live.json", "interval": args.interval})

    def ready(url: str) -> None:
        print(f"serving the live map of {args.peer} at {url} (Ctrl-C stops)", flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop it, as they do `choreo demo` and `choreo up`: also when it was
    # started with SIGINT ignored (a background job of a script inherits that; Python then
    # leaves it ignored)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        live.serve(page, collector.collect, port=args.port, ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _graph_format(args: argparse.Namespace) -> str:
    """--format, else the one ``-o FILE``'s suffix names, else text; a suffix that names no format
    (or another one than --format) is refused rather than written in the wrong format."""
    if not args.output:
        return args.format or "text"
    by_suffix = format_for_path(args.output)
    suffixes = ", ".join(s for f in FORMATS.values() for s in f.suffixes)
    if by_suffix is None and args.format is None:
        raise ChoreoUsageError(
            f"cannot tell the format of {args.output!r} from its name: end it with one of {suffixes}, or give --format"
        )
    if by_suffix is not None and args.format is not None and by_suffix != args.format and FORMATS[args.format].suffixes:
        raise ChoreoUsageError(f"-o {args.output} names {by_suffix} output, but --format says {args.format}")
    return args.format or by_suffix or "text"


def run_lint(args: argparse.Namespace) -> int:
    """``choreo lint TARGET``: print the findings; exit 1 when one is at or above ``--fail-on``."""
    if args.rules:
        from ._lints import RULES

        width = max(len(code) for code in RULES) + 2
        _write(args, "".join(f"{r.code:<{width}}{r.severity:<9}{r.summary}\n" for r in RULES.values()))
        return 0
    analysis = _analysis(args, ignore=_codes(args.ignore))
    if args.format == "json":
        doc = {
            "target": analysis.name,
            "errors": len(analysis.errors),
            "warnings": len(analysis.warnings),
            "findings": [f.to_dict() for f in analysis.findings],
        }
        _write(args, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    else:
        from ._text import render_findings

        style = _style(args, sys.stdout)
        head = style.paint(f"{analysis.name}: {analysis.summary()}", "bold")
        _write(args, f"{head}\n\n{render_findings(analysis, style)}")
    failing = analysis.findings if args.fail_on == "warning" else analysis.errors
    return 1 if failing else 0


def run_flows(args: argparse.Namespace) -> int:
    """``choreo flows TARGET [--entry TYPE]``: print each entry point's flow; exit 0."""
    analysis = _analysis(args)
    entries = [f.entry for f in analysis.flows]
    if args.entry is not None and args.entry not in entries:
        raise ChoreoUsageError(
            f"{args.entry} is not an entry point of {analysis.name}; entry points: {', '.join(entries) or 'none'}"
        )
    if args.format == "json":
        flows = [f.to_dict() for f in analysis.flows if args.entry in (None, f.entry)]
        _write(args, json.dumps({"target": analysis.name, "flows": flows}, indent=2, ensure_ascii=False) + "\n")
    else:
        from ._text import render_flows

        style = _style(args, sys.stdout)
        head = style.paint(f"{analysis.name}: {analysis.summary()}", "bold")
        _write(args, f"{head}\n\n{render_flows(analysis, style, only=args.entry)}")
    return 0
