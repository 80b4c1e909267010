"""Prometheus metrics of one node, on an optional HTTP port: counters, gauges and latency histograms.

How this works: the node already keeps plain integer counters and gauges (``Node.stats().to_dict()``,
what ``choreo top`` reads too), and a ring of spans (:mod:`choreo.tracing`). A scrape takes one
snapshot and writes it out; while the port is open, a :class:`~choreo.latency.Latency` folds
the new spans into histograms of handler time, queue wait and flow time by message type and
handler, every second and at each scrape. Nothing is added to the message path, and a node
started without ``metrics_port`` opens no port and folds nothing. The HTTP side is a tiny asyncio
responder, ``GET /metrics`` and nothing else, bound to 127.0.0.1 unless told otherwise::

    node = Node(orders, metrics_port=9464)          # choreo run ... --metrics-port 9464
    $ curl -s http://127.0.0.1:9464/metrics | grep processed
    choreo_processed_total{service="orders",node="orders#1a2b3c"} 1042

Two formats: the Prometheus text format 0.0.4 by default, and OpenMetrics 1.0 when the scraper
asks for it (``Accept: application/openmetrics-text``, as Prometheus does), which adds an
exemplar to each histogram bucket: the trace id of the latest message in it, for
``choreo trace``. Every series carries ``service`` and ``node`` labels (``node``, not
``instance``, which Prometheus sets to the scraped address). Counters only grow: the few that the
node computes as a sum over its live channels (redeliveries) are kept monotonic here, across
peers that leave. ``docs/grafana-dashboard.json`` is a dashboard built on these series.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .latency import Histogram, Latency
    from .tracing import Tracer

__all__ = ["COUNTERS", "GAUGES", "HISTOGRAMS", "render", "MetricsServer", "CONTENT_TYPE", "OPENMETRICS_TYPE"]

log = logging.getLogger("choreo.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: scrapes answered at once; a connection beyond them gets a 503 at once, so that idle
#: connections (each held up to 5 s) cannot take the node's file descriptors
MAX_SCRAPES = 16

#: snapshot key -> (metric name, help). Each is a counter: it only grows.
COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("choreo_received_total", "Messages received for this node's handlers, duplicates included (ingestion)."),
    "processed": (
        "choreo_processed_total",
        "Messages finished here: handled and their effects acknowledged downstream, dead-lettered, refused as "
        "invalid, or acknowledged as duplicates.",
    ),
    "failed_attempts": ("choreo_failed_attempts_total", "Handler attempts that raised."),
    "dead_lettered": ("choreo_dead_lettered_total", "Messages moved to the dead-letter store after their retries."),
    "dedup_hits": ("choreo_dedup_hits_total", "Duplicates acknowledged without running the handler again."),
    "emitted": ("choreo_emitted_total", "Events this node published with emit()/try_emit(), outside handlers."),
    "sent": (
        "choreo_sent_total",
        "Commands sent with send() and queries asked with ask() by this node, including queries its handlers "
        "ask; commands a handler sends with ctx.send() are not counted here.",
    ),
    "redelivered": ("choreo_redelivered_total", "Envelopes retransmitted because no ack came in time."),
    "relieved": (
        "choreo_relieved_total",
        "Messages acknowledged before their outputs were, their senders keeping copies, because they held the "
        "credit of a channel that stalled (what their outputs waited for needed it).",
    ),
    "backpressure_waits": ("choreo_backpressure_waits_total", "Emits and sends that had to wait for credit."),
    "backpressure_errors": ("choreo_backpressure_errors_total", "Emits and sends that gave up with Backpressure."),
    "redials": (
        "choreo_redials_total",
        "Connections to a member dialled afresh because a probe of it got no answer of its own (a connection "
        "still backing off after a network cut, say).",
    ),
    "unrouted": ("choreo_unrouted_total", "Messages published while no declared service consumed their type (dropped)."),
    "frames_in": ("choreo_frames_in_total", "ZeroMQ frames received (from peers and from system-query clients)."),
    "frames_out": ("choreo_frames_out_total", "ZeroMQ frames sent to peers (data, acks, membership); answers to system queries excluded."),
}
#: snapshot key -> (metric name, help). Each is a gauge: it goes up and down.
GAUGES: dict[str, tuple[str, str]] = {
    "in_flight": ("choreo_in_flight", "Envelopes sent by this node and not yet acknowledged (or waiting for credit)."),
    "in_handler": ("choreo_in_handler", "Messages in a handler right now."),
    "kept": (
        "choreo_kept_copies",
        "Copies this node keeps of messages it sent that were acknowledged before their outputs were "
        "(handed over running with their partition, or relieving a stalled channel), until the receiver says "
        "the outputs are acknowledged.",
    ),
    "owed": (
        "choreo_owed_outputs",
        "Messages another node handled whose outputs this node owes (a standby of their partition, or its new "
        "owner), held until those outputs are acknowledged: it sends them should that node go first.",
    ),
    "dead_letters": ("choreo_dead_letters", "Messages in this node's dead-letter store."),
}
REFUSED = ("choreo_refused_total", "Invalid input refused, by reason (malformed, oversized, unknown_type, ...).")
LAG = ("choreo_consumer_lag", "Messages received and not yet processed, per key partition.")
PEERS = ("choreo_peers", "Nodes this node knows, by state.")
INFO = ("choreo_node_info", "Constant 1, labelled with this node's incarnation and endpoint.")
#: Latency histograms folded from the span ring (attribute of Latency, metric name, help).
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("handler", "choreo_handler_seconds",
     "Time inside the handler per attempt, by message type, handler and outcome (ok, error)."),
    ("queue", "choreo_queue_wait_seconds",
     "Time from a message's arrival to its first attempt's start (waiting for its key and the run queue)."),
    ("flow", "choreo_flow_seconds",
     "For a message from outside handled here (a flow's entry): arrival to everything it set in motion handled "
     "and acknowledged downstream, by entry type, handler and outcome."),
)  # fmt: skip
HANDLED = ("choreo_handled_total", "Handler attempts and duplicates by message type, handler and outcome (ok, error, duplicate).")
UNFOLDED = (
    "choreo_spans_unfolded_total",
    "Spans recorded but not folded into the histograms (overwritten in the span ring between folds, or above "
    "the per-fold bound): when above 0 the histograms and choreo_handled_total are a sample. A lower bound.",
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(base: str, extra: Iterable[tuple[str, str]] = ()) -> str:
    more = "".join(f',{k}="{_escape(v)}"' for k, v in extra)
    return "{" + base + more + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(
    snapshot: dict[str, Any],
    floor: dict[str, float] | None = None,
    latency: Latency | None = None,
    *,
    openmetrics: bool = False,
) -> str:
    """The exposition text of one node's statistics (:meth:`NodeStats.to_dict`, and of the histograms ``latency`` holds).

    ``floor`` (kept by the caller between scrapes) holds each counter's last exported value:
    a counter is never exported lower than it was. ``openmetrics``: the OpenMetrics 1.0 text,
    with exemplars, instead of the Prometheus text format 0.0.4.

    >>> text = render({"service": "orders", "node": "orders#1", "processed": 3, "lag": {5: 2}})
    >>> [line for line in text.splitlines() if line.startswith(("choreo_processed", "choreo_consumer_lag{"))]
    ['choreo_processed_total{service="orders",node="orders#1"} 3', 'choreo_consumer_lag{service="orders",node="orders#1",partition="5"} 2']
    """
    base = f'service="{_escape(str(snapshot.get("service") or "client"))}",node="{_escape(str(snapshot.get("node", "")))}"'
    lines: list[str] = []

    def family(name: str, help_text: str, kind: str) -> None:
        if openmetrics and kind == "counter":
            name = name.removesuffix("_total")
        elif openmetrics and kind == "info":
            name = name.removesuffix("_info")
        elif kind == "info":
            kind = "gauge"
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def monotonic(series: str, value: float) -> float:
        if floor is not None:
            value = max(value, floor.get(series, 0.0))
            floor[series] = value
        return value

    for key, (name, help_text) in COUNTERS.items():
        family(name, help_text, "counter")
        lines.append(f"{name}{_labels(base)} {_number(monotonic(name, float(snapshot.get(key, 0) or 0)))}")
    family(*REFUSED, "counter")
    refused = dict(snapshot.get("refused") or {})
    for reason in sorted(refused):
        series = f"{REFUSED[0]}{_labels(base, [('reason', reason)])}"
        lines.append(f"{series} {_number(monotonic(series, float(refused[reason])))}")
    for key, (name, help_text) in GAUGES.items():
        family(name, help_text, "gauge")
        lines.append(f"{name}{_labels(base)} {_number(snapshot.get(key, 0) or 0)}")
    family(*LAG, "gauge")
    for partition, value in sorted((int(p), v) for p, v in (snapshot.get("lag") or {}).items()):
        lines.append(f"{LAG[0]}{_labels(base, [('partition', str(partition))])} {_number(value)}")
    family(*PEERS, "gauge")
    states: dict[str, int] = {}
    for peer in (snapshot.get("peers") or {}).values():
        states[peer["state"]] = states.get(peer["state"], 0) + 1
    for state in sorted(states):
        lines.append(f"{PEERS[0]}{_labels(base, [('state', state)])} {states[state]}")
    family(*INFO, "info")
    info = [("incarnation", str(snapshot.get("incarnation", ""))), ("endpoint", str(snapshot.get("endpoint", "")))]
    lines.append(f"{INFO[0]}{_labels(base, info)} 1")
    if latency is not None:
        _render_latency(latency, base, lines, family, openmetrics)
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _render_latency(
    latency: Latency, base: str, lines: list[str], family: Callable[[str, str, str], None], openmetrics: bool
) -> None:
    from .latency import BUCKETS

    bounds = [repr(b) for b in BUCKETS] + ["+Inf"]
    label_names = {"handler": ("type", "handler", "outcome"), "queue": ("type", "handler"), "flow": ("type", "handler", "outcome")}
    for attr, name, help_text in HISTOGRAMS:
        family(name, help_text, "histogram")
        table: dict[tuple[str, ...], Histogram] = getattr(latency, attr)
        for key in sorted(table):
            h = table[key]
            extra = list(zip(label_names[attr], key))
            for i, (bound, total) in enumerate(zip(bounds, h.cumulative())):
                line = f"{name}_bucket{_labels(base, [*extra, ('le', bound)])} {total}"
                ex = h.exemplar(i) if openmetrics else None
                if ex is not None:
                    line += f' # {{trace_id="{ex.trace_id}"}} {round(ex.value, 9)!r} {ex.time:.3f}'
                lines.append(line)
            lines.append(f"{name}_count{_labels(base, extra)} {h.count}")
            lines.append(f"{name}_sum{_labels(base, extra)} {h.sum!r}")
    family(*HANDLED, "counter")
    for (mtype, handler, outcome), n in sorted(latency.handled.items()):
        lines.append(f"{HANDLED[0]}{_labels(base, [('type', mtype), ('handler', handler), ('outcome', outcome)])} {n}")
    family(*UNFOLDED, "counter")
    lines.append(f"{UNFOLDED[0]}{_labels(base)} {latency.unfolded}")


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: a free one), answered from ``snapshot()``.

    Start it inside the node's event loop (``await MetricsServer.start(...)``), ``close()`` it
    with the node. With a ``tracer`` (one that records spans), the server also folds the spans
    into latency histograms every ``fold_interval`` seconds and at each scrape, until closed.
    Each connection gets one answer and is closed; a client that sends nothing for 5 s, or a
    request head above 8 KiB, is dropped; beyond :data:`MAX_SCRAPES` connections at once, a new
    one is answered ``503`` and closed at once (counted in :attr:`turned_away`).

    >>> async def main():
    ...     server = await MetricsServer.start(lambda: {"node": "n#1", "processed": 1})
    ...     text = server.scrape()
    ...     server.close()
    ...     return text.count("choreo_processed_total")
    >>> asyncio.run(main())
    3
    """

    def __init__(
        self,
        server: asyncio.base_events.Server,
        snapshot: Callable[[], dict[str, Any]],
        tracer: Tracer | None = None,
        fold_interval: float = 1.0,
    ) -> None:
        self._server = server
        self._snapshot = snapshot
        self._floor: dict[str, float] = {}
        sock = server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.latency: Latency | None = None
        self._fold_handle: asyncio.TimerHandle | None = None
        self._fold_interval = fold_interval
        self._open = 0  # connections being answered
        self.turned_away = 0  # connections answered 503: MAX_SCRAPES were open
        if tracer is not None and tracer.enabled:
            from .latency import Latency

            self.latency = Latency(tracer)
            self._fold_handle = asyncio.get_running_loop().call_later(fold_interval, self._fold_tick)

    @classmethod
    async def start(
        cls,
        snapshot: Callable[[], dict[str, Any]],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tracer: Tracer | None = None,
        fold_interval: float = 1.0,
    ) -> MetricsServer:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be an integer in 0..65535, got {port!r}")
        if not fold_interval > 0:
            raise ValueError(f"fold_interval must be > 0 seconds, got {fold_interval}")
        holder: list[MetricsServer] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._answer(reader, writer)

        server = await asyncio.start_server(handle, host, port, reuse_address=True, limit=8192)
        holder.append(cls(server, snapshot, tracer, fold_interval))
        return holder[0]

    def _fold_tick(self) -> None:
        try:
            self._fold(self._snapshot())
        except Exception:  # a bug in folding must not stop the node, nor the next fold
            log.exception("metrics: error folding spans into histograms")
        self._fold_handle = asyncio.get_running_loop().call_later(self._fold_interval, self._fold_tick)

    def _fold(self, snapshot: dict[str, Any]) -> None:
        if self.latency is not None:
            self.latency.fold(snapshot)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def scrape(self, openmetrics: bool = False) -> str:
        """The current exposition text (what ``GET /metrics`` returns); OpenMetrics when asked."""
        snapshot = self._snapshot()
        self._fold(snapshot)
        return render(snapshot, self._floor, self.latency, openmetrics=openmetrics)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_SCRAPES:
            self.turned_away += 1
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
                         b"Connection: close\r\n\r\n")
            writer.close()  # (what is buffered goes out; nothing here waits on this client)
            return
        self._open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"only GET /metrics\n", "text/plain"
            elif path not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"choreo serves /metrics only\n", "text/plain"
            else:
                openmetrics = b"application/openmetrics-text" in _header(head, b"accept")
                body = self.scrape(openmetrics).encode()
                status, ctype = "200 OK", OPENMETRICS_TYPE if openmetrics else CONTENT_TYPE
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await asyncio.wait_for(writer.drain(), 5.0)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # a bug in rendering must not take the node down: log it, close the connection
            log.exception("metrics: error answering a scrape")
        finally:
            self._open -= 1
            writer.close()

    def close(self) -> None:
        self._server.close()
        if self._fold_handle is not None:
            self._fold_handle.cancel()
            self._fold_handle = None
        if self.latency is not None:
            self.latency.close()


def _header(head: bytes, name: bytes) -> bytes:
    """The value of one header of a request head (lower-cased name), or b""."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().lower()
    return b""
