"""Prometheus metrics of one node, on an optional HTTP port: computed from counters at scrape time.

How this works: the node already keeps plain integer counters and gauges (``Node.stats().to_dict()``,
what ``choreo top`` reads too). Nothing is added to the message path: a scrape takes one
snapshot and writes it in the Prometheus text exposition format (version 0.0.4). The HTTP side
is a tiny asyncio responder, ``GET /metrics`` and nothing else, bound to 127.0.0.1 unless told
otherwise; a node started without ``metrics_port`` opens no port at all::

    node = Node(orders, metrics_port=9464)          # choreo run ... --metrics-port 9464
    $ curl -s http://127.0.0.1:9464/metrics | grep processed
    choreo_processed_total{service="orders",node="orders#1a2b3c"} 1042

Every series carries ``service`` and ``node`` labels (``node``, not ``instance``, which
Prometheus sets to the scraped address). Counters only grow: the few that the node computes as
a sum over its live channels (redeliveries) are kept monotonic here, across peers that leave.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["COUNTERS", "GAUGES", "render", "MetricsServer", "CONTENT_TYPE"]

log = logging.getLogger("choreo.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: snapshot key -> (metric name, help). Each is a counter: it only grows.
COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("choreo_received_total", "Messages received for this node's handlers (ingestion)."),
    "processed": ("choreo_processed_total", "Messages whose handling finished: handled, refused or dead-lettered."),
    "failed_attempts": ("choreo_failed_attempts_total", "Handler attempts that raised."),
    "dead_lettered": ("choreo_dead_lettered_total", "Messages moved to the dead-letter store after their retries."),
    "dedup_hits": ("choreo_dedup_hits_total", "Duplicates acknowledged without running the handler again."),
    "emitted": ("choreo_emitted_total", "Events this node published from outside handlers."),
    "sent": ("choreo_sent_total", "Commands and queries this node sent from outside handlers."),
    "redelivered": ("choreo_redelivered_total", "Envelopes retransmitted because no ack came in time."),
    "backpressure_waits": ("choreo_backpressure_waits_total", "Emits and sends that had to wait for credit."),
    "backpressure_errors": ("choreo_backpressure_errors_total", "Emits and sends that gave up with Backpressure."),
    "unrouted": ("choreo_unrouted_total", "Events published while no service subscribed to them."),
    "frames_in": ("choreo_frames_in_total", "ZeroMQ frames received."),
    "frames_out": ("choreo_frames_out_total", "ZeroMQ frames sent."),
}
#: snapshot key -> (metric name, help). Each is a gauge: it goes up and down.
GAUGES: dict[str, tuple[str, str]] = {
    "in_flight": ("choreo_in_flight", "Envelopes sent by this node and not yet acknowledged (or waiting for credit)."),
    "in_handler": ("choreo_in_handler", "Messages in a handler right now."),
    "dead_letters": ("choreo_dead_letters", "Messages in this node's dead-letter store."),
}
REFUSED = ("choreo_refused_total", "Invalid input refused, by reason (malformed, oversized, unknown_type, ...).")
LAG = ("choreo_consumer_lag", "Messages received and not yet processed, per key partition.")
PEERS = ("choreo_peers", "Nodes this node knows, by state.")
INFO = ("choreo_node_info", "Constant 1, labelled with this node's incarnation and endpoint.")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(base: str, extra: Iterable[tuple[str, str]] = ()) -> str:
    more = "".join(f',{k}="{_escape(v)}"' for k, v in extra)
    return "{" + base + more + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(snapshot: dict[str, Any], floor: dict[str, float] | None = None) -> str:
    """The Prometheus text exposition of one node's statistics (:meth:`NodeStats.to_dict`).

    ``floor`` (kept by the caller between scrapes) holds each counter's last exported value:
    a counter is never exported lower than it was.

    >>> text = render({"service": "orders", "node": "orders#1", "processed": 3, "lag": {5: 2}})
    >>> [line for line in text.splitlines() if line.startswith(("choreo_processed", "choreo_consumer_lag{"))]
    ['choreo_processed_total{service="orders",node="orders#1"} 3', 'choreo_consumer_lag{service="orders",node="orders#1",partition="5"} 2']
    """
    base = f'service="{_escape(str(snapshot.get("service") or "client"))}",node="{_escape(str(snapshot.get("node", "")))}"'
    lines: list[str] = []

    def family(name: str, help_text: str, kind: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    for key, (name, help_text) in COUNTERS.items():
        value = float(snapshot.get(key, 0) or 0)
        if floor is not None:
            value = max(value, floor.get(name, 0.0))
            floor[name] = value
        family(name, help_text, "counter")
        lines.append(f"{name}{_labels(base)} {_number(value)}")
    family(*REFUSED, "counter")
    refused = dict(snapshot.get("refused") or {})
    for reason in sorted(refused):
        series = f"{REFUSED[0]}{_labels(base, [('reason', reason)])}"
        value = float(refused[reason])
        if floor is not None:
            value = max(value, floor.get(series, 0.0))
            floor[series] = value
        lines.append(f"{series} {_number(value)}")
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
    family(*INFO, "gauge")
    info = [("incarnation", str(snapshot.get("incarnation", ""))), ("endpoint", str(snapshot.get("endpoint", "")))]
    lines.append(f"{INFO[0]}{_labels(base, info)} 1")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: a free one), answered from ``snapshot()``.

    Start it inside the node's event loop (``await MetricsServer.start(...)``), ``close()`` it
    with the node. Each connection gets one answer and is closed; a client that sends nothing
    for 5 s, or a request head above 8 KiB, is dropped.
    """

    def __init__(self, server: asyncio.base_events.Server, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._server = server
        self._snapshot = snapshot
        self._floor: dict[str, float] = {}
        sock = server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]

    @classmethod
    async def start(cls, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be an integer in 0..65535, got {port!r}")
        holder: list[MetricsServer] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._answer(reader, writer)

        server = await asyncio.start_server(handle, host, port, reuse_address=True, limit=8192)
        holder.append(cls(server, snapshot))
        return holder[0]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def scrape(self) -> str:
        """The current exposition text (what ``GET /metrics`` returns)."""
        return render(self._snapshot(), self._floor)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"only GET /metrics\n", "text/plain"
            elif path not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"choreo serves /metrics only\n", "text/plain"
            else:
                status, body, ctype = "200 OK", self.scrape().encode(), CONTENT_TYPE
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
            writer.close()

    def close(self) -> None:
        self._server.close()
