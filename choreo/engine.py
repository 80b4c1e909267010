"""The node's logic, without sockets or clocks of its own.

An :class:`Engine` is one node incarnation: frames go in (``on_frame``), frames come out
through the transport it is given, time comes from the clock it is given, and ``tick()`` is
called every few milliseconds. The real node (:mod:`choreo.node`) plugs in ZeroMQ and
``time.monotonic``; the test harness (:mod:`choreo.testing`) plugs in a lossy in-memory link
and a virtual clock, and the same code runs under both.

What it does with frames:

* ``HELLO``/``HEARTBEAT``/``BYE`` feed :class:`~choreo.membership.Membership` (gossip: every
  hello and heartbeat lists the peers the sender knows, so one seed is enough to find all);
* ``DATA`` goes through the sender's :class:`~choreo.channels.InChannel` (order) to the
  :class:`~choreo.dispatch.Dispatcher` (dedup, per-key order, handlers);
* ``ACK`` frees credit in the receiver's :class:`~choreo.channels.OutChannel` and tells the
  dispatcher which effects are now safe;
* ``RPC`` is a system query from a client (the CLI), answered on the connection it came on.

Outgoing envelopes collect per channel and leave as one frame per channel when the batch is
full or when the event loop gets control back (``schedule_flush``): adaptive batching.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Protocol

import msgspec

from . import core, wire
from .channels import InChannel, OutChannel, Outgoing
from .dispatch import Dispatcher, Job, decode_reply
from .errors import (
    Backpressure,
    ChoreoError,
    ChoreoUsageError,
    DeliveryTimeout,
    HandlerFailed,
    MessageTooLarge,
    NoOwner,
    ProtocolError,
    UndeclaredMessage,
    ValidationError,
)
from .holds import Holds
from .membership import Conflict, Membership, Peer
from .ownership import Ownership
from .messages import Message, encode, idempotency_id, message_options, result_decoder_for
from .service import Service
from .tracing import Tracer, parse_traceparent

__all__ = ["NodeConfig", "Engine", "Transport", "EngineStats", "key_bytes"]

log = logging.getLogger("choreo.node")
ZERO_ID = bytes(16)
RUN_BUDGET = 2048  # envelopes handled per turn of the event loop
_encode = msgspec.msgpack.Encoder().encode  # the same encoding as choreo.messages.encode
_partition_of = core.partition_of
_HEADER_SIZE = core.HEADER_SIZE
_KIND_EVENT = wire.KIND_EVENT


@dataclass(frozen=True)
class NodeConfig:
    """Tuning of one node. The defaults suit a LAN; every limit is also a safety bound.

    ``window`` / ``window_bytes``: credit per channel (envelopes and bytes in flight to one
    receiver): the high-water mark at which ``emit`` waits. ``emit_timeout``: how long it
    waits before raising :class:`~choreo.Backpressure`. ``max_message_bytes``: the largest
    body accepted or sent. ``rto``/``rto_max``: first and largest retransmission timeout.
    ``heartbeat``/``suspect_after``/``dead_after``: failure detection. ``span_ring``: how many
    spans the node remembers for tracing (0: none). ``handover_timeout``: how long a new owner
    of a partition waits for its live previous owner's handover before taking it anyway.
    ``dedup=False`` turns deduplication off on this node (at-least-once: for measuring what it
    costs, or for handlers that are idempotent by themselves).
    """

    window: int = 4096
    window_bytes: int = 32 << 20
    max_batch: int = 256
    max_batch_bytes: int = 256 << 10
    rto: float = 1.0
    rto_max: float = 8.0
    heartbeat: float = 0.5
    suspect_after: float = 2.0
    dead_after: float = 6.0
    max_message_bytes: int = 1 << 20
    emit_timeout: float = 10.0
    request_timeout: float = 10.0
    drain_timeout: float = 30.0
    tick: float = 0.01
    dlq_max: int = 10_000
    span_ring: int = 10_000
    transport_max_bytes: int = 256 << 20
    handover_timeout: float = 15.0
    forget_dead_after: float = 600.0
    dedup: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("span_ring", "dedup"):
                continue
            if not value > 0:
                raise ChoreoUsageError(f"NodeConfig.{f.name} must be > 0, got {value!r}")
        if self.window > 1 << 20:
            raise ChoreoUsageError(f"NodeConfig.window must be at most 1048576, got {self.window}")
        if not self.suspect_after < self.dead_after:
            raise ChoreoUsageError("NodeConfig.suspect_after must be smaller than dead_after")

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame accepted: a full batch plus one maximal message."""
        return self.max_batch_bytes + self.max_message_bytes + 64 * 1024


class Transport(Protocol):
    """What the engine needs from the network."""

    endpoint: str

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...

    def send(self, endpoint: str, frame: bytes) -> None: ...

    def reply(self, identity: bytes, frame: bytes) -> None: ...


@dataclass
class EngineStats:
    frames_in: int = 0
    frames_out: int = 0
    emitted: int = 0
    sent: int = 0
    dedup_hits: int = 0
    backpressure_waits: int = 0
    backpressure_errors: int = 0
    dead_letters: int = 0
    reincarnations: int = 0
    resent_requests: int = 0  # commands/queries acked without their answer (its frame was lost)
    redelivered_closed: int = 0  # retransmissions on channels that are gone (counters only grow)
    unrouted: int = 0
    forwarded: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def _forwarded(env: Any, on_done: Callable[[], None]) -> Outgoing:
    return Outgoing(
        env.kind, env.flags, env.type.encode(), env.key, env.partition, env.msg_id, env.trace_id, env.cause_id,
        env.payload, on_done, raw=env.raw,
    )


def _channel_load(ch: OutChannel) -> int:
    return ch.window.in_flight + len(ch.backlog)


