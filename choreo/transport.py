"""ZeroMQ transport: one ROUTER in, DEALERs out on demand, driven by the asyncio loop.

Every node binds one ROUTER socket; everything addressed to it (data, acks, membership, system
queries from clients) arrives there, so the node reads exactly one socket. To send, a node
dials a DEALER to a peer's ROUTER when it first sends there: it keeps sockets only to the peers
it sends data to or probes. A DEALER unused for ``idle_close`` seconds is closed (checked once a
second, :meth:`ZmqTransport.sweep`), and at most ``max_peers`` are open: dialling one more
closes the least recently used (its queued frames are lost and counted; the engine's
retransmissions and membership's probes recover them), so a mesh larger than the limit works,
redialling as it goes. The ZeroMQ context's socket limit is set to match. Replies to clients
(the CLI) go back on the connection they came on, through the ROUTER. DEALERs are never read
(nothing but replies to clients travels ROUTER -> DEALER, and nodes are not clients), so they
accept almost nothing.

The ROUTER's file descriptor is edge-triggered: the reader callback drains the socket while
``ZMQ_EVENTS`` says a message is waiting (bounded per call, then rescheduled, so one busy peer
cannot starve the loop), and re-checks after its own sends on the ROUTER, which can swallow an
edge. Per PERFORMANCE.md this is far cheaper than ``zmq.asyncio``: one callback per burst, not
one await per message. It asks ``ZMQ_EVENTS`` rather than reading until ``zmq.Again``: the
exception pyzmq raises for that last empty read costs 2.5 times the question (3.9 against
1.5 µs here). The reads, that question and the sends of frames under 64 KiB go through
:mod:`choreo._zmqio` (the same libzmq calls made from C, a quarter of pyzmq's cost per frame),
or through pyzmq where that module is not available or ``CHOREO_PURE=1``. Sends never block:
a full pipe (the peer is slow or gone) parks frames in a queue bounded in frames and bytes,
retried at every tick; the credit windows upstream keep that rare, and what overflows is
dropped and counted (acks and retransmission recover it).

**Security.** With a :class:`~choreo.trust.Security`, every socket speaks CURVE: the ROUTER is a
CURVE server with the node's key pair, a ZAP handler (pyzmq's ``zmq.auth`` thread authenticator,
in a ZeroMQ context of this transport's own) admits only the keys of the trusted directory and
sets each connection's User-Id to the key's name, and every DEALER is a CURVE client with the
node's key pair and the server key of the endpoint it dials, which it finds from the key name
the endpoint carries (``orders-1@tcp://10.0.0.5:7001``, see :mod:`choreo.wire`). The node
advertises itself as ``KEY@ADDRESS``. Everything between nodes is then encrypted and
authenticated; a connection without a trusted key never delivers a frame.

**What ``on_frame(data, identity, principal)`` is given.** ``principal`` is the name of the
trusted key the frame's connection authenticated with (libzmq reads it from the connection's
User-Id, per message: it cannot be forged by the peer), or None without security. ``identity``
is the ROUTER's routing id of the connection: the routing id the dialing DEALER chose. Every
choreo DEALER chooses a random, unguessable 17-byte id per (transport, dialled endpoint),
kept across its reconnects, so one node's connection to one peer has one identity for as long
as this transport lives (:meth:`renew_identity` draws new ones, for a new incarnation); another
node cannot learn it (under CURVE it travels encrypted; each dialled endpoint gets a
different one, so a peer cannot replay the id it sees elsewhere). Clients without a routing id
(the CLI) get one libzmq makes up, starting with a zero byte. At any moment at most one
connection holds an identity: the ROUTER runs with ``ROUTER_HANDOVER`` on, so a reconnect that
presents the id of a connection the ROUTER still holds takes it over. Without handover, libzmq
4.3 *ignores* such a connection and never reads it again, even after the old one is gone
(tests/integration/test_transport_security.py pins this); a quick reconnect then loses its
frames forever, which is why handover is on. So the engine may bind "incarnation X joined on
identity C with principal P" and refuse X's frames arriving under any other (C, P).

**Limits at the door.** ``max_bytes`` (ZMQ_MAXMSGSIZE; the node passes the engine's frame
limit) disconnects a peer that sends a larger message; connections that do not finish their
handshake in 5 s are dropped (ZMQ_HANDSHAKE_IVL), and TCP keepalives and a bound on
unacknowledged data (TCP_USER_TIMEOUT) drop connections whose peer host went away (half-open
TCP); at most ``max_peers`` DEALERs. Nothing a peer sends, and no
endpoint it names, raises out of the transport: a dial that ZeroMQ rejects (a bad endpoint, no
descriptors left, the context's socket limit) and every exception from the frame callback are
counted by reason (``refused``, and ``on_refused`` when set) and logged at most once a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from .endpoints import advertised, check_endpoint, endpoint_problem, only_this_host, split_endpoint
from .errors import ChoreoUsageError
from .trust import Security

_zmqio: Any = None
if os.environ.get("CHOREO_PURE") != "1":
    try:
        from . import _zmqio
    except ModuleNotFoundError as exc:  # pragma: no cover - a broken build must not hide behind pyzmq
        if exc.name != "choreo._zmqio":
            raise
        raise ImportError("choreo._zmqio is not built: run 'pip install -e .' (or 'make test', which does it) "
                          "in the choreo checkout, or set CHOREO_PURE=1 to read through pyzmq") from exc
    except ImportError as exc:  # pragma: no cover - pyzmq's libzmq out of its reach: read through pyzmq
        logging.getLogger("choreo.transport").info("reading through pyzmq: %s", exc)
# which reads and sends the transport makes: "compiled" (choreo._zmqio) or "pyzmq"
IO_IMPLEMENTATION = "compiled" if _zmqio is not None else "pyzmq"

__all__ = ["ZmqTransport", "check_addresses", "raise_fd_limit"]

log = logging.getLogger("choreo.transport")
MAX_PARKED = 100_000  # frames per peer waiting for a full ZeroMQ pipe; beyond, drop the oldest (acks recover)
MAX_PARKED_BYTES = 64 << 20  # bytes per peer waiting likewise
MAX_PEERS = 256  # DEALERs open at once per node (least recently used closed beyond)
IDLE_CLOSE = 60.0  # seconds after which an unused DEALER is closed
GONE_LINGER_MS = 200  # a DEALER to a node gone still sends what it holds for this long (in the background)
READ_BUDGET = 256  # frames per reader callback before yielding to the loop
# what a reader's read returns (the compiled reader's, choreo._zmqio, are the same numbers)
READ_DRAINED = 0  # nothing more waits
READ_BUDGET_SPENT = 1  # it stopped at the budget: more may wait
READ_YIELDED = 2  # it stopped after a frame that woke a caller awaiting an answer: more may wait
# plain ints: pyzmq's constants are enums, and an operation on one builds a new enum (about 1 us)
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
# pyzmq's compiled send, without the Python wrapper of zmq.Socket.send (which only adds the
# routing_id and group arguments of draft sockets): a frame leaves in one call
_send = zmq.backend.Socket.send
MULTIPART = b"\x00multipart"  # what a multipart message becomes (the engine refuses it as malformed)
ZERO_COPY_BYTES = 65536  # a frame this large is handed to libzmq without a copy (pyzmq keeps it alive)
HANDSHAKE_MS = 5_000  # a connection that has not finished its ZMTP (and CURVE) handshake by then is dropped
# SWIM finds dead peers; the kernel finds dead connections: a keepalive probe after 15 s idle,
# then every 5 s, six unanswered and the connection is closed (then redialled); data left
# unacknowledged for 45 s closes it too. Not ZMTP heartbeats: libzmq 4.3.5 aborts the process
# (``Assertion failed: !_io_error``, stream_engine_base.cpp) when a heartbeat falls due on a
# connection whose peer went away while its receive pipe was full (a busy node, a killed
# peer; or a remote peer that fills a DEALER's one-message pipe, then resets the connection).
KEEPALIVE_IDLE_S, KEEPALIVE_EVERY_S, KEEPALIVE_PROBES = 15, 5, 6
UNACKNOWLEDGED_MS = 45_000
REDIAL_AFTER = (1.0, 30.0)  # a peer that refused our key is dialled again after 1 s, doubling up to 30 s
DEALER_MAX_IN = 4096  # DEALERs are never read: what a peer pushes back is capped at one small message

Refuser = Callable[[str, str], None]


def _send_copied(sock: zmq.Socket, frame: bytes) -> None:
    _send(sock, frame, _NOBLOCK, True)


# a frame under ZERO_COPY_BYTES, copied, without blocking (zmq.Again when the pipe is full)
_send_small = _zmqio.send if _zmqio is not None else _send_copied


class PyzmqReader:
    """:class:`choreo._zmqio.Reader` through pyzmq's calls: what the transport reads with where
    that module is not available (the same contract; see it)."""

    def __init__(self, socket: zmq.Socket, on_frame: Callable[[bytes, bytes, str | None], object],
                 refuse: Callable[..., None], secure: bool) -> None:
        self.socket = socket
        self.on_frame = on_frame
        self.refuse = refuse
        self.secure = secure

    def waiting(self) -> bool:
        return bool(self.socket.get(_EVENTS) & _POLLIN)

    def read(self, budget: int) -> int:
        router, on_frame, secure = self.socket, self.on_frame, self.secure
        NOBLOCK, EVENTS, POLLIN = _NOBLOCK, _EVENTS, _POLLIN
        events = router.get
        for n in range(budget):
            try:
                # the first read trusts the wake-up; the last question leaves the edge armed again
                if n and not events(EVENTS) & POLLIN:
                    return READ_DRAINED
                if secure:
                    first = router.recv(NOBLOCK, copy=False)
                    identity = first.bytes
                else:
                    identity = router.recv(NOBLOCK)
                part = router.recv(NOBLOCK, copy=False)  # a message arrives whole: the rest is here
                if part.more:  # a peer that is not a choreo node: let the engine count the bad frame
                    while part.more:
                        part = router.recv(NOBLOCK, copy=False)
                    data = MULTIPART
                else:
                    data = part.bytes
            except zmq.Again:
                return READ_DRAINED
            except zmq.ZMQError as exc:  # never raise out of the loop
                if not router.closed:  # (closed by a frame's handling: nothing to say)
                    self.refuse("transport_error", f"reading the ROUTER: {exc}")
                return READ_DRAINED
            principal: str | None = None
            if secure:
                # the key's name, as the ZAP handler set it for this connection: on every message, read
                # per message (~0.5 us; a cache by routing id could outlive a connection that took its id over)
                try:
                    principal = first.get("User-Id")
                except zmq.ZMQError:  # pragma: no cover - libzmq sets it on every message of a ZAP'd connection
                    self.refuse("no_principal", "a frame without an authenticated key")
                    continue
            try:
                if on_frame(data, identity, principal):
                    return READ_YIELDED
            except Exception as exc:  # the engine counts what it refuses; anything else stops here
                self.refuse("internal_error", f"{type(exc).__name__}: {exc} (handling a frame)", exc)
        return READ_BUDGET_SPENT


class ZmqTransport:
    """Sockets of one node. ``on_frame(data, identity, principal)`` gets every frame, ``on_idle()`` each drain.

    A frame whose ``on_frame`` returns true woke a caller awaiting an answer: the read stops
    there and goes on (then ``on_idle``) in a callback queued behind that caller's task.

    ::

        t = ZmqTransport("tcp://127.0.0.1:0", security=Security.load("keys", "orders-1"))
        t.start(loop, lambda data, identity, principal: ..., lambda: None)
        t.send("payments-1@tcp://127.0.0.1:7002", frame)
        t.endpoint   # 'orders-1@tcp://127.0.0.1:40123'
    """

    def __init__(
        self,
        bind: str,
        *,
        hwm: int = 10_000,
        max_bytes: int = 256 << 20,
        advertise: str | None = None,
        context: zmq.Context | None = None,
        security: Security | None = None,
        max_parked_bytes: int = MAX_PARKED_BYTES,
        max_peers: int = MAX_PEERS,
        idle_close: float = IDLE_CLOSE,
        on_refused: Refuser | None = None,
        seeds: Iterable[str] = (),
    ) -> None:
        if max_peers < 1 or idle_close <= 0:
            raise ValueError(f"max_peers must be >= 1 and idle_close > 0, got {max_peers}, {idle_close}")
        check_endpoint(bind, "bind", bind=True)
        if advertise is not None:
            check_endpoint(advertise, "advertise")
        seeds = [split_endpoint(check_endpoint(seed, "peer"))[1] for seed in seeds]
        if security is not None and context is not None:
            raise ValueError("a secure transport makes its own ZeroMQ context (its ZAP handler admits only this "
                             "node's trusted keys): do not pass context=")
        self.security = security
        self.hwm = hwm
        self.max_bytes = max_bytes
        self.max_parked_bytes = max_parked_bytes
        self.max_peers = max_peers
        self.idle_close = idle_close
        self.on_refused = on_refused
        self.refused: Counter[str] = Counter()
        self._log_budget: dict[str, float] = {}
        self._own_context = security is not None and context is None
        self._auth: Any = None
        sockets = 2 * max_peers + 64  # a DEALER and its monitor per peer, the ROUTER, the ZAP handler's
        if self._own_context:
            # a context of our own: its ZAP handler serves only this node's trusted keys
            self.context = zmq.Context()
            self.context.setsockopt(zmq.MAX_SOCKETS, sockets)
        else:
            self.context = context or zmq.Context.instance()
            if self.context.get(zmq.MAX_SOCKETS) < sockets:  # (libzmq reads it when the first socket opens)
                self.context.set(zmq.MAX_SOCKETS, sockets)
        self.router = self.context.socket(zmq.ROUTER)
        try:
            if security is not None:
                self._auth = _start_authenticator(self.context, security, self._refuse_threadsafe)
                self.router.setsockopt(zmq.CURVE_SERVER, 1)
                self.router.setsockopt(zmq.CURVE_PUBLICKEY, security.public_key)
                self.router.setsockopt(zmq.CURVE_SECRETKEY, security.secret_key)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.setsockopt(zmq.RCVHWM, hwm)
            self.router.setsockopt(zmq.SNDHWM, hwm)
            self.router.setsockopt(zmq.MAXMSGSIZE, max_bytes)
            self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            _set_liveness(self.router)
            self.router.bind(bind)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"cannot bind {bind}: {exc}") from None
        bound = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        address = advertised(bound, seeds, advertise)  # a wildcard bind: the interface peers reach
        if security is not None and split_endpoint(address)[0] is None:
            address = f"{security.key_name}@{address}"
        self.endpoint = address
        self.dealers: dict[str, zmq.Socket] = {}
        self.evicted = 0  # DEALERs closed to make room for another (the limit), counted
        self._used: dict[str, int] = {}  # endpoint -> the sweep epoch it was last sent to in, least recent first
        self._epoch = 0
        self._swept = time.monotonic()
        self.parked: dict[str, deque[bytes]] = {}
        self.parked_bytes: dict[str, int] = {}
        self.dropped = 0
        self._monitors: dict[str, zmq.Socket] = {}  # secure: each DEALER's handshake failures
        self._hold_off: dict[str, tuple[float, float]] = {}  # endpoint -> (dial again at, backoff)
        self._id_key = os.urandom(16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: Any = None  # a choreo._zmqio.Reader or a PyzmqReader, from start()
        self._on_idle: Callable[[], None] | None = None
        self._read_scheduled = False
        self._yielded = False  # a read stopped for a caller it woke: the read after that caller goes on
        self.closed = False

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_frame: Callable[[bytes, bytes, str | None], object],
        on_idle: Callable[[], None],
    ) -> None:
        self._loop = loop
        reader = _zmqio.Reader if _zmqio is not None else PyzmqReader
        self._reader = reader(self.router, on_frame, self._refuse, self.security is not None)
        self._on_idle = on_idle
        loop.add_reader(self.router.getsockopt(zmq.FD), self._readable)
        for endpoint, monitor in self._monitors.items():
            loop.add_reader(monitor.getsockopt(zmq.FD), self._on_monitor, endpoint)
            loop.call_soon(self._on_monitor, endpoint)
        self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled and self._loop is not None and not self.closed:
            self._read_scheduled = True
            self._loop.call_soon(self._readable)

    def input_waiting(self) -> bool:
        """Frames wait to be read; if so, a read is scheduled (asking ZeroMQ consumes the edge the
        loop waits for, so that read cannot be left to the loop). The engine asks between long runs
        of handlers, so that a command that arrived meanwhile runs before the rest of them."""
        if self._read_scheduled or self._yielded or self.closed:
            return self._read_scheduled or self._yielded
        try:
            waiting = self._reader.waiting()
        except zmq.ZMQError:  # pragma: no cover - a closing socket: nothing to read
            return False
        if waiting:
            self._schedule_read()
        return waiting

    def _readable(self) -> None:
        self._read_scheduled = False
        if self.closed or self._yielded:
            return  # (after a read that yielded, the read that goes on is _after_yield's)
        assert self._reader is not None and self._on_idle is not None and self._loop is not None
        stopped = self._reader.read(READ_BUDGET)
        if stopped == READ_YIELDED:
            # a frame woke a caller awaiting its answer. Its task was scheduled as its future was
            # resolved, so it runs before the callback scheduled here, which reads on and calls
            # on_idle: the answer reaches its caller without waiting for another look at the
            # socket, the flush and the next tick's reckoning. Until then no read (one the socket's
            # descriptor or a schedule queued already this turn) may get ahead of that caller.
            self._yielded = True
            self._loop.call_soon(self._after_yield)
            return
        if stopped:
            self._schedule_read()  # more may be waiting: continue after others had a turn
        try:
            self._on_idle()
        except Exception as exc:
            self._refuse("internal_error", f"{type(exc).__name__}: {exc} (after reading)", exc)

    def _after_yield(self) -> None:
        self._yielded = False
        self._readable()

    # -- refusals -----------------------------------------------------------------------------------

    def _refuse(self, reason: str, detail: str, exc: BaseException | None = None) -> None:
        """Count a refusal; hand it to ``on_refused`` (the engine's counter) or log it at most once a second."""
        self.refused[reason] += 1
        hook = self.on_refused
        if hook is not None:
            try:
                hook(reason, detail)
            except Exception:  # pragma: no cover - a broken hook must not break the transport
                hook = None
        if hook is not None and exc is None:
            return  # the hook logs (the engine's count_refused does, once a second per reason)
        now = time.monotonic()
        if now - self._log_budget.get(reason, -1e9) >= 1.0:
            self._log_budget[reason] = now
            log.warning("transport refused (%s): %s [%d so far]", reason, detail, self.refused[reason],
                        exc_info=exc)

    def _refuse_threadsafe(self, reason: str, detail: str) -> None:
        # from the ZAP thread: the counters and the engine belong to the loop's thread
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._refuse, reason, detail)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self.refused[reason] += 1

    # -- sending -------------------------------------------------------------------------------

    def routing_id(self, endpoint: str) -> bytes:
        """The routing id this transport presents to ``endpoint``: unguessable, the same on every reconnect."""
        return b"c" + hashlib.blake2b(endpoint.encode(), key=self._id_key, digest_size=16).digest()

    def renew_identity(self) -> None:
        """Draw new routing ids (a new incarnation): every DEALER is closed, redialled on the next send."""
        self._id_key = os.urandom(16)
        for endpoint in list(self.dealers):
            self.disconnect(endpoint)

    def connect(self, endpoint: str) -> bool:
        """Dial ``endpoint`` now (no-op if dialled; :meth:`send` dials by itself). False, with a
        counted refusal, when it cannot be."""
        if endpoint in self.dealers:
            return True
        if self.closed or self._holding_off(endpoint):
            return False
        return self._dial(endpoint) is not None

    def _holding_off(self, endpoint: str) -> bool:
        hold = self._hold_off.get(endpoint)
        return hold is not None and time.monotonic() < hold[0]

    def _on_monitor(self, endpoint: str) -> None:
        """A secure DEALER's handshake failed for good: the peer refused our key (ZAP) or spoke nonsense.

        libzmq 4.3 never reconnects such a socket (the session ends on a protocol error), so the
        peer would stay unreachable even after it comes to trust our key. Close it, count it, and
        dial again after a back-off (1 s, doubling to 30 s); frames meanwhile wait parked.
        """
        monitor = self._monitors.get(endpoint)
        if monitor is None:
            return
        failed = None
        while True:
            try:
                event = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return
            number = int.from_bytes(event[0][:2], "little")
            failed = "refused this node's key" if number == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "failed the handshake"
        if failed is None:
            return
        now = time.monotonic()
        until, backoff = self._hold_off.get(endpoint, (0.0, REDIAL_AFTER[0] / 2))
        if now - until > 60.0:  # the last refusal is long past: start again from the shortest wait
            backoff = REDIAL_AFTER[0] / 2
        backoff = min(backoff * 2, REDIAL_AFTER[1])
        self._hold_off[endpoint] = (now + backoff, backoff)
        name = self.security.key_name if self.security is not None else "?"
        self._refuse("key_refused", f"{endpoint} {failed} ({name!r}: is it in that node's keys directory?); "
                                    f"dialling again in {backoff:.0f} s")
        self._close_dealer(endpoint)

    def _dial(self, endpoint: str) -> zmq.Socket | None:
        problem = endpoint_problem(endpoint)
        if problem is not None:
            self._refuse("bad_endpoint", f"not dialling {problem}")
            return None
        key_name, address = split_endpoint(endpoint)
        security = self.security
        server_key = None
        if security is not None:
            if key_name is None:
                self._refuse("no_key", f"not dialling {endpoint}: this node is secure and the endpoint names "
                                       f"no key (KEY@{endpoint})")
                return None
            server_key = security.server_key(key_name)
            if server_key is None and security.refresh():
                server_key = security.server_key(key_name)
            if server_key is None:
                self._refuse("untrusted_key", f"not dialling {endpoint}: {key_name!r} is not a trusted key")
                return None
        elif key_name is not None:
            self._refuse("needs_keys", f"not dialling {endpoint}: a secure node, and this node has no keys")
            return None
        if len(self.dealers) >= self.max_peers:  # make room: the least recently used goes
            victim = next((e for e in self._used if e in self.dealers), next(iter(self.dealers)))
            self.evicted += 1
            self.dropped += len(self.parked.get(victim, ()))
            self.disconnect(victim)
        try:
            sock = self.context.socket(zmq.DEALER)
        except zmq.ZMQError as exc:  # EMFILE: descriptors or the context's socket limit exhausted
            self._refuse("no_socket", f"cannot open a socket to dial {endpoint}: {exc}")
            return None
        monitor = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, DEALER_MAX_IN)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sock.setsockopt(zmq.ROUTING_ID, self.routing_id(endpoint))
            _set_liveness(sock)
            if security is not None:
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, security.public_key)
                sock.setsockopt(zmq.CURVE_SECRETKEY, security.secret_key)
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(address)
        except zmq.ZMQError as exc:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close(0)
            reason = "no_socket" if exc.errno == zmq.EMFILE else "bad_endpoint"
            self._refuse(reason, f"ZeroMQ cannot dial {endpoint}: {exc}")
            return None
        self.dealers[endpoint] = sock
        self._used.pop(endpoint, None)
        self._used[endpoint] = self._epoch
        if monitor is not None:
            self._monitors[endpoint] = monitor
            if self._loop is not None:
                self._loop.add_reader(monitor.getsockopt(zmq.FD), self._on_monitor, endpoint)
                self._on_monitor(endpoint)  # a first read arms the edge-triggered descriptor
        return sock

    def redial(self, endpoint: str) -> None:
        """Close the DEALER to ``endpoint`` and dial it afresh, for a connection that carries
        nothing though the peer is alive: after a cut, TCP retransmits what it had in flight at
        intervals that double (0.2 s, 0.4 s, ... 12.8 s), so a connection that lost frames for
        a while may carry nothing for as long again after the cut heals; a new connection starts
        at once. It presents the same routing id (the peer's ROUTER hands it over to the new
        connection); frames parked for it go on the new one, and what ZeroMQ had queued on the
        old one is lost, to be sent again by the reliability layer above."""
        if endpoint not in self.dealers:
            return
        self._close_dealer(endpoint)
        if not self.closed and not self._holding_off(endpoint):
            self._dial(endpoint)

    def disconnect(self, endpoint: str) -> None:
        """Stop talking to ``endpoint`` (its node is gone). What was just sent it still leaves, for
        a moment (:data:`GONE_LINGER_MS`): a last ack to a node declared dead that lives on (see
        ``Outbox.close``), dropped from ZeroMQ's queue, would have it send again what ran here."""
        self._close_dealer(endpoint, GONE_LINGER_MS)
        self.parked.pop(endpoint, None)
        self.parked_bytes.pop(endpoint, None)
        self._hold_off.pop(endpoint, None)

    def _close_dealer(self, endpoint: str, linger_ms: int = 0) -> None:
        sock = self.dealers.pop(endpoint, None)
        self._used.pop(endpoint, None)
        monitor = self._monitors.pop(endpoint, None)
        if monitor is not None:
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(monitor.getsockopt(zmq.FD))
                except (ValueError, zmq.ZMQError):
                    pass
            if sock is not None:
                sock.disable_monitor()
            monitor.close(0)
        if sock is not None:
            sock.close(linger_ms)

    def send(self, endpoint: str, frame: bytes) -> None:
        """Send now, or park when the pipe is full; a peer that cannot be dialled loses the frame (counted)."""
        if self.closed:
            return
        parked = self.parked.get(endpoint)
        if parked:
            self._park(endpoint, parked, frame)
            return
        sock = self.dealers.get(endpoint)
        if sock is None:
            if self._holding_off(endpoint):  # it refused our key a moment ago: wait parked
                self._park(endpoint, self.parked.setdefault(endpoint, deque()), frame)
                return
            sock = self._dial(endpoint)
            if sock is None:
                self.dropped += 1
                return
        used = self._used
        used.pop(endpoint, None)  # to the end: the most recently used
        used[endpoint] = self._epoch
        try:
            if len(frame) < ZERO_COPY_BYTES:
                _send_small(sock, frame)
            else:
                _send(sock, frame, _NOBLOCK, False)
        except zmq.Again:
            self._park(endpoint, self.parked.setdefault(endpoint, deque()), frame)
        except zmq.ZMQError as exc:
            self.dropped += 1
            self._refuse("transport_error", f"sending to {endpoint}: {exc}")

    def _park(self, endpoint: str, parked: deque[bytes], frame: bytes) -> None:
        size = self.parked_bytes.get(endpoint, 0) + len(frame)
        parked.append(frame)
        while len(parked) > MAX_PARKED or (size > self.max_parked_bytes and parked):
            size -= len(parked.popleft())  # the oldest first: retransmission brings it back
            self.dropped += 1
        self.parked_bytes[endpoint] = size
        if not parked:
            del self.parked[endpoint]
            del self.parked_bytes[endpoint]

    def retry_parked(self) -> None:
        """Try again to send frames that met a full pipe (called at every tick); follow the keys directory."""
        if self.security is not None:
            self.security.refresh(1.0)  # at most once a second: a listing and a stat per key file
        for endpoint, parked in list(self.parked.items()):
            sock = self.dealers.get(endpoint)
            if sock is None and endpoint in self._hold_off and not self._holding_off(endpoint):
                sock = self._dial(endpoint)  # its back-off is over: try again
            if sock is None:
                if not self._holding_off(endpoint):
                    del self.parked[endpoint]
                    self.parked_bytes.pop(endpoint, None)
                continue
            size = self.parked_bytes.get(endpoint, 0)
            while parked:
                try:
                    sock.send(parked[0], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    self._refuse("transport_error", f"sending to {endpoint}: {exc}")
                    break
                size -= len(parked.popleft())
            if parked:
                self.parked_bytes[endpoint] = size
            else:
                del self.parked[endpoint]
                self.parked_bytes.pop(endpoint, None)

    def sweep(self) -> None:
        """Close DEALERs unused for ``idle_close`` seconds (checked at most once a second)."""
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        self._epoch += 1
        oldest = self._epoch - int(self.idle_close)
        idle = []
        for endpoint, used in self._used.items():  # least recent first
            if used > oldest:
                break
            idle.append(endpoint)
        for endpoint in idle:
            if endpoint not in self.parked and endpoint not in self._hold_off:
                self._close_dealer(endpoint)

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
        for endpoint in list(self.dealers):
            self._close_dealer(endpoint)
        self.parked.clear()
        self.parked_bytes.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.router.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.context.term()


def _set_liveness(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_EVERY_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    sock.setsockopt(zmq.TCP_MAXRT, UNACKNOWLEDGED_MS)


def _start_authenticator(context: zmq.Context, security: Security, refuse: Refuser) -> Any:
    """pyzmq's thread authenticator, admitting the trusted keys of ``security`` under their names."""
    from zmq.auth.thread import ThreadAuthenticator

    class Authenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            # the name becomes the connection's User-Id; a key removed since the check gets a
            # name no policy can grant anything to (':' is not allowed in key names)
            return security.name_of(client_public_key) or "untrusted:" + client_public_key.hex()

    class TrustedKeys:
        def callback(self, domain: str, key: bytes) -> bool:
            security.refresh(1.0)  # a key deleted from the directory is refused within a second
            if security.name_of(key) is not None:
                return True
            # a refused dialer never retries (libzmq), so a key added a moment ago must be seen now:
            # re-read the directory whenever it changed (a listing and a stat per file when it did not)
            if security.refresh(0.0) and security.name_of(key) is not None:
                return True
            refuse("untrusted_key", f"handshake refused: public key {key.decode('ascii', 'replace')} is not in the "
                                    "trusted keys directory")
            return False

    auth = Authenticator(context, log=logging.getLogger("choreo.zap"))
    auth.start()
    auth.configure_curve_callback("*", TrustedKeys())
    return auth


# ---------------------------------------------------------------------------------------- checks at start


def check_addresses(bind: str, peers: Iterable[str], security: Security | None, insecure: bool) -> None:
    """Refuse, before anything starts, what would expose a node or cannot be dialled (``ChoreoUsageError``).

    A node without keys binds only loopback addresses unless ``insecure``; a secure node's
    seeds must name a trusted key (``KEY@tcp://...``); a node without keys cannot dial one that has.
    """
    problem = endpoint_problem(bind, bind=True)
    if problem is not None:
        raise ChoreoUsageError(f"bind: {problem}")
    if split_endpoint(bind)[0] is not None:
        raise ChoreoUsageError(f"bind to an address without a key name ({split_endpoint(bind)[1]}); "
                               "the node advertises itself with its key")
    if security is None and not insecure and not only_this_host(bind):
        raise ChoreoUsageError(
            f"refusing to bind {bind} without keys: anyone who reaches it could join the mesh and act for any "
            "service. Make keys ('choreo keys new NAME --dir keys', one per node, the .key files copied to every "
            "node) and run with --keys keys --key NAME (Node(security=Security.load('keys', NAME))), or pass "
            "--insecure (Node(insecure=True)) on a network you trust"
        )
    for peer in peers:
        problem = endpoint_problem(peer)
        if problem is not None:
            raise ChoreoUsageError(f"peer: {problem}")
        key_name, address = split_endpoint(peer)
        if security is not None:
            if key_name is None:
                raise ChoreoUsageError(
                    f"peer {peer} names no key: in a secure mesh give it as KEY@{address}, KEY the name of the "
                    f"certificate that node runs as (in {security.keys_dir or 'the trusted keys'})"
                )
            if security.server_key(key_name) is None and not (security.refresh(0.0) and security.server_key(key_name)):
                where = security.keys_dir or "the trusted keys"
                raise ChoreoUsageError(f"peer {peer}: no trusted key {key_name!r} (no {key_name}.key in {where})")
        elif key_name is not None:
            raise ChoreoUsageError(f"peer {peer} is a secure node: give this node keys (--keys DIR --key NAME)")


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open descriptors to its hard limit; returns (soft, hard).

    For node processes (``choreo run``): each peer costs a few descriptors, each idle inbound
    connection one. A library does not change process limits behind its user's back, so
    :class:`~choreo.node.Node` does not call this.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard
