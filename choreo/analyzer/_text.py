"""Terminal output: the flow trees and the findings table, in colour when asked.

How this works: a flow is printed as a tree that alternates messages and the handlers they
reach, drawn with box characters (or ASCII when the terminal cannot show them). Colour is plain
ANSI, switched on by the caller (the CLI turns it on for a TTY unless ``NO_COLOR`` is set), so
files and pipes get clean text.
"""

from __future__ import annotations

from ..terminal import Style, short_name
from ._analysis import Analysis
from ._flows import Flow, Hop, Step
from ._lints import Finding

__all__ = ["Style", "render_text", "render_flows", "render_findings", "render_observed"]

_KIND_COLOUR = {"event": "yellow", "command": "green", "query": "magenta", "service": "cyan"}
_SEVERITY_COLOUR = {"error": "red", "warning": "yellow"}


def render_text(analysis: Analysis, style: Style = Style()) -> str:
    """The whole picture: a summary line, every flow, the findings.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import analyze
    >>> a = analyze(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", module="shop", line=3),)),)),
    ...     name="shop", ignore=["unknown-type"])
    >>> print(render_text(a))
    shop: 1 service, 1 message type (1 command), 1 entry point
    <BLANKLINE>
    PlaceOrder (command, from outside): depth 1, fan-out 1, 1 service, 1 message
    └─ orders.place  shop:3
    <BLANKLINE>
    no findings
    <BLANKLINE>
    """
    title = f"{analysis.name}: " if analysis.name else ""
    head = style.paint(f"{title}{analysis.summary()}", "bold")
    observed = "" if analysis.observed is None else "\n" + render_observed(analysis, style)
    return f"{head}\n\n{render_flows(analysis, style)}{render_findings(analysis, style)}{observed}"


_OBSERVED_MARK = {"seen": ("✓", "+", "green"), "never-seen": ("·", ".", "dim"), "undeclared": ("!", "!", "red")}


def render_observed(analysis: Analysis, style: Style = Style()) -> str:
    """Observed vs declared (``choreo graph --observed``): every edge seen, never seen or undeclared.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import analyze
    >>> from choreo.analyzer._observed import observe, compare
    >>> import dataclasses
    >>> a = analyze(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", emits=("OrderPlaced",)),)),)))
    >>> obs = observe([dict(msg_id="1" * 32, cause_id="0" * 32, type="PlaceOrder", service="orders",
    ...     handler="place", received=1.0)], a.graph)
    >>> print(render_observed(dataclasses.replace(a, observed=compare(a.graph, obs), observation=obs)))
    observed vs declared: 1 span read; 1 edge seen, 1 never seen, 0 undeclared
      · never seen    -  orders --emits--> OrderPlaced  (place)
      ✓ seen          1  PlaceOrder --handles--> orders  (place)
    <BLANKLINE>
    """
    edges = analysis.observed or []
    obs = analysis.observation
    counts = {s: sum(1 for e in edges if e.status == s) for s in ("seen", "never-seen", "undeclared")}
    spans = obs.spans if obs else 0
    head = (
        f"observed vs declared: {spans} span{'' if spans == 1 else 's'} read; "
        f"{counts['seen']} edge{'' if counts['seen'] == 1 else 's'} seen, {counts['never-seen']} never seen, "
        f"{counts['undeclared']} undeclared"
    )
    lines = [style.paint(head, "bold")]
    order = {"undeclared": 0, "never-seen": 1, "seen": 2}
    for e in sorted(edges, key=lambda e: order[e.status]):
        uni, ascii_mark, colour = _OBSERVED_MARK[e.status]
        mark = uni if style.unicode else ascii_mark
        status = e.status.replace("-", " ")
        count = str(e.count) if e.count else "-"
        who = f"  ({', '.join(short_name(h) for h in e.handlers)})" if e.handlers else ""
        lines.append(style.paint(f"  {mark} {status:<11}{count:>4}  {e.label(analysis.graph)}{who}", colour))
    if obs and obs.unattributed:
        lines.append(style.paint(f"  ({obs.unattributed} produced messages whose producer's span was not found)", "dim"))
    return "\n".join(lines) + "\n"


def render_flows(analysis: Analysis, style: Style = Style(), only: str | None = None) -> str:
    """Every flow as a tree (or the one starting at ``only``), each followed by a blank line."""
    flows = [f for f in analysis.flows if only is None or f.entry == only]
    if not flows:
        return "no entry points: every command and event is produced by some handler\n\n" if only is None else ""
    return "".join(render_flow(f, style) + "\n" for f in flows)


