"""``choreo traces``: the recent flows of the whole mesh, to find the one to look at.

How this works: every node answers ``traces`` with a summary of each trace its span ring holds
(:meth:`choreo.tracing.Tracer.flows`): when it first received and last finished a step of it,
how many steps, which message types and keys, the entry message when the flow entered the mesh
there, and the steps that failed. :func:`merge` puts the summaries of one trace id together
(earliest start, latest end, services, failures from every node); :func:`select` filters them
the way the command's options ask; :func:`render_text` prints one line per flow, each starting
with the id that ``choreo trace`` takes::

    found = collect("tcp://127.0.0.1:7400")
    for flow in select(found.flows, failed=True):
        print(flow.trace_id, flow.status, flow.error)

A flow is ``running`` while a node still works on one of its messages, ``error`` when a step
failed for good (its last attempt raised and it is not being retried), else ``ok``. Its
duration runs from the first step received to the last finished, on the nodes' clocks (see
:mod:`choreo.tracing`). Only what the span rings still hold is listed: the oldest flows of a busy
mesh have left them (``NodeConfig.span_ring``), and a flow whose entry step has left shows ``?``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..terminal import Style, short_name
from .mesh import discover, gather

__all__ = ["Flow", "Found", "collect", "merge", "select", "to_json", "render_text", "FORMAT", "FLOW_FIELDS"]

FORMAT = "choreo-traces/1"

#: One flow in ``choreo traces --json`` (``traces[]``); every key is always present.
FLOW_FIELDS: dict[str, str] = {
    "trace_id": "32 hex digits: give it to 'choreo trace'",
    "status": '"ok" | "error" (a step failed for good) | "running" (a node still works on it)',
    "started": "wall-clock seconds: the first step received",
    "finished": "wall-clock seconds: the last step finished",
    "duration_ms": "finished - started",
    "steps": "handler steps (a message in a handler on one instance), duplicates not counted",
    "duplicates": "copies acknowledged without running their handler (retries, redeliveries)",
    "services": "services the flow went through, sorted",
    "types": "message types of its steps, sorted",
    "entry": '{"type", "handler", "service"} of the step that came from outside, or null when its span is gone',
    "failed": '[{"type", "handler", "service", "instance", "error"}]: steps whose last attempt failed',
    "keys": "ordering keys of its steps (at most 32 per node), sorted",
}


@dataclass
class Flow:
    """One trace as the mesh's span rings remember it."""

    trace_id: str
    started: float
    finished: float
    steps: int = 0
    duplicates: int = 0
    services: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    entries: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    running: bool = False

    @property
    def status(self) -> str:
        if self.running:
            return "running"
        return "error" if self.failed else "ok"

    @property
    def duration(self) -> float:
        return max(self.finished - self.started, 0.0)

    @property
    def entry(self) -> dict[str, Any] | None:
        """The earliest step that came from outside (None when no node still holds its span)."""
        return min(self.entries, key=lambda e: e["received"]) if self.entries else None

    @property
    def error(self) -> str | None:
        """``TYPE in service.handler: error`` of the first failed step, or None."""
        if not self.failed:
            return None
        f = self.failed[0]
        return f"{f['type']} in {f['service']}.{short_name(f['handler'])}: {f['error']}"


@dataclass
class Found:
    """The flows of the mesh, and what could not be asked."""

    flows: list[Flow]
    nodes: int
    spans: int
    unreachable: list[dict[str, str]]


def merge(answers: Iterable[Mapping[str, Any]]) -> list[Flow]:
    """The nodes' ``traces`` answers -> one :class:`Flow` per trace id, most recent start first.

    >>> a = {"flows": [dict(trace_id="ab" * 16, first=10.0, last=10.5, steps=1, duplicates=0, types=["Go"],
    ...     keys=[], entry={"type": "Go", "handler": "go", "service": "a", "received": 10.0}, failed=[],
    ...     running=False, service="a")]}
    >>> b = {"flows": [dict(trace_id="ab" * 16, first=10.1, last=10.9, steps=2, duplicates=0, types=["Went"],
    ...     keys=["k"], entry=None, failed=[], running=False, service="b")]}
    >>> [(f.steps, sorted(f.services), round(f.duration, 3)) for f in merge([a, b])]
    [(3, ['a', 'b'], 0.9)]
    """
    flows: dict[str, Flow] = {}
    for answer in answers:
        for s in answer.get("flows", ()):
            flow = flows.get(s["trace_id"])
            if flow is None:
                flow = flows[s["trace_id"]] = Flow(s["trace_id"], s["first"], s["last"])
            flow.started = min(flow.started, s["first"])
            flow.finished = max(flow.finished, s["last"])
            flow.steps += s["steps"]
            flow.duplicates += s["duplicates"]
            if s["steps"] and s.get("service"):
                flow.services.add(s["service"])
            flow.types.update(s["types"])
            flow.keys.update(s["keys"])
            if s["entry"] is not None:
                flow.entries.append(s["entry"])
            flow.failed.extend(s["failed"])
            flow.running = flow.running or s["running"]
    return sorted(flows.values(), key=lambda f: (f.started, f.trace_id), reverse=True)


