"""``choreo top``: every service and instance of the mesh, its rates, in-flight work and lag.

How this works: a *sample* is every live node's ``stats`` answer (plain counters and gauges,
see ``Engine.snapshot``). Rates come from the difference between two samples of the same node
incarnation, divided by the time between them as that node's own clock measured it, so they
are not skewed by how long the question took to travel. :func:`table` computes one view from
two samples; :func:`to_json` is the stable ``choreo-top/1`` document of ``--json``;
:func:`render_text` the terminal table, redrawn in place (plain ANSI) by the command.

Columns: ``IN/s`` messages received per second (ingestion), ``DONE/s`` processed per second,
``INFLT`` envelopes sent and not yet acknowledged, ``LAG`` received and not yet processed (with
the busiest partitions), ``REDELIV`` retransmissions, ``DEDUP`` duplicates dropped, ``BP-WAIT``
emits that waited for credit, ``REFUSED`` invalid input refused (malformed, oversized, unknown
types: the reasons are in ``--json``), ``DLQ`` dead letters stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..terminal import Style, plural
from .mesh import MeshNode, discover, gather

__all__ = ["Sample", "sample", "table", "to_json", "render_text", "FORMAT", "NODE_FIELDS"]

FORMAT = "choreo-top/1"

#: Per node in ``--json`` (services[].nodes[] and clients[]); rates are null without a previous sample.
NODE_FIELDS = {
    "node": "instance name",
    "endpoint": "tcp://HOST:PORT",
    "incarnation": "16 hex digits",
    "state": "alive | suspect | leaving (as the seed sees it)",
    "received": "counter: messages received for its handlers",
    "processed": "counter: messages finished (handled, refused or dead-lettered)",
    "received_per_s": "ingestion rate",
    "processed_per_s": "processing rate",
    "in_flight": "envelopes sent and not yet acknowledged (or waiting for credit)",
    "in_handler": "messages in a handler now",
    "lag": "messages received and not yet processed (sum over partitions)",
    "lag_by_partition": '{"PARTITION": lag}',
    "redelivered": "counter: retransmissions",
    "dedup_hits": "counter: duplicates acknowledged without running the handler",
    "backpressure_waits": "counter: emits/sends that waited for credit",
    "backpressure_errors": "counter: emits/sends that raised Backpressure",
    "failed_attempts": "counter: handler attempts that raised",
    "dead_letters": "dead letters stored now",
    "dead_lettered": "counter: messages sent to the dead-letter store",
    "refused": '{"reason": count}',
    "refused_total": "counter: invalid input refused, all reasons",
}
_COUNTERS = ("received", "processed", "redelivered", "dedup_hits", "backpressure_waits", "backpressure_errors",
             "failed_attempts", "dead_lettered")  # fmt: skip


@dataclass
class Sample:
    """Every live node's ``stats`` at one moment (and the nodes that did not answer)."""

    time: float
    nodes: list[tuple[MeshNode, dict[str, Any]]]
    unreachable: list[dict[str, str]]


def sample(seed: str, timeout: float = 5.0, previous: Sample | None = None) -> Sample:
    """Ask the seed who is in the mesh, then every live node for its ``stats`` (those that did
    not answer the ``previous`` sample with a short deadline: see :func:`~choreo.observe.mesh.gather`)."""
    nodes = discover(seed, timeout)
    now = time.time()
    got, failed = [], []
    silent = {u["endpoint"] for u in previous.unreachable} if previous is not None else set()
    for node, answer in gather(nodes, "stats", timeout=timeout, quick=silent):
        if isinstance(answer, Exception):
            failed.append({"node": node.name, "endpoint": node.endpoint, "error": str(answer)})
        else:
            got.append((node, answer))
    return Sample(now, got, failed)


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str) -> float | None:
    if before is None:
        return None
    dt = float(now.get("time", 0)) - float(before.get("time", 0))
    if dt <= 0:
        return None
    return max(float(now.get(key, 0)) - float(before.get(key, 0)), 0.0) / dt


