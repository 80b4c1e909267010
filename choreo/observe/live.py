"""The live map: the flow graph's HTML page, served with the running mesh's numbers on it.

How this works: ``choreo graph --peer tcp://HOST:PORT --live`` draws the page once (the
analyzer's HTML output) and serves it on 127.0.0.1 with one more path, ``/live.json``, which
the page polls every ``interval`` seconds. Each poll asks every live node of the mesh for its
``rates`` (the handler attempts of the last few seconds from its span ring, and its lag,
in-flight envelopes, dead letters and refusals) and turns them into labels keyed by the ids of
the drawing's edges and services (:func:`labels`):

* a ``handles`` edge (a type to the service that handles it): messages per second, and errors
  per second when attempts failed (drawn red);
* an ``emits``/``sends`` edge: messages of that type per second (the busiest consumer's rate);
* a service: its lag, dead letters and refusals, red when it has dead letters or errors.

Only the numbers travel; the page stays the same page. Nothing here reads the runtime: the mesh
is asked through :mod:`choreo.client`, like ``choreo top``::

    live = LiveMap("tcp://127.0.0.1:7400", edges)       # edges: [(u, v, relation), ...] drawn
    live.collect()                                      # {"time", "edges": {...}, "nodes": {...}, "note"}
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .mesh import discover, gather

# how long a stopping server waits for the mesh query in flight (discover, then one query of
# every node: two timeouts of the CLI's default 5 s, and some)
QUERY_DRAIN_SECONDS = 20.0

__all__ = ["LiveMap", "labels", "serve"]


def _per_s(value: float) -> str:
    return f"{value:.0f}/s" if value >= 10 else f"{value:.1f}/s"


def labels(answers: Iterable[dict[str, Any]], edges: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """The page's labels from the nodes' ``rates`` answers, for the drawn ``edges`` (u, v, relation).

    >>> answer = {"service": "orders", "covered": 2.0, "lag": 3, "dead_letters": 1, "refused": 0,
    ...           "handled": [{"type": "Go", "handler": "go", "outcome": "ok", "count": 10},
    ...                       {"type": "Go", "handler": "go", "outcome": "error", "count": 2}]}
    >>> doc = labels([answer], [("message:Go", "service:orders", "handles")])
    >>> doc["edges"]["edge:message:Go->service:orders:handles"], doc["nodes"]["service:orders"]["text"]
    ({'text': '5.0/s, 1.0 err/s', 'bad': True}, 'lag 3, 1 dead letter, 1.0 err/s')
    """
    ok: dict[tuple[str, str], float] = {}  # (type, service) -> handled per second
    errors: dict[tuple[str, str], float] = {}
    services: dict[str, dict[str, float]] = {}
    for a in answers:
        service = a.get("service")
        if service is None:
            continue
        covered = max(float(a.get("covered") or 0.0), 1e-3)
        totals = services.setdefault(service, {"lag": 0, "dead_letters": 0, "refused": 0, "errors": 0.0})
        for k in ("lag", "dead_letters", "refused"):
            totals[k] += a.get(k, 0)
        for h in a.get("handled", ()):
            key = (h["type"], service)
            rate = h["count"] / covered
            if h["outcome"] == "error":
                errors[key] = errors.get(key, 0.0) + rate
                totals["errors"] += rate
            elif h["outcome"] == "ok":
                ok[key] = ok.get(key, 0.0) + rate
    per_type: dict[str, float] = {}
    for (mtype, _), rate in ok.items():
        per_type[mtype] = max(per_type.get(mtype, 0.0), rate)
    out_edges: dict[str, dict[str, Any]] = {}
    for u, v, relation in edges:
        edge = f"edge:{u}->{v}:{relation}"
        if relation == "handles":
            key = (u.split(":", 1)[1], v.split(":", 1)[1])
            rate, bad = ok.get(key, 0.0), errors.get(key, 0.0)
            if rate or bad:
                parts = ([_per_s(rate)] if rate else []) + ([_per_s(bad).replace("/s", " err/s")] if bad else [])
                out_edges[edge] = {"text": ", ".join(parts), "bad": bool(bad)}
        elif v.startswith("message:") and per_type.get(v.split(":", 1)[1]):
            out_edges[edge] = {"text": _per_s(per_type[v.split(":", 1)[1]]), "bad": False}
    nodes = {}
    for service, t in services.items():
        bits = [f"lag {int(t['lag'])}"]
        if t["dead_letters"]:
            bits.append(f"{int(t['dead_letters'])} dead letter{'' if t['dead_letters'] == 1 else 's'}")
        if t["refused"]:
            bits.append(f"{int(t['refused'])} refused")
        if t["errors"]:
            bits.append(f"{_per_s(t['errors']).replace('/s', ' err/s')}")
        nodes[f"service:{service}"] = {"text": ", ".join(bits), "bad": bool(t["dead_letters"] or t["errors"])}
    return {"edges": out_edges, "nodes": nodes}


class LiveMap:
    """Collects the labels of the live map from the mesh reached through ``peer``."""

    def __init__(self, peer: str, edges: Iterable[tuple[str, str, str]], *, window: float = 5.0, timeout: float = 5.0) -> None:
        self.peer = peer
        self.edges = list(edges)
        self.window = window
        self.timeout = timeout
        self.silent: set[str] = set()  # endpoints that did not answer the last refresh (asked briefly)

    def collect(self) -> dict[str, Any]:
        """One refresh: ``{"time", "edges", "nodes", "note"}`` (``note`` says what could not be read)."""
        note = None
        answers = []
        try:
            nodes = discover(self.peer, self.timeout)
        except Exception as exc:  # the seed went away: say so on the page, keep serving
            nodes = []
            note = f"cannot read the mesh at {self.peer}: {exc}"
        missing, silent = [], set()
        for node, answer in gather(nodes, "rates", {"window": self.window}, self.timeout, quick=self.silent):
            if isinstance(answer, Exception):
                missing.append(node.name)
                silent.add(node.endpoint)
            else:
                answers.append(answer)
        self.silent = silent
        if missing:
            note = f"no answer from {', '.join(missing)}"
        return {"time": time.time(), **labels(answers, self.edges), "note": note}


def serve(page: str, collect: Callable[[], dict[str, Any]], port: int = 0, host: str = "127.0.0.1",
          ready: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:  # fmt: skip
    """Serve ``page`` at ``/`` and ``collect()`` at ``/live.json`` until ``stop`` is set (or Ctrl-C)."""
    body = page.encode()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", body)
            elif path == "/live.json":
                with lock:  # one mesh query at a time, however many tabs poll
                    doc = collect()
                self._send(200, "application/json", json.dumps(doc).encode())
            elif path == "/favicon.ico":
                self._send(204, "image/x-icon", b"")  # no icon, and no error in the browser's console
            else:
                self._send(404, "text/plain", b"choreo graph --live serves / and /live.json\n")

        def _send(self, code: int, ctype: str, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the page polls
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    try:
        url = f"http://{host}:{server.server_address[1]}/"
        if ready is not None:
            ready(url)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        stop = stop or threading.Event()
        try:
            while not stop.wait(0.5):  # short waits: Ctrl-C is seen at once
                pass
        finally:
            server.shutdown()  # no request starts after this
            # a mesh query still in flight (its timeouts bound it) ends before this returns, rather
            # than in a daemon thread while the interpreter tears down around its open socket
            if lock.acquire(timeout=QUERY_DRAIN_SECONDS):
                lock.release()
    finally:
        server.server_close()