def key_bytes(value: Any) -> bytes:
    """The ordering key of a field value, identical on every host (``str()`` of it, UTF-8)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


class _Route:
    __slots__ = ("service", "partitions", "key_field", "broadcast")

    def __init__(self, service: str, partitions: int, key_field: str | None, broadcast: bool) -> None:
        self.service = service
        self.partitions = partitions
        self.key_field = key_field
        self.broadcast = broadcast


class _EmitTarget:
    """Where copies of one event type go, compiled for one membership version."""

    __slots__ = ("flags", "key_field", "partitions", "by_partition", "channels", "service")

    def __init__(
        self,
        flags: int,
        key_field: str | None,
        partitions: int,
        by_partition: list[OutChannel] | None,
        channels: list[OutChannel],
        service: str,
    ) -> None:
        self.flags = flags
        self.key_field = key_field
        self.partitions = partitions
        self.by_partition = by_partition  # keyed: the owner's channel of every partition
        self.channels = channels  # broadcast: every instance; unkeyed: candidates by load
        self.service = service


class _EmitPlan:
    __slots__ = ("version", "tname", "targets", "idempotent", "max_bytes", "unavailable", "lane", "lane_channels")

    def __init__(self, version: int, tname: bytes, targets: list[_EmitTarget], idempotent: bool, max_bytes: int) -> None:
        self.version = version
        self.tname = tname
        self.targets = targets
        self.idempotent = idempotent
        self.max_bytes = max_bytes


class _Call:
    """A command or query waiting for its reply."""

    __slots__ = ("future", "cls", "service")

    def __init__(self, future: asyncio.Future[Any], cls: type[Message], service: str) -> None:
        self.future = future
        self.cls = cls
        self.service = service


class Engine:
    """One node incarnation (see the module docstring)."""

    def __init__(
        self,
        service: Service | None,
        transport: Transport,
        *,
        config: NodeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        incarnation: int | None = None,
        name: str | None = None,
    ) -> None:
        if service is not None:
            service.validate()
        self.service = service
        self.transport = transport
        self.config = config or NodeConfig()
        self.clock = clock
        self.wall = wall
        self.incarnation = incarnation or (int.from_bytes(os.urandom(8), "little") | 1)
        label = service.name if service else "client"
        self.name = name or f"{label}#{self.incarnation & 0xFFFFFF:06x}"
        self.spec = service.spec() if service else None
        self.membership = Membership(self.config.suspect_after, self.config.dead_after)
        self.dispatcher = Dispatcher(self, service, dlq_max=self.config.dlq_max)
        self.tracer = Tracer(label, self.name, self.config.span_ring, wall)
        self.stats = EngineStats()
        self.out: dict[int, OutChannel] = {}
        self.inbound: dict[int, InChannel] = {}
        self._dirty_out: set[OutChannel] = set()
        self._dirty_in: set[InChannel] = set()
        self._calls: dict[bytes, list[_Call]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._route_cache: dict[str, tuple[int, list[_Route]]] = {}
        self._emit_plans: dict[type, _EmitPlan] = {}
        self._service_waiters: dict[str, list[Callable[[], None]]] = {}
        self._replies: dict[int, list[bytes]] = {}  # peer incarnation -> reply entries to send
        self._rr = 0  # turn of equally loaded instances for unkeyed messages
        self._runq: deque[tuple[InChannel, list[Any], float]] = deque()
        self._run_scheduled = False
        self.holds = Holds()
        self.ownership = Ownership(service.partitions, self.incarnation) if service is not None else None
        self._synced_version = -1
        self._settled = False
        self._started_at = 0.0
        self._contacted = False
        self._homeless: dict[str, deque[Outgoing]] = {}
        self._hello_sent: dict[str, float] = {}
        self.ids = core.IdSource(os.urandom(8))
        self._flush_scheduled = False
        self._next_heartbeat = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rpc: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self._log_budget: dict[str, float] = {}
        self.leaving = False
        self.fatal: Exception | None = None
        self.batch_wall = wall()
        self.me: Peer | None = None
        self._seeds: list[str] = []
        self._initial_seeds: list[str] = []
        self._told_dead: dict[int, float] = {}
        self._auto_name = name is None
        self._label = label
        self._register_rpc()

    # ================================================================================ lifecycle

    def start(self, seeds: Iterable[str] = ()) -> None:
        """Join the mesh: register ourselves, then say hello to every seed."""
        self._loop = asyncio.get_running_loop()
        now = self.clock()
        self.me = Peer(
            incarnation=self.incarnation,
            endpoint=self.transport.endpoint,
            node=self.name,
            service=self.spec,
            window=self.config.window,
            max_message_bytes=self.config.max_message_bytes,
            last_heard=now,
        )
        self.membership.upsert(self.me)
        self.transport.connect(self.transport.endpoint)
        self._next_heartbeat = now + self.config.heartbeat
        self._seeds = [s for s in seeds if s != self.transport.endpoint]
        self._initial_seeds = list(self._seeds)
        self._started_at = now
        self._settled = not self._seeds
        for seed in self._seeds:
            self._say_hello(seed, reply=True)
        self.sync_view()

    def _hello(self, reply: bool) -> wire.Hello:
        return wire.Hello(
            node=self.name,
            incarnation=self.incarnation,
            endpoint=self.transport.endpoint,
            service=self.spec,
            window=self.config.window,
            max_message_bytes=self.config.max_message_bytes,
            peers=self._peer_refs(),
            reply=reply,
            leaving=self.leaving,
            serving=self.serving,
        )

    def _peer_refs(self) -> list[wire.PeerRef]:
        return [wire.PeerRef(p.endpoint, p.incarnation, p.service_name) for p in self.membership.live_peers()]

    def _say_hello(self, endpoint: str, reply: bool, receiver: int = 0) -> None:
        self.transport.connect(endpoint)
        self._hello_sent[endpoint] = self.clock()
        self._send(endpoint, wire.encode_control(wire.HELLO, self.incarnation, receiver, self._hello(reply)))

    def begin_leave(self) -> None:
        """Stop taking new work: peers route around us while we finish what we hold."""
        if self.leaving:
            return
        self.leaving = True
        hb = wire.Heartbeat(peers=self._peer_refs(), leaving=True)
        for peer in list(self.membership.live_peers()):
            if peer is not self.me:
                self._send(peer.endpoint, wire.encode_control(wire.HEARTBEAT, self.incarnation, peer.incarnation, hb))
        if self.me is not None:
            self.membership.leaving(self.incarnation)
        self.flush()

    def finish_leave(self) -> None:
        """Say goodbye to every peer (after draining)."""
        bye = wire.Bye()
        for peer in list(self.membership.live_peers()):
            if peer is not self.me:
                self._send(peer.endpoint, wire.encode_control(wire.BYE, self.incarnation, peer.incarnation, bye))
        self.flush()

    @property
    def serving(self) -> bool:
        """Whether this node owns partitions already (a newcomer then waits for its handovers)."""
        return self.ownership is not None and self.ownership.serving

    @property
    def drained(self) -> bool:
        """Nothing in progress here and nothing of ours unacknowledged elsewhere."""
        if not self.dispatcher.idle or self._runq:
            return False
        if self.ownership is not None and (self.ownership.draining or self.ownership.buffered):
            return False
        if any(not ch.idle for ch in self.inbound.values() if ch.peer.live):
            return False
        return all(ch.idle for ch in self.out.values() if ch.peer.live and not ch.closed)

    # ================================================================================ timers

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay`` seconds of the engine's clock (checked at each tick)."""
        heapq.heappush(self._timers, (self.clock() + delay, next(self._timer_seq), callback))

    def tick(self) -> None:
        """Timers: retransmissions, heartbeats, failure detection, retries and deadlines."""
        now = self.clock()
        for ch in list(self.out.values()):
            if ch.window.in_flight and ch.peer.live:
                body = ch.window.due(now)
                if body is not None:
                    self._send_data(ch, body)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat
            self._heartbeat()
        for peer in self.membership.check_silence(now, self.incarnation):
            log.warning("%s: peer %s is %s (silent for %.1f s)", self.name, peer.node, peer.state, now - peer.last_heard)
            if not peer.live:
                self._peer_gone(peer)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            callback()
        if not self._settled and now - self._started_at >= self.config.dead_after:
            self._settled = True  # the seeds never answered: act on what we know
            self._synced_version = -1
        if self.membership.version != self._synced_version:
            self.sync_view()
        if self.ownership is not None:
            self._ownership_timers(now)
        self.dispatcher.pump()
        self.flush()

    def _heartbeat(self) -> None:
        now = self.clock()
        # a seed that has not answered yet (its hello or ours was lost, or it starts later): again
        if self._seeds:
            answered = {p.endpoint for p in self.membership.peers.values()}
            self._seeds = [s for s in self._seeds if s not in answered]
            for seed in self._seeds:
                self._say_hello(seed, reply=True)
        # peers we declared dead may be cut off rather than gone: knock now and then, so that a
        # healed partition reunites the mesh (the side found dead rejoins as a new incarnation)
        live_endpoints = {p.endpoint for p in self.membership.live_peers()}
        probe_every = max(4 * self.config.heartbeat, 1.0)
        for peer in list(self.membership.peers.values()):
            if peer.state == "dead" and peer.endpoint not in live_endpoints:
                if now - self._hello_sent.get(peer.endpoint, -1e9) >= probe_every:
                    self._say_hello(peer.endpoint, reply=True)
        if len(live_endpoints) <= 1:  # alone: back to the seeds we were started with
            for seed in self._initial_seeds:
                if now - self._hello_sent.get(seed, -1e9) >= probe_every:
                    self._say_hello(seed, reply=True)
        self.membership.forget_dead(now, keep=self.config.forget_dead_after)
        refs = self._peer_refs()
        serving = self.serving
        plain = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, self.leaving, False, serving))
        asking = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, self.leaving, True, serving))
        for peer in self.membership.live_peers():
            if peer is not self.me:
                ch = self.out.get(peer.incarnation)
                self._send(peer.endpoint, asking if ch is not None and ch.window.in_flight else plain)

    # ================================================================================ output

    def _send(self, endpoint: str, frame: bytes) -> None:
        self.stats.frames_out += 1
        self.transport.send(endpoint, frame)

    def schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def ack_later(self, channel: InChannel) -> None:
        self._dirty_in.add(channel)
        self.schedule_flush()

    def flush(self) -> None:
        """Send every pending batch and ack: called when the loop has nothing else to do."""
        self._flush_scheduled = False
        if self._replies:  # before any ack that covers the commands they answer
            replies, self._replies = self._replies, {}
            for inc, entries in replies.items():
                peer = self.membership.peers.get(inc)
                if peer is not None and peer.live:
                    self._send(peer.endpoint, self._frame_to(wire.REPLY, inc, b"".join(entries)))
        if self._dirty_out:
            dirty, self._dirty_out = self._dirty_out, set()
            for ch in dirty:
                body = ch.take_body()
                if body is not None and ch.peer.live:
                    self._send_data(ch, body)
        if self._dirty_in and not self._run_scheduled:
            # (while received envelopes wait to be handled, their acks wait too: one ack after the
            # handlers says more, and costs the sender one wake-up instead of two)
            dirty_in, self._dirty_in = self._dirty_in, set()
            for ich in dirty_in:
                if ich.reorder.ack_pending and ich.peer.live and not ich.closed:
                    self._send_ack(ich)

    def _append(self, ch: OutChannel, item: Outgoing, now: float) -> None:
        """Put one envelope on a channel (or its backlog) and get it on its way."""
        if self.holds.by_key and not item.flags & (wire.FLAG_UNKEYED | wire.FLAG_BROADCAST):
            hold = self.holds.held(ch.peer.service_name, item.partition)
            if hold is not None:
                hold.queue.append(item)  # behind what the partition's old owner still holds
                return
        ch.push(item, now)
        self._dirty_out.add(ch)
        if ch.batch_full:
            body = ch.take_body()
            if body is not None:
                self._send_data(ch, body)
        self.schedule_flush()

    def _frame_to(self, frame_type: int, incarnation: int, body: bytes) -> bytes:
        """A DATA or REPLY frame for a peer, carrying our ack of its data when one is due."""
        ich = self.inbound.get(incarnation)
        ack = ich.take_ack() if ich is not None else None
        if ack is None:
            return wire.frame(frame_type, self.incarnation, incarnation, body)
        head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, frame_type, wire.FLAG_ACK, self.incarnation, incarnation)
        return b"".join((head, wire.PIGGY.pack(len(ack)), ack, body))

    def _send_ack(self, ich: InChannel) -> None:
        """A standalone ack; replies still queued for that peer go first (they carry it)."""
        inc = ich.peer.incarnation
        entries = self._replies.pop(inc, None) if self._replies else None
        if entries:
            self._send(ich.peer.endpoint, self._frame_to(wire.REPLY, inc, b"".join(entries)))
        else:
            self._send(ich.peer.endpoint, ich.ack_frame())

    def _send_data(self, ch: OutChannel, body: bytes) -> None:
        inc = ch.peer.incarnation
        entries = self._replies.pop(inc, None) if self._replies else None
        if entries:  # answers first: a piggybacked ack may cover their commands
            self._send(ch.peer.endpoint, self._frame_to(wire.REPLY, inc, b"".join(entries)))
        self._send(ch.peer.endpoint, self._frame_to(wire.DATA, inc, body))

    def channel(self, peer: Peer) -> OutChannel:
        ch = self.out.get(peer.incarnation)
        if ch is None or ch.closed:
            c = self.config
            ch = OutChannel(
                self.incarnation, peer, c.window, c.window_bytes, c.rto, c.rto_max, c.max_batch, c.max_batch_bytes
            )
            self.out[peer.incarnation] = ch
        return ch

    # ================================================================================ routing

    def _routes(self, name: str, kind: str) -> list[_Route]:
        version = self.membership.version
        cached = self._route_cache.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        routes: list[_Route] = []
        if kind == "event":
            for spec, h in self.membership.subscribers(name):
                routes.append(_Route(spec.name, spec.partitions, h.key, h.broadcast))
        else:
            owners = self.membership.owners(name)
            if not owners:
                known = ", ".join(sorted(self.membership.services())) or "none yet"
                raise NoOwner(f"no live service in the mesh handles {kind} {name} (services known: {known})")
            if len(owners) > 1:
                raise ChoreoUsageError(f"{kind} {name} has two owners: {', '.join(s.name for s in owners)}")
            spec = owners[0]
            h = spec.handler_for(name)
            assert h is not None
            routes.append(_Route(spec.name, spec.partitions, h.key, False))
        self._route_cache[name] = (version, routes)
        return routes

    def _destinations(self, message: Message, name: str, kind: str) -> list[tuple[Peer | None, int, bytes, int, str]]:
        """(peer, flags, key, partition, service) for every copy of ``message`` to send.

        The peer is None when every instance of the service died: the copy waits for one.
        """
        out: list[tuple[Peer | None, int, bytes, int, str]] = []
        for r in self._routes(name, kind):
            if r.key_field is not None:
                kb = key_bytes(getattr(message, r.key_field))
                partition = core.partition_of(kb, r.partitions)
                flags = 0
            else:
                kb, partition, flags = b"", 0, wire.FLAG_UNKEYED
            if r.broadcast:  # the instances alive now
                for peer in self.membership.instances(r.service):
                    out.append((peer, flags | wire.FLAG_BROADCAST, kb, partition, r.service))
                continue
            peer = self.membership.owner(r.service, partition) if r.key_field is not None else self._least_loaded(r.service)
            if peer is None and r.service not in self.membership.lost:
                if kind != "event":
                    raise NoOwner(f"no live instance of {r.service} for {kind} {name}")
                continue
            out.append((peer, flags, kb, partition, r.service))
        return out

    def _least_loaded(self, service: str) -> Peer | None:
        """The instance with the fewest envelopes in flight; equally loaded ones take turns."""
        peers = self.membership.instances(service)
        best, best_load = None, None
        self._rr += 1
        for j in range(len(peers)):
            peer = peers[(j + self._rr) % len(peers)]
            ch = self.out.get(peer.incarnation)
            load = 0 if ch is None else _channel_load(ch)
            if best_load is None or load < best_load:
                best, best_load = peer, load
        return best

    def fresh_id(self) -> bytes:
        return self.ids.next()

    def _plan(
        self, message: Message, msg_id: bytes, trace_id: bytes, cause_id: bytes, on_done: Callable[[], None] | None
    ) -> list[tuple[OutChannel | None, Outgoing, str]]:
        options = message.__choreo_options__
        payload = encode(message)
        if len(payload) > self.config.max_message_bytes:
            raise MessageTooLarge(
                f"{options.name} body is {len(payload)} bytes, above max_message_bytes={self.config.max_message_bytes}"
            )
        kind = wire.KIND_CODES[options.kind]
        tname = options.name.encode()
        plan: list[tuple[OutChannel | None, Outgoing, str]] = []
        for peer, flags, kb, partition, service in self._destinations(message, options.name, options.kind):
            if peer is not None and len(payload) > peer.max_message_bytes:
                raise MessageTooLarge(
                    f"{options.name} body is {len(payload)} bytes, above {peer.node}'s limit of {peer.max_message_bytes}"
                )
            item = Outgoing(kind, flags, tname, kb, partition, msg_id, trace_id, cause_id, payload, on_done)
            plan.append((self.channel(peer) if peer is not None else None, item, service))
        if not plan:
            self.stats.unrouted += 1
        return plan

    def send_outputs(self, job: Job, outputs: list[Message]) -> int:
        """Send what a handler emitted/sent; returns how many envelopes must be acked first."""
        env = job.env
        handler = job.handler
        assert handler is not None
        handler_id = self.dispatcher._handler_ids[handler.message_name]
        done = partial(self.dispatcher.output_done, job)
        now = self.clock()
        count = 0
        for position, message in enumerate(outputs):
            msg_id = idempotency_id(message) or core.derive_id(env.msg_id, handler_id, position)
            for ch, item, service in self._plan(message, msg_id, env.trace_id, env.msg_id, done):
                if ch is None:
                    self._homeless.setdefault(service, deque()).append(item)  # until an instance is back
                else:
                    self._append(ch, item, now)
                count += 1
        return count

    def send_reply(self, job: Job, reply: bytes) -> bool:
        """Queue a command's or query's result for its sender; False if the sender is gone.

        Replies travel in REPLY frames, ahead of the ack that covers their command. A reply lost
        with its frame is recovered by the caller, who resends the command when it sees the
        command acked but unanswered: dedup answers the resend from the cached result.
        """
        assert job.channel is not None
        peer = job.channel.peer
        if not peer.live or job.channel.closed:
            return False
        env = job.env
        self._replies.setdefault(peer.incarnation, []).append(wire.reply_entry(env.msg_id, env.type.encode(), reply))
        self.schedule_flush()
        return True

    def on_reply(self, msg_id: bytes, type_name: str, payload: bytes) -> None:
        calls = self._calls.pop(msg_id, None)
        if not calls:
            return
        ok, body = decode_reply(payload)
        for call in calls:
            if call.future.done():
                continue
            if ok:
                try:
                    result = result_decoder_for(call.cls).decode(body)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    call.future.set_exception(ValidationError(f"result of {type_name}: {exc}"))
                else:
                    call.future.set_result(result)
            else:
                etype, message = body  # type: ignore[misc]
                call.future.set_exception(HandlerFailed(type_name, call.service, etype, message))

    # ================================================================================ the app's API

    def _check_origin(self, message: Message, verb: str) -> None:
        if not isinstance(message, Message):
            raise TypeError(f"{verb} takes a choreo message (Event, Command or Query), got {type(message).__name__}")
        if self.service is None:
            return
        declared = self.service.emits if verb == "emit" else self.service.sends
        if type(message) not in declared:
            name = message_options(type(message)).name
            raise UndeclaredMessage(
                f"service {self.service.name} {verb}s {name} outside a handler without declaring it: "
                f"add it to Service({self.service.name!r}, {verb}s=[...])"
            )

    def _origin_ids(self, message: Message, traceparent: str | None) -> tuple[bytes, bytes]:
        """A new flow starts here: its trace id is the first message's id, unless the caller has one."""
        msg_id = idempotency_id(message) or self.fresh_id()
        trace_id = parse_traceparent(traceparent) if traceparent else msg_id
        return msg_id, trace_id

    def _blocked(self, plan: list[tuple[OutChannel | None, Outgoing, str]]) -> OutChannel | str | None:
        """What stops the plan now: a channel without credit, a service without instances, or None."""
        for ch, item, service in plan:
            if ch is None:
                return service
            hold = self.holds.held(ch.peer.service_name, item.partition) if self.holds.by_key else None
            if hold is not None:
                if len(hold.queue) >= hold.channel.window.max_messages and not item.flags & wire.FLAG_UNKEYED:
                    return hold.channel  # a long hold is backpressure too
            elif not ch.can_accept(item.size):
                return ch
        return None

    def _commit(self, plan: list[tuple[OutChannel | None, Outgoing, str]]) -> None:
        now = self.clock()
        for ch, item, _ in plan:
            assert ch is not None
            self._append(ch, item, now)

    def _backpressure(self, ch: OutChannel | str, waited: float) -> Backpressure:
        self.stats.backpressure_errors += 1
        if isinstance(ch, str):
            return Backpressure.unavailable(ch, waited)
        w = ch.window
        return Backpressure(ch.peer.node, w.in_flight + len(ch.backlog), w.max_messages, waited, w.in_flight_bytes)

    # -- the fast path of emit: one compiled plan per event type, straight into the windows -----

    def _compile_emit(self, cls: type) -> _EmitPlan:
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise TypeError(f"emit takes a choreo event, got {cls.__name__}")
        options = message_options(cls)
        if options.kind != "event":
            raise ChoreoUsageError("emit takes an event; use send() for commands and ask() for queries")
        if self.service is not None and cls not in self.service.emits:
            raise UndeclaredMessage(
                f"service {self.service.name} emits {options.name} outside a handler without declaring it: "
                f"add it to Service({self.service.name!r}, emits=[...])"
            )
        targets = []
        max_bytes = self.config.max_message_bytes
        unavailable = False
        for r in self._routes(options.name, "event"):
            peers = self.membership.instances(r.service)
            if not peers:
                unavailable = unavailable or (r.service in self.membership.lost and not r.broadcast)
                continue
            max_bytes = min(max_bytes, *(p.max_message_bytes for p in peers))
            flags = 0 if r.key_field is not None else wire.FLAG_UNKEYED
            by_partition = None
            if r.broadcast:
                flags |= wire.FLAG_BROADCAST
            elif r.key_field is not None:
                by_partition = []
                for p in range(r.partitions):
                    owner = self.membership.owner(r.service, p)
                    assert owner is not None
                    by_partition.append(self.channel(owner))
            targets.append(_EmitTarget(flags, r.key_field, r.partitions, by_partition, [self.channel(p) for p in peers], r.service))
        plan = _EmitPlan(self.membership.version, options.name.encode(), targets, options.idempotency is not None, max_bytes)
        plan.unavailable = unavailable
        plan.lane, plan.lane_channels = None, []
        if len(targets) == 1 and not targets[0].flags & wire.FLAG_BROADCAST and not unavailable:
            # one destination service: the compiled lane writes the envelope straight into its window
            t = targets[0]
            channels = t.by_partition if t.by_partition is not None else t.channels
            plan.lane_channels = channels
            plan.lane = core.EmitLane(
                plan.tname, t.key_field, t.partitions, [ch.window for ch in channels], _encode, key_bytes, self.ids,
                self.config.max_batch, self.config.max_batch_bytes, max_bytes,
            )
        self._emit_plans[cls] = plan
        return plan

    def _fast_emit(self, event: Message) -> bytes | None:
        """Emit without waiting if every destination has credit; None means: take the slow path."""
        plan = self._emit_plans.get(type(event))
        if plan is None or plan.version != self.membership.version:
            plan = self._compile_emit(type(event))
        lane = plan.lane
        if lane is None or self.holds.by_key:
            return self._emit_general(plan, event)
        msg_id = lane.emit(event, self.clock(), idempotency_id(event) if plan.idempotent else None)
        if msg_id is None:
            return None  # no credit (or a message too large): the slow path waits or explains
        ch = plan.lane_channels[lane.last]
        if lane.full:
            self._send_data(ch, ch.take_body())  # type: ignore[arg-type]
        else:
            self._dirty_out.add(ch)
            if not self._flush_scheduled:
                self.schedule_flush()
        self.stats.emitted += 1
        return msg_id

    def _emit_general(self, plan: _EmitPlan, event: Message) -> bytes | None:
        """Several destinations (all or none get it), or a partition held back: in Python."""
        if plan.unavailable:
            return None  # a subscriber has no live instance: the slow path waits for one
        payload = _encode(event)
        if len(payload) > plan.max_bytes:
            return None  # the slow path raises MessageTooLarge with the details
        msg_id = idempotency_id(event) if plan.idempotent else self.ids.next()
        targets = plan.targets
        tname = plan.tname
        base = _HEADER_SIZE + len(tname) + len(payload)
        if not targets:
            self.stats.unrouted += 1
            self.stats.emitted += 1
            return msg_id
        sends: list[tuple[OutChannel, int, bytes, int]] = []
        for t in targets:
            if t.by_partition is not None:
                kb = key_bytes(getattr(event, t.key_field))  # type: ignore[arg-type]
                partition = _partition_of(kb, t.partitions)
                ch = t.by_partition[partition]
                if ch.backlog or not ch.window.has_credit(base + len(kb)) or (t.service, partition) in self.holds.by_key:
                    return None
                sends.append((ch, t.flags, kb, partition))
            elif t.flags & wire.FLAG_BROADCAST:
                kb = key_bytes(getattr(event, t.key_field)) if t.key_field else b""
                partition = _partition_of(kb, t.partitions) if t.key_field else 0
                for ch in t.channels:
                    if ch.backlog or not ch.window.has_credit(base + len(kb)):
                        return None
                    sends.append((ch, t.flags, kb, partition))
            else:
                best = min(t.channels, key=_channel_load)
                if best.backlog or not best.window.has_credit(base):
                    return None
                sends.append((best, t.flags, b"", 0))
        now = self.clock()
        for ch, flags, kb, partition in sends:
            ch.window.append(_KIND_EVENT, flags, tname, kb, partition, msg_id, msg_id, ZERO_ID, payload, now)
            if ch.window.pending >= ch.max_batch or ch.window.pending_bytes >= ch.max_batch_bytes:
                self._send_data(ch, ch.take_body())  # type: ignore[arg-type]
            else:
                self._dirty_out.add(ch)
        if not self._flush_scheduled:
            self.schedule_flush()
        self.stats.emitted += 1
        return msg_id

    def try_emit(self, event: Message, *, traceparent: str | None = None) -> bytes:
        """Publish an event now or raise :class:`Backpressure` at once; returns its message id."""
        if traceparent is None:
            msg_id = self._fast_emit(event)
            if msg_id is not None:
                return msg_id
        self._check_origin(event, "emit")
        if message_options(type(event)).kind != "event":
            raise ChoreoUsageError("emit takes an event; use send() for commands and ask() for queries")
        msg_id, trace_id = self._origin_ids(event, traceparent)
        plan = self._plan(event, msg_id, trace_id, ZERO_ID, None)
        blocked = self._blocked(plan)
        if blocked is not None:
            raise self._backpressure(blocked, 0.0)
        self._commit(plan)
        self.stats.emitted += 1
        return msg_id

    async def _await_credit(
        self,
        plan: list[tuple[OutChannel | None, Outgoing, str]],
        timeout: float,
        replan: Callable[[], list[tuple[OutChannel | None, Outgoing, str]]],
    ) -> list[tuple[OutChannel | None, Outgoing, str]]:
        """Wait until every destination can take it (all or nothing), re-planning when owners change."""
        blocked = self._blocked(plan)
        if blocked is None:
            return plan
        self.stats.backpressure_waits += 1
        start = self.clock()
        deadline = start + timeout
        loop = asyncio.get_running_loop()
        version = self.membership.version
        while blocked is not None:
            if self.membership.version != version or (not isinstance(blocked, str) and blocked.closed):
                version = self.membership.version
                plan = replan()
                blocked = self._blocked(plan)
                continue
            if self.clock() >= deadline:
                raise self._backpressure(blocked, self.clock() - start)
            fut: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            if isinstance(blocked, str):
                self._service_waiters.setdefault(blocked, []).append(wake)
            else:
                blocked.credit_waiters.append(wake)
            self.call_later(max(deadline - self.clock(), 0.0), wake)
            await fut
            blocked = self._blocked(plan)
        return plan

    async def emit(self, event: Message, *, timeout: float | None = None, traceparent: str | None = None) -> bytes:
        """Publish an event, waiting up to ``timeout`` for credit; returns its message id."""
        if traceparent is None:
            msg_id = self._fast_emit(event)
            if msg_id is not None:
                return msg_id
        self._check_origin(event, "emit")
        if message_options(type(event)).kind != "event":
            raise ChoreoUsageError("emit takes an event; use send() for commands and ask() for queries")
        msg_id, trace_id = self._origin_ids(event, traceparent)

        def replan() -> list[tuple[OutChannel | None, Outgoing, str]]:
            return self._plan(event, msg_id, trace_id, ZERO_ID, None)

        plan = replan()
        if self._blocked(plan) is not None:
            plan = await self._await_credit(plan, self.config.emit_timeout if timeout is None else timeout, replan)
        self._commit(plan)
        self.stats.emitted += 1
        return msg_id

    async def request(
        self,
        message: Message,
        *,
        timeout: float | None,
        trace_id: bytes | None = None,
        cause_id: bytes = ZERO_ID,
        traceparent: str | None = None,
        origin_check: bool = True,
    ) -> Any:
        """Send a command or query and await its result (shared by send and ask)."""
        options = message_options(type(message))
        if origin_check:
            self._check_origin(message, "send")
        timeout = self.config.request_timeout if timeout is None else timeout
        msg_id = idempotency_id(message) or self.fresh_id()
        if trace_id is None:
            trace_id = parse_traceparent(traceparent) if traceparent else msg_id
        start = self.clock()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        resends = [0]

        def acked() -> None:
            # processed (acked), and its answer came first on the same connection unless that frame
            # was lost: then ask again; dedup answers the resend from the cached result
            if future.done() or resends[0] >= 3:
                return
            resends[0] += 1
            self.stats.resent_requests += 1
            try:
                self._commit(replan())
                self.flush()
            except ChoreoError as exc:
                future.set_exception(exc)

        def replan() -> list[tuple[OutChannel | None, Outgoing, str]]:
            return self._plan(message, msg_id, trace_id, cause_id, acked)

        plan = replan()
        owner = plan[0][2]
        call = _Call(future, type(message), owner)
        self._calls.setdefault(msg_id, []).append(call)
        try:
            if self._blocked(plan) is not None:
                plan = await self._await_credit(plan, timeout, replan)
            self._commit(plan)
            self.flush()  # a caller waits on the answer: no turn of the loop before it leaves
            self.stats.sent += 1

            def expire() -> None:
                if not future.done():
                    future.set_exception(
                        DeliveryTimeout(f"{options.kind} {options.name} to {owner}: no answer within {timeout:.1f} s")
                    )

            self.call_later(max(start + timeout - self.clock(), 0.0), expire)
            return await future
        finally:
            calls = self._calls.get(msg_id)
            if calls is not None:
                if call in calls:
                    calls.remove(call)
                if not calls:
                    del self._calls[msg_id]

    async def send(self, command: Message, *, timeout: float | None = None, traceparent: str | None = None) -> Any:
        """Send a command to its owner; returns the handler's result once it is processed."""
        if message_options(type(command)).kind != "command":
            raise ChoreoUsageError("send takes a command; use emit() for events and ask() for queries")
        return await self.request(command, timeout=timeout, traceparent=traceparent)

    async def ask(
        self,
        query: Message,
        *,
        timeout: float | None = None,
        trace_id: bytes | None = None,
        cause_id: bytes = ZERO_ID,
        traceparent: str | None = None,
    ) -> Any:
        """Ask a query; returns its answer."""
        if message_options(type(query)).kind != "query":
            raise ChoreoUsageError("ask takes a query; use send() for commands and emit() for events")
        return await self.request(
            query,
            timeout=timeout,
            trace_id=trace_id,
            cause_id=cause_id,
            traceparent=traceparent,
            origin_check=cause_id == ZERO_ID,
        )

    # ================================================================================ input

    def on_frame(self, data: bytes, identity: bytes | None = None) -> None:
        """Handle one received frame. Invalid input is counted and dropped; nothing raises."""
        self.stats.frames_in += 1
        if len(data) > self.config.max_frame_bytes:
            self.count_refused("oversized", f"frame of {len(data)} bytes, limit {self.config.max_frame_bytes}")
            return
        try:
            frame_type, flags, sender, receiver = wire.parse_header(data)
            if receiver and receiver != self.incarnation:
                self._refuse_stale(sender, receiver)
                return
            known = self.membership.peers.get(sender)
            if known is not None and known.state == "dead" and frame_type != wire.REFUSE:
                self._tell_dead(known)  # it must come back as a new incarnation
                return
            if frame_type == wire.DATA:
                self._on_data(sender, data, flags)
            elif frame_type == wire.REPLY:
                self._on_replies(sender, data, flags)
            elif frame_type == wire.ACK:
                self._on_ack(sender, data, wire.HEADER_SIZE)
            elif frame_type == wire.HEARTBEAT:
                self._on_heartbeat(sender, wire.decode_control(frame_type, data))
            elif frame_type == wire.HELLO:
                self._on_hello(sender, wire.decode_control(frame_type, data))
            elif frame_type == wire.BYE:
                self._on_bye(sender)
            elif frame_type == wire.REFUSE:
                self._on_refuse(sender, wire.decode_control(frame_type, data))
            elif frame_type == wire.RPC:
                self._on_rpc(identity, wire.decode_control(frame_type, data))
            else:
                raise ProtocolError("malformed", f"unexpected {wire.FRAME_NAMES[frame_type]} frame")
        except ProtocolError as exc:
            self.count_refused(exc.reason, exc.detail)
        if self.membership.version != self._synced_version:
            self.sync_view()

    def _on_replies(self, sender: int, data: bytes, flags: int) -> None:
        ack_at, ack_len, body_at = wire.split_ack(data, flags)
        for msg_id, type_name, payload in wire.parse_replies(data, body_at):
            self.on_reply(msg_id, type_name, payload)
        if ack_len:  # after the answers: the ack must not find their commands unanswered
            self._on_ack(sender, data[: ack_at + ack_len], ack_at)

    def _on_data(self, sender: int, data: bytes, flags: int = 0) -> None:
        ack_at, ack_len, body_at = wire.split_ack(data, flags)
        if ack_len:
            self._on_ack(sender, data[: ack_at + ack_len], ack_at)
        ch = self.inbound.get(sender)
        if ch is None:
            peer = self.membership.peers.get(sender)
            if peer is None or not peer.live:
                raise ProtocolError("unknown_peer", f"data from {sender:016x}, which never said hello")
            ch = self.inbound[sender] = InChannel(self.incarnation, peer, self.config.window)
        self.membership.heard(sender, self.clock())
        try:
            released = ch.reorder.feed(data, body_at)
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"data frame from {ch.peer.node}: {exc}") from None
        self.batch_wall = self.wall()
        limit = self.config.max_message_bytes + core.HEADER_SIZE + 255 + 65535
        for i, env in enumerate(released):
            if env.size > limit:  # rare: refuse it and take the others one by one
                ok = []
                for e in released[i:]:
                    if e.size > limit:
                        self.count_refused("oversized", f"{e.type} envelope of {e.size} bytes from {ch.peer.node}")
                        ch.reorder.complete(e.seq)
                    else:
                        ok.append(e)
                released = released[:i] + ok
                break
        if released:
            # taken in now, handled in turns of RUN_BUDGET envelopes: under overload the node keeps
            # answering heartbeats and queries, and what waits here is its measurable lag
            self._runq.append((ch, released, self.batch_wall))
            if not self._run_scheduled and self._loop is not None:
                self._run_scheduled = True
                self._loop.call_soon(self._run)
        if ch.reorder.ack_pending:
            self.ack_later(ch)

    def _run(self) -> None:
        """Hand received envelopes to their handlers, at most RUN_BUDGET per turn of the loop."""
        self._run_scheduled = False
        runq = self._runq
        budget = RUN_BUDGET
        now = self.clock()
        deliver_batch = self.dispatcher.deliver_batch
        while runq and budget > 0:
            ch, envs, received = runq.popleft()
            if ch.closed:
                continue  # its sender is gone and resends these to their owners elsewhere
            self.batch_wall = received
            deliver_batch(ch, envs, now)
            budget -= len(envs)
        self.dispatcher.pump()
        if runq and self._loop is not None:
            self._run_scheduled = True
            self._loop.call_soon(self._run)
        self.flush()

    def _on_ack(self, sender: int, data: bytes, offset: int) -> None:
        ch = self.out.get(sender)
        if ch is None:
            return  # an ack for a channel we no longer have: harmless
        self.membership.heard(sender, self.clock())
        try:
            ch.on_ack(data, offset, self.clock())
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"ack from {ch.peer.node}: {exc}") from None
        if self.holds.by_key:
            self._release_holds(self.holds.release(ch))
        if ch.window.pending:
            self._dirty_out.add(ch)
        self.dispatcher.pump()
        self.schedule_flush()

    def _on_hello(self, sender: int, hello: wire.Hello) -> None:
        if hello.incarnation != sender or sender == 0:
            raise ProtocolError("malformed", "hello whose incarnation does not match its header")
        if sender == self.incarnation:
            return
        known = self.membership.peers.get(sender)
        if known is None:
            try:
                self.membership.check_conflicts(hello.service)  # our own service is in there too
            except Conflict as exc:
                self.count_refused("conflict", f"{hello.node}: {exc}")
                self.transport.connect(hello.endpoint)
                self._send(
                    hello.endpoint,
                    wire.encode_control(wire.REFUSE, self.incarnation, sender, wire.Refuse("conflict", str(exc))),
                )
                return
        elif not known.live:
            self._tell_dead(known)  # we had declared it dead or gone: it must come back anew
            return
        now = self.clock()
        peer, new, replaced = self.membership.upsert(
            Peer(
                incarnation=sender,
                endpoint=hello.endpoint,
                node=hello.node,
                service=hello.service,
                window=hello.window,
                max_message_bytes=hello.max_message_bytes,
                last_heard=now,
            )
        )
        peer.serving = peer.serving or hello.serving
        for old in replaced:
            log.info("%s: %s replaced %s at %s", self.name, peer.node, old.node, old.endpoint)
            self._peer_gone(old)
        if new:
            self.transport.connect(hello.endpoint)
            log.info("%s: %s joined (%s)", self.name, peer.node, peer.endpoint)
            self._rehome(peer)
        if hello.leaving:
            self.membership.leaving(sender)
        if hello.reply or new:
            self._say_hello(hello.endpoint, reply=False, receiver=sender)
        self._learn(hello.peers)
        if not self._settled:
            # joined: settle once every peer the mesh told us about has answered our hello
            self._contacted = True
            known = {p.endpoint for p in self.membership.peers.values()}
            if all(ref.endpoint in known or ref.incarnation in self.membership.peers for ref in hello.peers):
                self._settled = True

    def _learn(self, refs: Iterable[wire.PeerRef]) -> None:
        now = self.clock()
        for ref in refs:
            if ref.incarnation == self.incarnation or ref.incarnation in self.membership.peers:
                continue
            if now - self._hello_sent.get(ref.endpoint, -1e9) < self.config.heartbeat * 2:
                continue
            self._say_hello(ref.endpoint, reply=True)

    def _on_heartbeat(self, sender: int, hb: wire.Heartbeat) -> None:
        peer = self.membership.heard(sender, self.clock())
        if peer is not None:
            peer.serving = peer.serving or hb.serving
        if peer is not None and hb.leaving and peer.routable:
            self.membership.leaving(sender)
        if hb.ack_please and peer is not None:
            ch = self.inbound.get(sender)
            if ch is not None:
                self._send_ack(ch)
        self._learn(hb.peers)

    def _on_bye(self, sender: int) -> None:
        peer = self.membership.left(sender)
        if peer is not None:
            log.info("%s: %s left", self.name, peer.node)
            self._peer_gone(peer)

    def _on_refuse(self, sender: int, refuse: wire.Refuse) -> None:
        self.count_refused("refused_by_peer", f"{refuse.reason}: {refuse.detail}")
        if refuse.reason == "conflict":
            self.fatal = ChoreoUsageError(f"the mesh refused this node: {refuse.detail}")
        elif refuse.reason == "dead":
            self.reincarnate(f"{self.membership.peers[sender].node if sender in self.membership.peers else sender} "
                             "declared us dead (a network partition, or a long pause)")

    def _tell_dead(self, peer: Peer) -> None:
        """Tell a peer we declared dead that it is (at most once a second)."""
        now = self.clock()
        if now - self._told_dead.get(peer.incarnation, -1e9) < 1.0:
            return
        self._told_dead[peer.incarnation] = now
        self.transport.connect(peer.endpoint)
        refuse = wire.Refuse("dead", f"{self.name} declared {peer.node} dead; rejoin as a new incarnation")
        self._send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, peer.incarnation, refuse))

    def reincarnate(self, reason: str) -> None:
        """Rejoin the mesh under a new incarnation, keeping what is still ours to deliver.

        The mesh declared this incarnation dead and moved its partitions; its channels are
        void on the other side. What it had sent and not seen acknowledged is resent, under the
        new incarnation, to the current owners; dedup ids and cached results stay valid.
        """
        old_name = self.name
        self.incarnation = int.from_bytes(os.urandom(8), "little") | 1
        if self._auto_name:
            self.name = f"{self._label}#{self.incarnation & 0xFFFFFF:06x}"
        log.warning("%s: %s; rejoining as %s", old_name, reason, self.name)
        self.stats.reincarnations += 1
        leftovers: list[tuple[str | None, Outgoing]] = []
        for ch in list(self.out.values()):
            service = ch.peer.service_name
            self.stats.redelivered_closed += ch.window.stats().retransmitted
            leftovers.extend((service, item) for item in ch.evacuate())
        for _, _, hold in self.holds.release() + [t for t in self.holds.take_all()]:
            leftovers.extend((hold.channel.peer.service_name, item) for item in hold.queue)
        for ich in self.inbound.values():
            ich.closed = True
        endpoints = {p.endpoint for p in self.membership.peers.values() if p is not self.me}
        self.out.clear()
        self.inbound.clear()
        self._dirty_out.clear()
        self._dirty_in.clear()
        self.holds = Holds()
        self.membership = Membership(self.config.suspect_after, self.config.dead_after)
        if self.ownership is not None and self.service is not None:
            self.ownership = Ownership(self.service.partitions, self.incarnation)
        self._route_cache.clear()
        self._emit_plans.clear()
        self._told_dead.clear()
        for service, item in leftovers:
            if service is None:
                if item.on_done is not None:
                    item.on_done()  # its receiver's channel is void: nothing left to wait for
            else:
                self._homeless.setdefault(service, deque()).append(item)
        now = self.clock()
        self.me = Peer(
            incarnation=self.incarnation,
            endpoint=self.transport.endpoint,
            node=self.name,
            service=self.spec,
            window=self.config.window,
            max_message_bytes=self.config.max_message_bytes,
            last_heard=now,
        )
        self.membership.upsert(self.me)
        self._settled = False
        self._started_at = now
        self._synced_version = -1
        self._seeds = sorted(endpoints)
        for endpoint in self._seeds:
            self._say_hello(endpoint, reply=True)
        self.tracer.instance = self.name

    def _refuse_stale(self, sender: int, receiver: int) -> None:
        peer = self.membership.peers.get(sender)
        self.count_refused("stale", f"frame for incarnation {receiver:016x}, this node is {self.incarnation:016x}")
        if peer is not None and peer.live:
            self._send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, wire.Refuse("stale")))

    # ================================================================================ peers gone

    def _peer_gone(self, peer: Peer) -> None:
        """A peer died or left: resend what it had not acknowledged to the new owners, in order."""
        self._route_cache.clear()
        ch = self.out.pop(peer.incarnation, None)
        gone_in = self.inbound.pop(peer.incarnation, None)
        if gone_in is not None:
            gone_in.closed = True
        if not any(p.endpoint == peer.endpoint and p.live for p in self.membership.peers.values()):
            self.transport.disconnect(peer.endpoint)
        if self.ownership is not None:
            owned = self.ownership.previous_gone(peer.incarnation)
            if owned:
                log.info("%s: took over %d partitions %s was handing over", self.name, len(owned), peer.node)
                self._release_buffered(owned)
        # a command waiting on the gone peer is resent below with its id: its caller keeps waiting
        if ch is None:
            return
        held = self.holds.take_channel(ch)  # resent after the evacuated envelopes, in order
        self.stats.redelivered_closed += ch.window.stats().retransmitted
        items = ch.evacuate()
        service = peer.service_name
        now = self.clock()
        moved = 0
        for item in items:
            if item.flags & wire.FLAG_BROADCAST or service is None:
                if item.on_done is not None:
                    item.on_done()  # its receiver is gone: nothing left to wait for
                continue
            target = self._new_home(service, item)
            if target is None:
                self._homeless.setdefault(service, deque()).append(item)
            else:
                self._append(self.channel(target), item, now)
                moved += 1
        if moved:
            log.info("%s: resent %d unacknowledged envelopes of %s to its new owners", self.name, moved, peer.node)
        self._release_holds(held)

    # ================================================================================ partition moves

    def sync_view(self) -> None:
        """The membership changed: update partition ownership and the producer's holds."""
        self._synced_version = self.membership.version
        self.holds.on_view(self.membership, self.out)
        if self._service_waiters:
            for service in [s for s in self._service_waiters if self.membership.instances(s)]:
                for wake in self._service_waiters.pop(service):
                    wake()
        if self.ownership is None or not self._settled or self.service is None:
            return
        view = [p.incarnation for p in self.membership.instances(self.service.name)]
        peers = self.membership.peers
        changed = self.ownership.update(
            view,
            lambda inc: inc in peers and peers[inc].live,
            self.clock(),
            lambda inc: inc in peers and peers[inc].serving,
        )
        if changed:
            self._release_buffered(changed)

    def _ownership_timers(self, now: float) -> None:
        ownership = self.ownership
        assert ownership is not None
        if ownership.awaiting:
            late = ownership.expire(now, self.config.handover_timeout)
            if late:
                log.warning("%s: no handover for partitions %s within %.0f s: taking them", self.name, late,
                            self.config.handover_timeout)
                self._release_buffered(late)
        if ownership.draining:
            lag = self.dispatcher.stats.lag
            for p, target in list(ownership.draining.items()):
                if lag.get(p, 0) == 0:
                    self._hand_over(p, target)

    def _hand_over(self, p: int, target: int) -> None:
        """Partition ``p`` is drained: send its dedup ids to its new owner, after every forward."""
        assert self.ownership is not None and self.service is not None
        self.ownership.drained(p)
        payload = self.dispatcher.export_partition(p)
        peer = self.membership.peers.get(target)
        if peer is None or not peer.live:
            peer = self.membership.owner(self.service.name, p)
        if peer is None or peer.incarnation == self.incarnation:
            return
        item = Outgoing(
            wire.KIND_HANDOVER, 0, b"choreo.handover", b"", p, self.fresh_id(), ZERO_ID, ZERO_ID, payload, None
        )
        self._append(self.channel(peer), item, self.clock())

    def on_handover(self, env: Any) -> None:
        """The previous owner of a partition finished draining it."""
        p = env.partition
        self.dispatcher.import_partition(p, env.payload)
        if self.ownership is not None and self.ownership.handed_over(p, self.clock()):
            self._release_buffered([p])

    def _release_buffered(self, partitions: list[int]) -> None:
        """Arrivals buffered for partitions that became ours (run them) or someone else's (forward)."""
        assert self.ownership is not None
        now = self.clock()
        for p in partitions:
            queue = self.ownership.buffered.pop(p, None)
            while queue:
                ch, env = queue.popleft()
                self.dispatcher.untrack(p)
                self.dispatcher.deliver(ch, env, now)
        self.dispatcher.pump()
        self.schedule_flush()

    def forward(self, channel: InChannel, env: Any) -> bool:
        """Send an arrival for a partition we do not own to its owner; ack the original after."""
        assert self.service is not None
        target = self.membership.owner(self.service.name, env.partition)
        if target is None or target.incarnation == self.incarnation:
            return False

        def done(channel: InChannel = channel, seq: int = env.seq) -> None:
            channel.reorder.complete(seq)
            self.ack_later(channel)

        self.stats.forwarded += 1
        self._append(self.channel(target), _forwarded(env, done), self.clock())
        return True

    def _release_holds(self, released: list[tuple[str, int, Any]]) -> None:
        now = self.clock()
        for service, p, hold in released:
            while hold.queue:
                item = hold.queue.popleft()
                target = self.membership.owner(service, p)
                if target is None:
                    self._homeless.setdefault(service, deque()).append(item)
                else:
                    self._append(self.channel(target), item, now)

    def _new_home(self, service: str, item: Outgoing) -> Peer | None:
        if item.flags & wire.FLAG_UNKEYED:
            return self._least_loaded(service)
        return self.membership.owner(service, item.partition)

    def _rehome(self, peer: Peer) -> None:
        """A new instance arrived: send it the envelopes that had nowhere to go."""
        service = peer.service_name
        if service is None or service not in self._homeless:
            return
        items = self._homeless.pop(service)
        now = self.clock()
        for item in items:
            target = self._new_home(service, item)
            if target is None:
                self._homeless.setdefault(service, deque()).append(item)
            else:
                self._append(self.channel(target), item, now)

    # ================================================================================ diagnostics

    def count_refused(self, reason: str, detail: str) -> None:
        """Count and log (at most once a second per reason) something invalid a peer sent."""
        self.stats.refused[reason] += 1
        now = self.clock()
        if now - self._log_budget.get(reason, -1e9) >= 1.0:
            self._log_budget[reason] = now
            log.warning("%s refused (%s): %s [%d so far]", self.name, reason, detail, self.stats.refused[reason])

    def _lag(self) -> dict[int, int]:
        """Messages received but not yet handled, per partition (counted when asked)."""
        lag = dict(self.dispatcher.stats.lag)
        for _, envs, _ in self._runq:
            for env in envs:
                lag[env.partition] = lag.get(env.partition, 0) + 1
        return dict(sorted(lag.items()))

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges of this node (what ``choreo top`` and metrics read)."""
        d = self.dispatcher
        out_in_flight = sum(ch.window.in_flight + len(ch.backlog) for ch in self.out.values())
        return {
            "node": self.name,
            "service": self.service.name if self.service else None,
            "incarnation": f"{self.incarnation:016x}",
            "endpoint": self.transport.endpoint,
            "time": self.wall(),
            "received": d.stats.received,
            "processed": d.stats.processed,
            "failed_attempts": d.stats.failed_attempts,
            "dead_letters": len(d.dead_letters),
            "dead_lettered": d.stats.dead_lettered,
            "duplicates": d.stats.duplicates,
            "in_handler": d.stats.in_handler,
            "lag": self._lag(),
            "emitted": self.stats.emitted,
            "sent": self.stats.sent,
            "in_flight": out_in_flight,
            "redelivered": self.stats.redelivered_closed + sum(ch.window.stats().retransmitted for ch in self.out.values()),
            "dedup_hits": self.stats.dedup_hits,
            "backpressure_waits": self.stats.backpressure_waits,
            "backpressure_errors": self.stats.backpressure_errors,
            "unrouted": self.stats.unrouted,
            "forwarded": self.stats.forwarded,
            "reincarnations": self.stats.reincarnations,
            "resent_requests": self.stats.resent_requests,
            "partitions": self.ownership.summary() if self.ownership is not None else {},
            "holds": len(self.holds.by_key),
            "refused": dict(self.stats.refused),
            "frames_in": self.stats.frames_in,
            "frames_out": self.stats.frames_out,
            "peers": {
                p.node: {"state": p.state, "service": p.service_name, "endpoint": p.endpoint}
                for p in self.membership.peers.values()
            },
        }

    # ================================================================================ system queries

    def _register_rpc(self) -> None:
        self._rpc["spec"] = lambda args: self.membership.system_spec()
        self._rpc["stats"] = lambda args: self.snapshot()
        self._rpc["spans"] = lambda args: self.tracer.query(
            bytes.fromhex(args["trace_id"]) if args.get("trace_id") else None, int(args.get("limit", 1000))
        )
        self._rpc["dlq.list"] = lambda args: [dl.summary() for dl in self.dispatcher.dead_letters.values()]
        self._rpc["dlq.show"] = self._rpc_dlq_show
        self._rpc["dlq.replay"] = lambda args: self.dispatcher.replay(int(args["id"])).summary()
        self._rpc["peers"] = lambda args: [
            {"node": p.node, "endpoint": p.endpoint, "service": p.service_name, "state": p.state}
            for p in self.membership.peers.values()
        ]

    def _rpc_dlq_show(self, args: dict[str, Any]) -> dict[str, Any]:
        letter = self.dispatcher.dead_letters[int(args["id"])]
        out = letter.summary()
        out["payload"] = _payload_view(letter.payload)
        out["traceback"] = letter.traceback
        return out

    def register_rpc(self, method: str, fn: Callable[[dict[str, Any]], Any]) -> None:
        self._rpc[method] = fn

    def _on_rpc(self, identity: bytes | None, rpc: wire.Rpc) -> None:
        if identity is None:
            raise ProtocolError("malformed", "rpc without a connection to answer on")
        fn = self._rpc.get(rpc.method)
        if fn is None:
            reply = wire.RpcReply(rpc.id, False, error=f"unknown method {rpc.method!r}; known: {sorted(self._rpc)}")
        else:
            try:
                reply = wire.RpcReply(rpc.id, True, result=fn(rpc.args))
            except Exception as exc:  # the client asked for something impossible: tell it why
                reply = wire.RpcReply(rpc.id, False, error=f"{type(exc).__name__}: {exc}")
        try:
            frame = wire.encode_control(wire.RPC_REPLY, self.incarnation, 0, reply)
        except (TypeError, msgspec.EncodeError) as exc:
            frame = wire.encode_control(wire.RPC_REPLY, self.incarnation, 0, wire.RpcReply(rpc.id, False, error=str(exc)))
        self.transport.reply(identity, frame)


def _payload_view(payload: bytes) -> Any:
    try:
        return msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return payload.hex()