def select(
    flows: Iterable[Flow],
    *,
    failed: bool = False,
    slow_ms: float | None = None,
    type: str | None = None,  # noqa: A002 - the command's option is --type
    key: str | None = None,
    limit: int | None = None,
) -> list[Flow]:
    """The flows that failed / took at least ``slow_ms`` / have a step of ``type`` / of ``key``."""
    out = [
        f
        for f in flows
        if (not failed or f.status == "error")
        and (slow_ms is None or f.duration * 1000.0 >= slow_ms)
        and (type is None or type in f.types)
        and (key is None or key in f.keys)
    ]
    return out if limit is None else out[:limit]


def collect(seed: str, timeout: float = 5.0, per_node: int = 1000) -> Found:
    """Ask every live node of the mesh for its recent traces and merge them."""
    nodes = discover(seed, timeout)
    answers, unreachable, spans = [], [], 0
    for node, answer in gather(nodes, "traces", {"limit": per_node}, timeout):
        if isinstance(answer, Exception):
            unreachable.append({"node": node.name, "endpoint": node.endpoint, "error": str(answer)})
        else:
            answers.append(answer)
            spans += int(answer.get("spans", 0))
    return Found(merge(answers), len(nodes), spans, unreachable)


def to_json(found: Found, flows: list[Flow]) -> dict[str, Any]:
    """The ``choreo-traces/1`` document (see :data:`FLOW_FIELDS`)."""
    return {
        "format": FORMAT,
        "traces": [
            {
                "trace_id": f.trace_id,
                "status": f.status,
                "started": f.started,
                "finished": f.finished,
                "duration_ms": round(f.duration * 1000.0, 3),
                "steps": f.steps,
                "duplicates": f.duplicates,
                "services": sorted(f.services),
                "types": sorted(f.types),
                "entry": None if f.entry is None else {k: f.entry[k] for k in ("type", "handler", "service")},
                "failed": list(f.failed),
                "keys": sorted(f.keys),
            }
            for f in flows
        ],
        "matched": len(flows),
        "remembered": len(found.flows),
        "nodes": {"asked": found.nodes, "unreachable": list(found.unreachable)},
    }


_STATUS_COLOUR = {"ok": "green", "error": "red", "running": "cyan"}


def _took(seconds: float) -> str:
    ms = seconds * 1000.0
    if ms >= 10_000:
        return f"{seconds:.1f}s"
    return f"{ms:.0f}ms" if ms >= 100 else f"{ms:.1f}ms"


def render_text(found: Found, flows: list[Flow], peer: str, style: Style = Style(), shown_of: int | None = None) -> str:
    """One line per flow, newest first: id, start time, status, duration, steps, entry, services.

    >>> f = Flow("ab" * 16, 0.0, 0.0133, steps=12, services={"api", "orders"},
    ...          entries=[{"type": "PlaceOrder", "handler": "place_order", "service": "api", "received": 0.0}])
    >>> render_text(Found([f], 2, 12, []), [f], "tcp://127.0.0.1:7400").splitlines()[1].split()[2:7]
    ['ok', '13.3ms', '12', 'PlaceOrder', '->']
    """
    lines = [style.paint(f"{'TRACE ID':<32}  {'STARTED':<12}  {'STATUS':<7} {'TOOK':>8} {'STEPS':>6}  ENTRY -> SERVICES", "bold")]
    for f in flows:
        stamp = time.strftime("%H:%M:%S", time.localtime(f.started)) + f"{f.started % 1:.3f}"[1:]
        entry = f.entry
        head = f"{entry['type']} -> {entry['service']}.{short_name(entry['handler'])}" if entry else "?"
        others = sorted(f.services - ({entry["service"]} if entry else set()))
        status = style.paint(f"{f.status:<7}", _STATUS_COLOUR[f.status])
        line = (f"{f.trace_id}  {stamp:<12}  {status} {_took(f.duration):>8} {f.steps:>6}  {style.paint(head, 'bold')}"
                + (f" -> {', '.join(others)}" if others else ""))  # fmt: skip
        if f.duplicates:
            line += style.paint(f"  = {f.duplicates} duplicate{'' if f.duplicates == 1 else 's'} not run again", "magenta")
        if f.error:
            line += style.paint(f"  {'✗' if style.unicode else 'x'} {f.error}", "red")
        lines.append(line)
    matching = len(flows) if shown_of is None else shown_of
    if not flows:
        lines.append(style.paint("(no flow matches)" if found.flows else "(no flow in the nodes' span rings yet)", "dim"))
    lines.append("")
    lines.append(
        f"{len(flows)} of {matching} matching flow{'' if matching == 1 else 's'} shown; the span rings of "
        f"{found.nodes} node{'' if found.nodes == 1 else 's'} remember {len(found.flows)}. "
        f"One in full: choreo trace TRACE_ID --peer {peer}"
    )
    for u in found.unreachable:
        lines.append(style.paint(f"! no answer from {u['node']} ({u['endpoint']}): {u['error']}", "yellow"))
    return "\n".join(lines) + "\n"