def _node_row(node: MeshNode, stats: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    lag = {str(p): int(v) for p, v in sorted((int(p), v) for p, v in (stats.get("lag") or {}).items())}
    row: dict[str, Any] = {
        "node": stats.get("node", node.name),
        "endpoint": node.endpoint,
        "incarnation": stats.get("incarnation", ""),
        "state": node.state,
        "received_per_s": _rate(stats, before, "received"),
        "processed_per_s": _rate(stats, before, "processed"),
        "in_flight": int(stats.get("in_flight", 0)),
        "in_handler": int(stats.get("in_handler", 0)),
        "lag": sum(lag.values()),
        "lag_by_partition": lag,
        "dead_letters": int(stats.get("dead_letters", 0)),
        "refused": dict(stats.get("refused") or {}),
    }
    row["refused_total"] = sum(int(v) for v in row["refused"].values())
    for key in _COUNTERS:
        row[key] = int(stats.get(key, 0))
    return row


def table(current: Sample, previous: Sample | None = None) -> dict[str, Any]:
    """The ``choreo-top/1`` view of a sample; rates from ``previous`` (same incarnations only)."""
    before = {}
    if previous is not None:
        before = {s.get("incarnation"): s for _, s in previous.nodes}
    services: dict[str, list[dict[str, Any]]] = {}
    clients = []
    for node, stats in current.nodes:
        row = _node_row(node, stats, before.get(stats.get("incarnation")))
        service = stats.get("service")
        if service is None:
            clients.append(row)
        else:
            services.setdefault(service, []).append(row)
    out = []
    for name in sorted(services):
        rows = sorted(services[name], key=lambda r: r["node"])
        lag: dict[str, int] = {}
        for r in rows:
            for p, v in r["lag_by_partition"].items():
                lag[p] = lag.get(p, 0) + v
        rates_in = [r["received_per_s"] for r in rows]
        rates_done = [r["processed_per_s"] for r in rows]
        out.append(
            {
                "service": name,
                "instances": len(rows),
                "received_per_s": None if None in rates_in else sum(rates_in),  # type: ignore[arg-type]
                "processed_per_s": None if None in rates_done else sum(rates_done),  # type: ignore[arg-type]
                "in_flight": sum(r["in_flight"] for r in rows),
                "in_handler": sum(r["in_handler"] for r in rows),
                "lag": sum(lag.values()),
                "lag_by_partition": dict(sorted(lag.items(), key=lambda kv: int(kv[0]))),
                "redelivered": sum(r["redelivered"] for r in rows),
                "dedup_hits": sum(r["dedup_hits"] for r in rows),
                "backpressure_waits": sum(r["backpressure_waits"] for r in rows),
                "dead_letters": sum(r["dead_letters"] for r in rows),
                "refused": _sum_by_reason(r["refused"] for r in rows),
                "refused_total": sum(r["refused_total"] for r in rows),
                "nodes": rows,
            }
        )
    return {
        "format": FORMAT,
        "time": current.time,
        "interval": None if previous is None else round(current.time - previous.time, 3),
        "services": out,
        "clients": sorted(clients, key=lambda r: r["node"]),
        "unreachable": current.unreachable,
    }


def _sum_by_reason(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for reason, n in d.items():
            out[reason] = out.get(reason, 0) + int(n)
    return dict(sorted(out.items()))


def to_json(view: dict[str, Any]) -> dict[str, Any]:
    """The document ``choreo top --json`` prints (the view itself: plain data)."""
    return view


def _rate_text(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _lag_text(total: int, by_partition: dict[str, int], width: int = 3) -> str:
    if not total:
        return "0"
    top = sorted(by_partition.items(), key=lambda kv: -kv[1])[:width]
    more = "" if len(by_partition) <= width else f" +{len(by_partition) - width}"
    return f"{total} (" + " ".join(f"p{p}:{v}" for p, v in top) + more + ")"


def render_text(view: dict[str, Any], seed: str, style: Style = Style()) -> str:
    """The table: one bold line per service (its totals), then one line per instance.

    >>> v = table(Sample(0.0, [], []))
    >>> render_text(v, "tcp://127.0.0.1:7000").splitlines()[0].startswith("choreo top: tcp://127.0.0.1:7000")
    True
    """
    header = (f"{'SERVICE / INSTANCE':<26}{'IN/s':>8}{'DONE/s':>8}{'INFLT':>7}{'REDELIV':>8}{'DEDUP':>7}{'BP-WAIT':>8}"
              f"{'REFUSED':>8}{'DLQ':>5}  LAG")  # fmt: skip
    n_nodes = sum(s["instances"] for s in view["services"])
    stamp = time.strftime("%H:%M:%S", time.localtime(view["time"]))
    lines = [
        style.paint(f"choreo top: {seed}", "bold")
        + f"  {plural(len(view['services']), 'service')}, {plural(n_nodes, 'instance')}, "
        + f"{plural(len(view['clients']), 'client')}  {stamp}",
        "",
        style.paint(header, "bold"),
    ]

    def line(label: str, r: dict[str, Any], bold: bool) -> str:
        lag = _lag_text(r["lag"], r["lag_by_partition"])
        text = (
            f"{label:<26.26}{_rate_text(r['received_per_s']):>8}{_rate_text(r['processed_per_s']):>8}"
            f"{r['in_flight']:>7}{r['redelivered']:>8}{r['dedup_hits']:>7}{r['backpressure_waits']:>8}"
            f"{r['refused_total']:>8}{r['dead_letters']:>5}  "
        )
        lag_text = style.paint(lag, "yellow") if r["lag"] else lag
        if r["dead_letters"]:
            text = style.paint(text, "red")
        elif bold:
            text = style.paint(text, "bold")
        return text + lag_text

    for s in view["services"]:
        lines.append(line(s["service"], s, True))
        for r in s["nodes"]:
            state = "" if r["state"] == "alive" else f" ({r['state']})"
            lines.append(line(f"  {r['node']}{state}", r, False))
    for u in view["unreachable"]:
        lines.append(style.paint(f"  ! {u['node']} ({u['endpoint']}): {u['error']}", "yellow"))
    if view["interval"] is None:
        lines.append(style.paint("(rates need a second sample)", "dim"))
    return "\n".join(lines) + "\n"
