"""ZeroMQ transport: one ROUTER in, one DEALER out per peer, driven by the asyncio loop.

Every node binds one ROUTER socket; everything addressed to it (data, acks, membership, system
queries from clients) arrives there, so the node reads exactly one socket. To send, a node
keeps one DEALER connected to each peer's ROUTER. Replies to clients (the CLI) go back on the
connection they came on, through the ROUTER.

The ROUTER's file descriptor is edge-triggered: the reader callback drains the socket with
``recv(NOBLOCK)`` until ``zmq.Again`` (bounded per call, then rescheduled, so one busy peer
cannot starve the loop), and re-checks after its own sends on the ROUTER, which can swallow an
edge. Per PERFORMANCE.md this is far cheaper than ``zmq.asyncio``: one callback per burst, not
one await per message. Sends never block: a full pipe (the peer is slow or gone) parks frames
in a bounded queue retried at every tick; the credit windows upstream keep that rare.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable

import zmq

from .endpoints import advertised, check_endpoint

__all__ = ["ZmqTransport"]

log = logging.getLogger("choreo.transport")
MAX_PARKED = 100_000  # frames per peer waiting for a full ZeroMQ pipe; beyond, drop (acks recover)
READ_BUDGET = 256  # frames per reader callback before yielding to the loop


class ZmqTransport:
    """Sockets of one node. ``on_frame(data, identity)`` gets every frame, ``on_idle()`` each drain."""

    def __init__(
        self,
        bind: str,
        *,
        hwm: int = 10_000,
        max_bytes: int = 256 << 20,
        advertise: str | None = None,
        context: zmq.Context | None = None,
        seeds: Iterable[str] = (),
    ) -> None:
        check_endpoint(bind, "bind", bind=True)
        if advertise is not None:
            check_endpoint(advertise, "advertise")
        seeds = [check_endpoint(seed, "peer") for seed in seeds]
        self.context = context or zmq.Context.instance()
        self.hwm = hwm
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, hwm)
        self.router.setsockopt(zmq.SNDHWM, hwm)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        try:
            self.router.bind(bind)
        except zmq.ZMQError as exc:
            self.router.close(0)
            raise OSError(f"cannot bind {bind}: {exc}") from None
        bound = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint = advertised(bound, seeds, advertise)  # a wildcard bind: the interface peers reach
        self.dealers: dict[str, zmq.Socket] = {}
        self.parked: dict[str, deque[bytes]] = {}
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_frame: Callable[[bytes, bytes | None], None] | None = None
        self._on_idle: Callable[[], None] | None = None
        self._read_scheduled = False
        self.closed = False

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_frame: Callable[[bytes, bytes | None], None],
        on_idle: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._on_frame = on_frame
        self._on_idle = on_idle
        loop.add_reader(self.router.getsockopt(zmq.FD), self._readable)
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled and self._loop is not None and not self.closed:
            self._read_scheduled = True
            self._loop.call_soon(self._readable)

    def _readable(self) -> None:
        self._read_scheduled = False
        if self.closed:
            return
        assert self._on_frame is not None and self._on_idle is not None
        router = self.router
        on_frame = self._on_frame
        for _ in range(READ_BUDGET):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) == 2:
                on_frame(parts[1], parts[0])
            else:
                # a peer that is not a choreo node: let the engine count the bad frame
                on_frame(b"" if len(parts) < 2 else b"\x00multipart", parts[0] if parts else None)
        else:
            self._schedule_read()  # more may be waiting: continue after others had a turn
        self._on_idle()

    # -- sending -------------------------------------------------------------------------------

    def connect(self, endpoint: str) -> None:
        if endpoint in self.dealers or self.closed:
            return
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, 16)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.connect(endpoint)
        self.dealers[endpoint] = sock

    def disconnect(self, endpoint: str) -> None:
        sock = self.dealers.pop(endpoint, None)
        self.parked.pop(endpoint, None)
        if sock is not None:
            sock.close(0)

    def send(self, endpoint: str, frame: bytes) -> None:
        if self.closed:
            return
        parked = self.parked.get(endpoint)
        if parked:
            self._park(endpoint, parked, frame)
            return
        sock = self.dealers.get(endpoint)
        if sock is None:
            self.connect(endpoint)
            sock = self.dealers[endpoint]
        try:
            sock.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
        except zmq.Again:
            self._park(endpoint, self.parked.setdefault(endpoint, deque()), frame)

    def _park(self, endpoint: str, parked: deque[bytes], frame: bytes) -> None:
        if len(parked) >= MAX_PARKED:
            parked.popleft()
            self.dropped += 1
        parked.append(frame)

    def retry_parked(self) -> None:
        """Try again to send frames that met a full pipe (called at every tick)."""
        for endpoint, parked in list(self.parked.items()):
            sock = self.dealers.get(endpoint)
            if sock is None:
                del self.parked[endpoint]
                continue
            while parked:
                try:
                    sock.send(parked[0], zmq.NOBLOCK)
                except zmq.Again:
                    break
                parked.popleft()
            if not parked:
                del self.parked[endpoint]

    def reply(self, identity: bytes, frame: bytes) -> None:
        """Answer a client on the connection its request came on."""
        try:
            self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            log.warning("could not answer a client: %s", exc)
        self._schedule_read()  # a send on the ROUTER may have consumed the read edge

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.router.getsockopt(zmq.FD))
            except (ValueError, zmq.ZMQError):
                pass
        for sock in self.dealers.values():
            sock.close(0)
        self.dealers.clear()
        self.parked.clear()
        self.router.close(0)