def render_flow(flow: Flow, style: Style = Style()) -> str:
    """One flow: a header with its measures, then the tree of what it reaches."""
    n_s, n_m = len(flow.services), len(flow.messages)
    head = (
        f"{style.paint(flow.entry, 'bold', _KIND_COLOUR.get(flow.kind, 'bold'))} ({flow.kind}, from {flow.source}): "
        f"depth {flow.depth}, fan-out {flow.fan_out}, "
        f"{n_s} service{'' if n_s == 1 else 's'}, {n_m} message{'' if n_m == 1 else 's'}"
    )
    lines = [head]
    if not flow.root.steps:
        lines.append(style.branch[1] + _orphan(flow.root, style))
    _steps(flow.root, "", lines, style)
    return "\n".join(lines) + "\n"


def _orphan(hop: Hop, style: Style) -> str:
    if hop.kind == "event":
        return style.paint("nobody consumes it", "yellow")
    return style.paint("no owner", "red", "bold")


def _steps(hop: Hop, prefix: str, lines: list[str], style: Style) -> None:
    mid, last, cont, blank = style.branch
    for i, step in enumerate(hop.steps):
        end = i == len(hop.steps) - 1
        lines.append(prefix + (last if end else mid) + _handler_line(step, style))
        child_prefix = prefix + (blank if end else cont)
        for j, out in enumerate(step.outputs):
            out_end = j == len(step.outputs) - 1
            lines.append(child_prefix + (last if out_end else mid) + _message_line(step, out, style))
            _steps(out, child_prefix + (blank if out_end else cont), lines, style)


def _handler_line(step: Step, style: Style) -> str:
    h = step.handler
    bits = [style.paint(h.label, "bold", "cyan")]
    if h.key_field:
        bits.append(f"by {h.key_field}")
    if h.broadcast:
        bits.append("broadcast")
    if h.module:
        bits.append(style.paint(h.location.where, "dim"))
    return "  ".join(bits)


def _message_line(step: Step, hop: Hop, style: Style) -> str:
    verb = "emits" if hop.message in step.handler.emits else ("asks" if hop.kind == "query" else "sends")
    text = f"{verb} {style.paint(hop.message, _KIND_COLOUR.get(hop.kind, 'bold'))} ({hop.kind})"
    if hop.repeat == "cycle":
        return f"{text}  {style.paint(f'{style.loop} cycle: {hop.message} is already upstream', 'yellow')}"
    if hop.repeat == "seen":
        return f"{text}  {style.paint('(continues above)', 'dim')}"
    if not hop.steps:
        return f"{text}  {_orphan(hop, style)}"
    return text


def render_findings(analysis: Analysis, style: Style = Style()) -> str:
    """The findings as a table (severity, rule, finding; then where and what to do), and a count.

    >>> from choreo.spec import SystemSpec, ServiceSpec, HandlerSpec
    >>> from choreo.analyzer import analyze
    >>> a = analyze(SystemSpec(services=(ServiceSpec("orders", handlers=(
    ...     HandlerSpec("place", "command", "PlaceOrder", sends=("Charge",), module="shop", line=3),)),)))
    >>> print(render_findings(a).splitlines()[1])
    error     no-owner      command Charge has no owner: sent by orders.place
    """
    return format_findings(analysis.findings, style)


def format_findings(findings: list[Finding], style: Style = Style()) -> str:
    """:func:`render_findings` for a plain list of findings."""
    if not findings:
        return style.paint("no findings", "green") + "\n"
    width = max(len("RULE"), *(len(f.code) for f in findings)) + 2
    pad = " " * (10 + width)
    lines = [style.paint(f"{'SEVERITY':<10}{'RULE':<{width}}FINDING", "bold")]
    for f in findings:
        sev = style.paint(f"{f.severity:<10}", "bold", _SEVERITY_COLOUR[f.severity])
        lines.append(f"{sev}{f.code:<{width}}{f.message}")
        for loc in f.locations:
            lines.append(f"{pad}{style.paint('at', 'dim')} {loc.what}  {style.paint(loc.where, 'dim')}")
        if f.hint:
            lines.append(f"{pad}{style.paint('fix:', 'dim')} {f.hint}")
    n_err = sum(1 for f in findings if f.severity == "error")
    n_warn = len(findings) - n_err
    count = f"{n_err} error{'' if n_err == 1 else 's'}, {n_warn} warning{'' if n_warn == 1 else 's'}"
    lines += ["", style.paint(count, "bold", "red" if n_err else "yellow")]
    return "\n".join(lines) + "\n"
