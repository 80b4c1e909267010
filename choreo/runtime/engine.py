"""One node incarnation's logic, without sockets or clocks of its own: the parts, wired.

An :class:`Engine` is one node incarnation: frames go in (:meth:`Engine.on_frame`), frames come
out through the transport it is given, time comes from the clock it is given, and
:meth:`Engine.tick` is called when :meth:`Engine.next_tick` says (every few milliseconds while
messages are being handled, else at the next deadline: a timer, membership, a retransmission). The real node (:mod:`choreo.node`) plugs
in ZeroMQ and ``time.monotonic``; the test harness (:mod:`choreo.testing`) plugs in a lossy
in-memory link and a virtual clock, and the same code runs under both.

The engine owns no logic of its own; each job is a part
(:mod:`choreo.runtime` lists them), and what a frame does is one line of the frame table:

* membership frames (``HELLO``, ``PING``, ``PONG``, ``SYNC``..., :meth:`Gossip.handlers
  <choreo.runtime.gossip.Gossip.handlers>`) go to :class:`~choreo.runtime.gossip.Gossip`;
* ``DATA`` goes to the :class:`~choreo.runtime.intake.Intake`: through the sender's in-channel
  (order) to the :class:`~choreo.runtime.dispatch.Dispatcher` (dedup, per-key order, handlers),
  commands first, events in turns so that heartbeats and commands are answered under load;
* ``ACK`` and ``REPLY`` go to :class:`~choreo.runtime.returns.Returns`: an ack frees credit in
  the :class:`~choreo.runtime.outbox.Outbox` and releases holds, an answer resolves the callers
  waiting in :class:`~choreo.runtime.calls.Calls`;
* ``RPC`` is a system query (the CLI), answered on the connection it came on by
  :class:`~choreo.runtime.queries.SystemQueries`.

Before any of that, :class:`~choreo.runtime.admission.Admission` checks that the frame speaks
for a sender on the connection (and key) that sender joined on, and, with keys, that the key
may do what the frame asks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .. import core, wire
from ..config import NodeConfig
from ..errors import ProtocolError
from ..service import Service
from ..tracing import Tracer
from .admission import Admission, PolicySource, unnamed
from .calls import Calls, DurableCalls
from .channels import InChannel
from .dispatch import Dispatcher
from .former import FormerLife
from .gossip import Gossip
from .holds import Holds
from .intake import Intake
from .journal import Journal
from .lastflows import LastFlows
from .lifecycle import Lifecycle
from .membership import Membership, Peer, durable_key
from .moves import Moves
from .outbox import Outbox
from .ownership import Ownership
from .queries import SystemQueries
from .relief import Relief
from .replicas import Replicas
from .returns import Returns
from .routing import ZERO_ID, Router
from .stats import Counters
from .store import Store
from .vigil import Vigil

__all__ = ["Engine", "Transport"]

log = logging.getLogger("choreo.node")

FrameHandler = Callable[[int, bytes, int, "bytes | None", "str | None"], None]


class Transport(Protocol):
    """What the engine needs from the network."""

    endpoint: str

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...

    def redial(self, endpoint: str) -> None: ...

    def send(self, endpoint: str, frame: bytes) -> None: ...

    def reply(self, identity: bytes, frame: bytes) -> None: ...

    # optional: ``input_waiting() -> bool``, frames wait to be read (and are read next)


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
        ids: Any = None,
        incarnations: Callable[[], int] | None = None,
        policy: PolicySource | None = None,
        store: Store | None = None,
    ) -> None:
        """``ids`` and ``incarnations`` draw fresh message ids and incarnations (seeded in tests);
        ``policy`` returns the mesh's :class:`~choreo.trust.Policy` (with keys; None without).

        ``store``: a durable node's store (:mod:`~choreo.runtime.store`), opened for it: the node
        takes its name from it, and a rendezvous key derived from that name.
        """
        if service is not None:
            service.validate()
        self.service = service
        self.transport = transport
        self.config = config = config or NodeConfig()
        self.clock = clock
        self.wall = wall
        self._incarnations = incarnations or _new_incarnation
        self.incarnation = incarnation or self._incarnations()
        self._label = service.name if service else "client"
        if store is not None and name is None:
            name = store.identity.name
        self._auto_name = name is None
        self.name = name or f"{self._label}#{self.incarnation & 0xFFFFFF:06x}"
        # a durable node: what must commit before it acks, and a key that keeps its partitions
        self.journal = (
            Journal(store, clock=clock, wall=wall, call_later=self.call_later, max_delay=config.tick)
            if store is not None
            else None
        )
        self._key = durable_key(self.name) if store is not None else b""
        self.former_names: list[str] = []  # earlier incarnations of this node (declared dead), newest last
        self.former: FormerLife | None = None  # the last one's envelopes in flight, for late acks
        self.spec = service.spec() if service else None
        self.counters = Counters()
        self.admission = Admission(policy, self.spec)
        self.lifecycle = Lifecycle()
        self.ids = ids if ids is not None else core.IdSource(os.urandom(8))
        self.membership = Membership()
        self.receiver_missing = self.membership.receiver_missing  # (Host)
        self.holds = Holds()
        self.outbox = Outbox(
            transport, config, clock=clock, holds=self.holds, counters=self.counters, journal=self.journal
        )
        self.router = Router(
            self.membership, self.outbox, self.holds,
            service=service, config=config, clock=clock, ids=self.ids, counters=self.counters,
            routing=lambda: self.lifecycle.state in ("joined", "leaving"), life=self.lifecycle,
        )
        self.calls = Calls(
            self.router, self.outbox, self.holds, self.membership,
            lifecycle=self.lifecycle, service=service, config=config, clock=clock, call_later=self.call_later,
            counters=self.counters, join_status=lambda: self.gossip.joining.status(),
        )
        self.gossip = Gossip(self.membership, self.outbox, self.lifecycle, self, config=config, clock=clock)
        self.moves = (
            Moves(
                Ownership(service.partitions, self.incarnation, wall,
                          self.journal.epoch if self.journal is not None else None),
                self.membership, self.outbox, self.lifecycle,
                service=service.name, config=config, clock=clock, fresh_id=self.ids.next, counters=self.counters,
                refused=self.count_refused, stateful=bool(service.state), durable=self.journal is not None,
            )
            if service is not None
            else None
        )
        self.tracer = Tracer(self._label, self.name, config.span_ring, clock)  # spans on the node's clock
        # what the dispatcher asks of its node (its Host) is mostly the outbox's and the calls' own
        self.ack_later = self.outbox.ack_later
        # (the dispatcher's host: see PartitionData.handed_on, Dispatcher._succeeded)
        self.keep, self.kept_ran, self.release = self.outbox.keep, self.outbox.kept_ran, self.outbox.release
        self.schedule_flush = self.outbox.schedule_flush
        self.flush = self.outbox.flush  # every pending batch and ack, now (the transport calls it when idle)
        self.send_outputs = self.calls.send_outputs
        replicas = None
        if self.moves is not None and service is not None and service.replicas:
            replicas = self.moves.replicas = Replicas(
                self.moves.ownership, self.membership, self.moves.send_transfer,
                service=service.name, config=config, clock=clock, refused=self.count_refused,
            )
        self.dispatcher = Dispatcher(
            self, service, config=config, tracer=self.tracer, moves=self.moves, journal=self.journal,
            replicas=replicas,
        )
        if self.moves is not None:
            self.moves.work, self.moves.data = self.dispatcher, self.dispatcher.data
            self.moves.name = self.name
        if replicas is not None:
            replicas.work = self.dispatcher.data
            replicas.name = self.name
        self.returns = Returns(self.outbox, self.membership, self.holds, self.router, self.calls, self.dispatcher,
                               clock=clock, refused=self.count_refused)
        self.relief = Relief(self.dispatcher, self.outbox, after=config.rto)  # (a channel held by a cycle)
        self.last_flows = LastFlows(service.name if service else None, self.membership, self.outbox, self.dispatcher,
                                    config=config, incarnation=lambda: self.incarnation)
        self.intake = Intake(
            self.outbox, self.membership, self.admission, self.dispatcher, config=config, clock=clock,
            refused=self.count_refused, on_ack=self.returns.on_ack,
            input_waiting=getattr(transport, "input_waiting", None),
        )
        self.emit_now = self.router.emit_now  # the caller's fast path: no hop through the engine
        # ... and the fastest: the compiled lane of the event's type; None for a durable node (its
        # emits are checked against its disk first)
        self.emit_fast: Callable[[Any], bytes | None] | None = (
            self.router.emit_table.emit if self.journal is None else None
        )
        # the application's verbs are the calls part's own (see choreo.runtime.calls)
        durable = DurableCalls(self.calls, self.journal, config=config, clock=clock) if self.journal else None
        self.try_emit = self.calls.try_emit if durable is None else durable.try_emit
        self.emit = self.calls.emit if durable is None else durable.emit
        self.emit_many = self.calls.emit_many if durable is None else durable.emit_many
        self.send = self.calls.send
        self.ask = self.calls.ask
        # the look at its own life before it acts: frozen, or cut off, long enough to be taken for dead?
        self.vigil = Vigil(config, self.membership, self.gossip, rejoin=self.declared_dead,
                           incarnation=lambda: self.incarnation)
        self.awake = self.vigil.awake  # (the dispatcher's host: see Vigil.awake)
        self._max_frame = config.max_frame_bytes
        self._synced_version = -1
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        # how long a tick may wait while messages are only in flight: their deadlines (an ack's
        # retransmission, an answer's timeout) are known, this bounds what a tick cannot see (a
        # batch sent since it looked); a tenth of a second with the default rto
        self.in_flight_tick = max(config.tick, config.rto / 8)
        self._timer_seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_budget: dict[str, float] = {}
        self.queries = SystemQueries(
            self.admission, refused=self.count_refused, incarnation=lambda: self.incarnation,
            reply=lambda identity, frame: self.transport.reply(identity, frame),  # (read when answering)
        )
        self.register_rpc = self.queries.register
        on_rpc = self.queries.on_rpc
        self._frames: dict[int, FrameHandler] = {
            wire.DATA: self.intake.on_data,
            wire.REPLY: self.returns.on_replies,
            wire.ACK: self.returns.on_ack_frame,
            wire.FLOWS: self.last_flows.on_frame,
            wire.RELEASE: self.returns.on_release,
            wire.HELLO: self._on_hello,
            wire.REFUSE: self._on_refuse,
            wire.RPC: lambda sender, data, flags, identity, principal: on_rpc(
                identity, wire.decode_control(wire.RPC, data), principal
            ),
        }
        may_gossip = self.admission.may_gossip
        for frame_type, handle in self.gossip.handlers().items():  # membership: ping, pong, news, sync, bye...
            self._frames[frame_type] = (
                lambda sender, data, flags, identity, principal, handle=handle: handle(sender, data, may_gossip(principal))
            )

    # ================================================================================ lifecycle

    def start(self, seeds: Iterable[str] = ()) -> None:
        """Join the mesh: register ourselves, then say hello to every seed."""
        self._loop = asyncio.get_running_loop()
        self.calls.loop = self.intake.loop = self.returns.loop = self._loop
        self.outbox.start(self._loop, self.incarnation)
        if self.journal is not None:  # a restart: what the store kept (sent again once joined)
            resent = self.journal.restore(self.outbox, self.dispatcher.data, self.membership)
            if resent:
                log.info("%s: %d unacknowledged messages from the data dir wait to be sent again", self.name, resent)
        self.gossip.start(self._me(), seeds)
        self.sync_view()

    def _me(self) -> Peer:
        c = self.config
        return Peer(
            incarnation=self.incarnation,
            endpoint=self.transport.endpoint,
            node=self.name,
            service=self.spec,
            window=c.window,
            max_message_bytes=c.max_message_bytes,
            last_heard=self.clock(),
            key=self._key,
        )

    def begin_leave(self) -> None:
        """Stop taking new work: peers route around us while we finish what we hold."""
        self.gossip.begin_leave()
        if self.journal is not None:
            self.outbox.store_parked()
        self.outbox.flush()

    def finish_leave(self) -> None:
        """Say goodbye to every peer (after draining)."""
        waiting = {service: len(queue) for service, queue in self.outbox.waiting.items() if queue}
        if waiting:
            where = ("stay in its store: they go out when it starts again on its data dir"
                     if self.journal is not None else "go with it (in memory, nothing else keeps this node's copies)")
            log.warning("%s leaves with messages for services that have no instance (%s): they %s", self.name,
                        ", ".join(f"{n} for {service}" for service, n in sorted(waiting.items())), where)
        self.gossip.finish_leave()
        self.outbox.flush()

    @property
    def state(self) -> str:
        """This node's lifecycle state (see :data:`~choreo.states.NODE_TRANSITIONS`)."""
        return self.lifecycle.state

    @property
    def fatal(self) -> Exception | None:
        """Why this node can do nothing more, once it cannot: the mesh refused it, or it stopped."""
        return self.lifecycle.fatal

    def close(self, why: Exception) -> None:
        """The node stopped, nothing ticks: every verb raises ``why`` (or a refusal that came first),
        and every caller still waiting hears it now (nothing is left to answer or time them out)."""
        self.lifecycle.fatal = self.lifecycle.fatal or why
        self.calls.abandon(self.lifecycle.fatal)

    @property
    def leaving(self) -> bool:
        return self.lifecycle.leaving

    @property
    def holding(self) -> bytes:
        """(GossipHost) The partitions this node owns or drains, as a bitmap."""
        return self.moves.ownership.holding() if self.moves is not None else b""

    @property
    def restored(self) -> list[tuple[int, int]]:
        """(GossipHost) The partitions read back and not settled yet, with their copies' epochs."""
        return self.moves.ownership.restored_epochs() if self.moves is not None else []

    @property
    def copies(self) -> bytes:
        """(GossipHost) The partitions this node keeps a standby copy of, as a bitmap."""
        return self.moves.replicas.keeping() if self.moves is not None and self.moves.replicas is not None else b""

    @property
    def ownership(self) -> Ownership | None:
        return self.moves.ownership if self.moves is not None else None

    @property
    def batch_received(self) -> float:
        """When the batch being handled arrived (the dispatcher's Host: the spans' clock)."""
        return self.intake.received

    @property
    def drained(self) -> bool:
        """Nothing in progress here and nothing of ours unacknowledged elsewhere."""
        if not self.dispatcher.idle or self.intake.queue:
            return False
        if self.moves is not None and self.moves.busy:
            return False
        if self.outbox.acks_owed:
            return False
        return all(ch.idle for ch in self.outbox.live_channels())

    @property
    def acknowledged(self) -> bool:
        """Everything this node sent is acknowledged and nothing waits for an instance."""
        return self.outbox.idle

    def take_undelivered(self) -> dict[str, int]:
        """Message types that reached no one since the last call, with their counts."""
        undelivered = dict(self.router.undelivered)
        self.router.undelivered.clear()
        return undelivered

    # ================================================================================ timers

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay`` seconds of the engine's clock (checked at each tick)."""
        heapq.heappush(self._timers, (self.clock() + delay, next(self._timer_seq), callback))

    @property
    def awake_until(self) -> float:
        """(the dispatcher's host) See :attr:`Vigil.until <choreo.runtime.vigil.Vigil.until>`."""
        return self.vigil.until

    @property
    def busy(self) -> bool:
        """Work that a tick must look at within ``tick``: messages being handled or waiting for
        a handler, a membership change not yet applied, hand-overs, a commit due. Cheap: it looks
        at no channel (it is asked after every read)."""
        if self.intake.queue or self.membership.version != self._synced_version or not self.dispatcher.idle:
            return True
        moves = self.moves
        if moves is not None and (moves.busy or moves.ownership.awaiting or moves.early or moves.sending):
            return True  # hand-overs in progress, waited for, settled, or sent again
        journal = self.journal
        return journal is not None and (journal.dirty or journal.failing is not None)  # a commit due, or to retry

    def next_tick(self) -> float:
        """When :meth:`tick` next has work (the engine's clock): a tick away while the engine is
        :attr:`busy`; else the next deadline of a timer, of membership, of a request's answer or of
        a retransmission, and no later than :attr:`in_flight_tick` while messages are in flight."""
        now = self.clock()
        if self.busy:
            return now + self.config.tick
        due = min(self.gossip.next_due, self.calls.next_deadline())
        if self._timers:
            due = min(due, self._timers[0][0])
        if not self.drained:  # sent and not yet acknowledged, or received and not yet done
            due = min(due, now + self.in_flight_tick, self.outbox.next_retransmission())
        self.vigil.idle_until = max(due, now)
        return self.vigil.idle_until

    def tick(self) -> None:
        """Timers: retransmissions, membership (probes, suspicions, news), retries and deadlines."""
        now = self.clock()
        self.vigil.check(now)
        self.outbox.retransmit(now)
        self.gossip.tick(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            callback()
        self.calls.expire(now)
        if self.membership.version != self._synced_version:
            self.sync_view()
        if self.moves is not None:
            self.moves.tick(now)
        if self.journal is not None:
            self.journal.tick(now)
        self.relief.tick(now)
        if self.lifecycle.leaving:
            self.last_flows.tick(now)
        self.dispatcher.pump()
        self.outbox.flush()

    # ================================================================================ input

    def on_frame(self, data: bytes, identity: bytes | None = None, principal: str | None = None) -> bool:
        """Handle one received frame. Invalid input is counted and dropped; nothing raises.

        The caller calls :meth:`flush` after a run of frames (what they produced leaves then).
        True when the frame woke a caller awaiting an answer: a reader may let that caller's task
        run before it reads on (and flushes).

        ``identity`` is the connection it came on, ``principal`` the key that connection
        authenticated as (None without keys): see :mod:`~choreo.runtime.admission`.
        """
        self.counters.frames_in += 1
        # the caller flushes after a run of frames (the transport after each read, the harness after
        # each frame): what this frame's handling appends leaves then, without a turn of the loop
        self.outbox.flush_scheduled = True
        self.awake(self.clock())  # (a frame read after a freeze may be for an incarnation now over)
        if len(data) > self._max_frame:
            self.count_refused("oversized", f"frame of {len(data)} bytes, limit {self._max_frame}")
            return False
        frame_type = 0
        woke = False
        try:
            frame_type, flags, sender, receiver = wire.parse_header(data)
            former = self.former
            if former is not None and receiver == former.incarnation and (frame_type == wire.ACK or flags & wire.FLAG_ACK):
                self._late_ack(former, frame_type, sender, data, flags, identity, principal)
                return False
            known = self.membership.peers.get(sender)
            if known is None or identity is None or identity != known.identity or principal != known.principal:
                # (a member's frame on the connection it is bound to, under its key, needs none of this)
                refused = self.admission.speaks_for(known, frame_type, identity, principal)
                if refused is not None:
                    raise ProtocolError(*refused)
                if known is not None and known.identity is None and frame_type != wire.HELLO and sender != self.incarnation:
                    why = self.admission.may_bind(known, principal)
                    if why is not None:
                        raise ProtocolError("not_allowed", f"a frame that speaks for {known.node}: {why}")
                    known.identity, known.principal = identity, principal  # its frames come only from there now
                    if not known.vouched:
                        self.gossip.vouched(known)  # it speaks for itself, under a key that may serve
            if receiver and receiver != self.incarnation:
                self.gossip.refuse_stale(sender, receiver)
                return False
            if known is not None and known.state == "dead" and frame_type != wire.REFUSE:
                self.gossip.tell_dead(known)  # it must come back as a new incarnation
                return False
            handle = self._frames.get(frame_type)
            if handle is None:
                raise ProtocolError("malformed", f"unexpected {wire.FRAME_NAMES[frame_type]} frame")
            woke = handle(sender, data, flags, identity, principal) is True  # (only REPLY's says)
        except ProtocolError as exc:
            self.count_refused(exc.reason, exc.detail)
        except Exception as exc:  # a bug, or input nobody foresaw: counted and logged, never out of the reader
            what = wire.FRAME_NAMES.get(frame_type, "unknown")
            self.count_refused("internal_error", f"{type(exc).__name__} handling a {what} frame: {exc}")
            log.debug("%s: internal error in the frame path", self.name, exc_info=True)
        if self.membership.version != self._synced_version:
            self.sync_view()
        return woke

    def _on_hello(self, sender: int, data: bytes, flags: int, identity: bytes | None, principal: str | None) -> None:
        hello = wire.decode_control(wire.HELLO, data)
        replaces = [p for p in self.membership.peers.values()
                    if p.endpoint == hello.endpoint and p.live and p.incarnation != sender]
        why = self.admission.may_join(hello, principal, replaces)
        if why is None and principal is not None and sender not in self.membership.peers:
            why = self._key_full(principal, hello.endpoint)
        if why is not None:
            raise ProtocolError("not_allowed", f"hello from {hello.node}: {why}")
        self.gossip.on_hello(sender, hello, trusted=self.admission.may_gossip(principal))
        peer = self.membership.peers.get(sender)
        if peer is not None and peer.identity is None and sender != self.incarnation and not unnamed(identity):
            peer.identity, peer.principal = identity, principal  # its frames come only from there from now on
            if not peer.vouched:
                self.gossip.vouched(peer)

    def _key_full(self, principal: str, endpoint: str) -> str | None:
        """Why a new member under key ``principal`` at ``endpoint`` is one too many, or None (a
        member that replaces one at its own endpoint takes its place: it is not counted)."""
        limit = self.config.max_members_per_key
        under_key = sum(1 for p in self.membership.peers.values()
                        if p.live and p.principal == principal and p.endpoint != endpoint)
        if under_key < limit:
            return None
        return (f"the key {principal!r} has {under_key} live members here already "
                f"(NodeConfig.max_members_per_key = {limit})")

    def _on_refuse(self, sender: int, data: bytes, flags: int, identity: bytes | None, principal: str | None) -> None:
        refuse = wire.decode_control(wire.REFUSE, data)
        peer = self.membership.peers.get(sender)
        authoritative = self.admission.conflict_counts(peer, principal, refuse.detail)
        self.gossip.on_refuse(sender, refuse, authoritative=authoritative)

    # ================================================================================ membership changes

    def sync_view(self) -> None:
        """The membership changed: the producer's holds, waiting callers, partition ownership."""
        self._synced_version = self.membership.version
        self.holds.on_view(self.membership, self.outbox.out)
        self.calls.wake_services()
        if self.moves is not None:
            self.moves.sync()

    def on_joined(self) -> None:
        """(GossipHost) This node has joined: take our partitions, route what waited, wake callers."""
        self._synced_version = -1
        self.router.invalidate()  # emit plans compiled before joining route nothing
        self.sync_view()
        for service in list(self.outbox.waiting):
            self.router.rehome(service)
        self.calls.on_joined()
        self.outbox.schedule_flush()

    def peer_joined(self, peer: Peer) -> None:
        """(GossipHost) A new instance: send it what waited for one (once this node routes)."""
        if self.calls.routing:
            self.router.rehome(peer.service_name)

    def service_retired(self, service: str) -> None:
        """(GossipHost) An operator retired ``service``: what waited here for it has nobody to go to."""
        dropped = self.outbox.take_waiting(service)
        if dropped:
            for item in dropped:
                if item.on_done is not None:
                    item.on_done()
            self.counters.unrouted += len(dropped)
            log.warning("%s: %s was retired: dropped the %d messages waiting for it", self.name, service, len(dropped))

    def retire(self, service: str) -> dict[str, Any]:
        """Forget ``service`` for good, here and (by gossip) in the whole mesh: scaling a service to
        zero is only ever this explicit act. ChoreoUsageError while it has live instances."""
        known = service in self.membership.declared
        waiting = len(self.outbox.waiting.get(service, ()))
        self.membership.retire(service)
        self.service_retired(service)
        log.info("%s: retired %s (an operator's order; gossip tells the mesh)", self.name, service)
        return {"service": service, "known": known, "dropped": waiting, "node": self.name}

    def peer_gone(self, peer: Peer) -> None:
        """(GossipHost) A peer died or left: resend what it had not acknowledged to the new owners, in order."""
        self.router.invalidate()
        ch = self.outbox.close(peer.incarnation, self.dispatcher.data.keep_all_ran)
        if not any(p.endpoint == peer.endpoint and p.live for p in self.membership.peers.values()):
            self.transport.disconnect(peer.endpoint)
        if self.moves is not None:
            self.moves.previous_gone(peer.incarnation, peer.node)
        # a command waiting on the gone peer is resent below with its id: its caller keeps waiting
        if ch is None:
            return
        held = self.holds.take_channel(ch)  # resent after the evacuated envelopes, in order
        self.holds.on_view(self.membership, self.outbox.out)  # the owners the resend routes by (see Holds)
        evacuated = ch.evacuate()  # (first the copies we kept for it)
        if self.moves is not None:  # forwards of partitions ours again run here first (see take_back)
            evacuated = self.moves.take_back(evacuated)
        # what already waits for an instance of that service came after what the channel held (it
        # was its last instance, leaving): it goes back behind it (nemesis seed 3303, 100 s)
        later = self.outbox.take_waiting(peer.service_name) if peer.service_name is not None else None
        moved = self.router.resend(peer.service_name, evacuated)
        if moved:
            log.info("%s: resent %d unacknowledged envelopes of %s to its new owners", self.name, moved, peer.node)
        self.router.release_holds(held)
        if later:
            for item in later:
                self.outbox.park(peer.service_name, item)  # type: ignore[arg-type]
            if self.calls.routing:
                self.router.rehome(peer.service_name)

    def declared_dead(self, reason: str) -> None:
        """(GossipHost) The mesh declared this incarnation dead: rejoin under a new one.

        The mesh moved its partitions and its channels are void on the other side. What it had
        sent and not seen acknowledged is resent, under the new incarnation, to the current
        owners; dedup ids and cached results stay valid.
        """
        if self.lifecycle.state in ("refused", "left"):
            return
        former = FormerLife(self.incarnation, self.clock() + self.config.rto)
        old_name = self.name
        self.former_names = [*self.former_names[-15:], old_name]
        self.incarnation = self._incarnations()
        if self._auto_name:
            self.name = f"{self._label}#{self.incarnation & 0xFFFFFF:06x}"
        log.warning("%s: %s; rejoining as %s", old_name, reason, self.name)
        self.lifecycle.on("declared_dead", self.clock())
        self.counters.reincarnations += 1
        if self.journal is None:  # (a durable node acknowledges only what its journal committed)
            self.dispatcher.data.keep_all_ran()
            self.outbox.send_replies()  # (before the acks that cover their commands)
            self.outbox.send_acks()  # before the channels close with this life
        leftovers = self.outbox.evacuate_all(self.incarnation, former)
        self.former = former
        for _, _, hold in self.holds.take_all():
            leftovers.extend((hold.channel.peer.service_name, item) for item in hold.queue)
        # what waited for an instance came after what the channels and holds had: behind them
        leftovers.extend((service, item) for service in list(self.outbox.waiting)
                         for item in self.outbox.take_waiting(service) or ())
        endpoints = self.membership.rejoin_endpoints(self.gossip.incarnation)
        self.membership.clear()
        if self.moves is not None:
            self.moves.reset(self.incarnation, self.name)
        self.router.invalidate()
        for service, item in leftovers:
            if item.kind == wire.KIND_HANDOVER:
                continue  # streams were for that incarnation: moves start over under the new one
            if service is None:
                if item.on_done is not None:
                    item.on_done()  # its receiver's channel is void: nothing left to wait for
            else:
                self.outbox.park(service, item)
        self._synced_version = -1
        self.gossip.rejoin(self._me(), endpoints)
        self.tracer.instance = self.name

    def _late_ack(
        self, former: FormerLife, frame_type: int, sender: int, data: bytes, flags: int, identity: bytes | None,
        principal: str | None,
    ) -> None:
        """An ACK addressed to this node's last life (see :mod:`~choreo.runtime.former`): what
        it covers and still waits to be sent again is done; the rest is refused as stale."""
        now = self.clock()
        if now > former.until:
            self.former = None  # (its moment is over: what it held is sent again or done by now)
        done = former.acknowledged(sender, frame_type, data, flags, identity, principal, now)
        for item in done:
            if self.outbox.unpark(item) and item.on_done is not None:
                item.on_done()
        if not done:
            self.gossip.refuse_stale(sender, former.incarnation)

    # ================================================================================ the dispatcher's host

    def send_reply(self, channel: InChannel, env: Any, reply: bytes) -> bool:
        """Queue a command's or query's result for its sender; False if the sender is gone.

        Replies travel in REPLY frames, ahead of the ack that covers their command. A reply lost
        with its frame is recovered by the caller, who resends the command when it sees the
        command acked but unanswered: dedup answers the resend from the cached result.
        """
        if not channel.peer.live or channel.closed:
            return False
        self.outbox.queue_reply(channel.peer, wire.reply_entry(env.msg_id, env.type.encode(), reply))
        return True

    def has_owner(self, type_name: str) -> bool:
        return bool(self.membership.owners(type_name))

    # ================================================================================ diagnostics

    def count_refused(self, reason: str, detail: str) -> None:
        """Count and log (at most once a second per reason) something invalid a peer sent."""
        self.counters.refused[reason] += 1
        now = self.clock()
        if now - self._log_budget.get(reason, -1e9) >= 1.0:
            self._log_budget[reason] = now
            log.warning("%s refused (%s): %s [%d so far]", self.name, reason, detail, self.counters.refused[reason])

    def lag(self) -> dict[int, int]:
        """Messages received but not yet handled, per partition (counted when asked; the node's
        statistics are :func:`choreo.introspect.node_stats`)."""
        return dict(sorted(self.intake.lag(dict(self.dispatcher.stats.lag)).items()))


def _new_incarnation() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1
