"""Where each message goes: destinations from declarations and membership, and the emit lane.

How this works. A message type's *routes* come from what the live services declare (every
service subscribed to an event; the one owner of a command or query), cached per membership
version. A route becomes a *destination* per copy: keyed messages go to the owner of the key's
partition (rendezvous over the service's live instances, the same answer on every node),
unkeyed ones to the least loaded instance, broadcast ones to every instance.

Events from outside handlers take a faster road: an :class:`EmitPlan` per event type, compiled
for one membership version, holds the channel of every partition's owner; when one service
subscribes, the core's ``EmitLane`` encodes, routes and appends the envelope in one call
(:meth:`Router.emit_now`). Anything it cannot do at once (no credit, a held partition, several
subscribers without credit for all) returns None, and the caller takes the waiting path.

Routes come from the *declared* system, not from who is live: a copy for a declared service
with no live instance right now has no channel, and waits at this node (the outbox keeps it,
bounded) until an instance appears. Only a type that no declared service consumes goes nowhere:
counted as unrouted and logged once per type. Envelopes that lost their receiver (it died or
left) or waited for an instance are routed again here (:meth:`Router.resend`,
:meth:`Router.rehome`), in order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from .. import core, wire
from ..config import NodeConfig
from ..errors import ChoreoUsageError, MessageTooLarge, NoOwner, UndeclaredMessage
from ..messages import (
    Message, MessageOptions, decoder_for, encode_checked, idempotency_id, message_options, simple_fields,
)
from ..service import Service
from .channels import OutChannel, Outgoing
from .holds import Hold, Holds
from .membership import Membership, Peer
from .outbox import Outbox
from .stats import Counters

__all__ = ["Router", "Route", "Destination", "PlannedCopy", "EmitPlan", "RequestLane", "key_bytes", "ZERO_ID"]

log = logging.getLogger("choreo.node")
ZERO_ID = bytes(16)
_encoder = msgspec.msgpack.Encoder()  # the same encoding as choreo.messages.encode
_encode, _encode_into = _encoder.encode, _encoder.encode_into
_partition_of = core.partition_of
_HEADER_SIZE = core.HEADER_SIZE
_KIND_EVENT = wire.KIND_EVENT
_EMIT_INVALID, _EMIT_BLOCKED = core.EMIT_INVALID, core.EMIT_BLOCKED

#: (peer, flags, key, partition, service): one copy of a message; peer None: no live instance now
Destination = tuple[Peer | None, int, bytes, int, str]
#: (channel or None when it must wait for an instance, envelope, service)
PlannedCopy = tuple[OutChannel | None, Outgoing, str]


def key_bytes(value: Any) -> bytes:
    """The ordering key of a field value, identical on every host (``str()`` of it, UTF-8).

    >>> key_bytes("c-1"), key_bytes(42)
    (b'c-1', b'42')
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


class Route:
    """One service that must get a copy of a message type."""

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


class EmitPlan:
    """How events of one type leave this node, for one membership version."""

    __slots__ = ("version", "tname", "targets", "idempotent", "max_bytes", "unavailable", "lane", "lane_channels")

    def __init__(
        self, version: int, tname: bytes, targets: list[_EmitTarget], idempotent: bool, max_bytes: int, unavailable: bool
    ) -> None:
        self.version = version
        self.tname = tname
        self.targets = targets
        self.idempotent = idempotent
        self.max_bytes = max_bytes
        self.unavailable = unavailable  # a subscriber has no live instance: emits wait for one
        self.lane: Any = None  # the core's EmitLane when one service subscribes
        self.lane_channels: list[OutChannel] = []


class RequestLane:
    """How a command or query type leaves this node while the membership stays as it is: the
    core's lane (its ``request`` encodes, checks, routes and writes one into its window, marked
    urgent) and the service that owns the type (named in a timeout)."""

    __slots__ = ("lane", "service", "channels")

    def __init__(self, lane: Any, service: str, channels: list[OutChannel]) -> None:
        self.lane = lane
        self.service = service
        self.channels = channels  # the lane's, by the index it wrote last (``lane.last``)


class _Alive:
    fatal = None  # (a router without a lifecycle is never refused)


def _channel_load(ch: OutChannel) -> int:
    return ch.window.in_flight + len(ch.backlog)


class Router:
    """Routes this node's messages (see the module docstring)."""

    def __init__(
        self,
        membership: Membership,
        outbox: Outbox,
        holds: Holds,
        *,
        service: Service | None,
        config: NodeConfig,
        clock: Callable[[], float],
        ids: Any,
        counters: Counters,
        routing: Callable[[], bool] = lambda: True,
        life: Any = None,
    ) -> None:
        """``routing()`` says whether the node has joined (plans compiled before route nothing);
        ``life.fatal`` set (the mesh refused this node, or it stopped) closes :attr:`emit_table`."""
        self.membership = membership
        self.routing = routing
        self.outbox = outbox
        self.holds = holds
        self.service = service
        self.config = config
        self.clock = clock
        self.ids = ids  # the core's IdSource: fresh message ids
        self.counters = counters
        self._routes: dict[str, tuple[int, list[Route]]] = {}
        self._emit_plans: dict[type, EmitPlan] = {}
        # a command's or query's compiled lane and its owning service, per membership version (None:
        # its requests take the general path)
        self._request_lanes: dict[type, tuple[int, RequestLane | None]] = {}
        # the caller's fast path (node.try_emit): each plan's lane, looked up and called in one crossing
        self.emit_table = core.EmitTable(holds.by_key, life if life is not None else _Alive())
        membership.on_change.append(self.emit_table.clear)  # lanes of an older view are stale
        self._dirty_out = outbox.dirty_out  # the emit lane marks channels here directly
        self._rr = 0  # turn of equally loaded instances for unkeyed messages
        self._unrouted_logged: set[str] = set()
        self.undelivered: Counter[str] = Counter()  # what reached no one since the caller last looked

    def invalidate(self) -> None:
        """Forget cached routes and emit plans (membership is rebuilt from scratch)."""
        self._routes.clear()
        self.counters.emitted = self.emitted()  # what the lanes emitted, before they go
        self._emit_plans.clear()
        self.emit_table.clear()
        self._request_lanes.clear()

    def fresh_id(self) -> bytes:
        return self.ids.next()  # type: ignore[no-any-return]

    # -- destinations ------------------------------------------------------------------------------

    def routes(self, name: str, kind: str) -> list[Route]:
        """The services that must get a ``kind`` message of type ``name`` (NoOwner for a command nobody owns)."""
        version = self.membership.version
        cached = self._routes.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        routes: list[Route] = []
        if kind == "event":
            for spec, h in self.membership.subscribers(name):
                routes.append(Route(spec.name, spec.partitions, h.key, h.broadcast))
        else:
            owners = self.membership.owners(name)
            if not owners:
                known = ", ".join(sorted(self.membership.declared)) or "none yet"
                raise NoOwner(f"no service in the mesh declares a handler for {kind} {name} (services known: {known})")
            if len(owners) > 1:
                raise ChoreoUsageError(f"{kind} {name} has two owners: {', '.join(s.name for s in owners)}")
            spec = owners[0]
            h = spec.handler_for(name)
            if h is None:  # pragma: no cover - owners() lists only services with a handler
                raise NoOwner(f"{spec.name} lists no handler for {kind} {name}")
            routes.append(Route(spec.name, spec.partitions, h.key, False))
        self._routes[name] = (version, routes)
        return routes

    def destinations(self, message: Message, name: str, kind: str) -> list[Destination]:
        """Every copy of ``message`` to send (see :data:`Destination`); a declared service with no
        live instance gets one copy with no peer: it waits for an instance. So does every copy
        before this node has joined: it queues behind what already waits, which joining sends first."""
        out: list[Destination] = []
        joined = self.routing()
        for r in self.routes(name, kind):
            if r.key_field is not None:
                kb = key_bytes(getattr(message, r.key_field))
                partition = core.partition_of(kb, r.partitions)
                flags = 0
            else:
                kb, partition, flags = b"", 0, wire.FLAG_UNKEYED
            if r.broadcast:  # the instances alive now (or the first to come back)
                instances = self.membership.instances(r.service) if joined else []
                for peer in instances:
                    out.append((peer, flags | wire.FLAG_BROADCAST, kb, partition, r.service))
                if not instances:
                    out.append((None, flags | wire.FLAG_BROADCAST, kb, partition, r.service))
                continue
            if not joined:
                peer = None
            elif r.key_field is not None:
                peer = self.membership.owner(r.service, partition)
            else:
                peer = self.least_loaded(r.service)
            out.append((peer, flags, kb, partition, r.service))
        return out

    def least_loaded(self, service: str) -> Peer | None:
        """The instance with the fewest envelopes in flight; equally loaded ones take turns."""
        peers = self.membership.instances(service)
        best, best_load = None, None
        self._rr += 1
        load = self.outbox.load
        for j in range(len(peers)):
            peer = peers[(j + self._rr) % len(peers)]
            n = load(peer)
            if best_load is None or n < best_load:
                best, best_load = peer, n
        return best

    def plan(
        self, message: Message, msg_id: bytes, trace_id: bytes, cause_id: bytes, on_done: Callable[[], None] | None
    ) -> list[PlannedCopy]:
        """Encode ``message`` once and make an envelope per destination (MessageTooLarge if it cannot go)."""
        options = message.__choreo_options__
        payload = encode_checked(message)
        if len(payload) > self.config.max_message_bytes:
            raise MessageTooLarge(
                f"{options.name} body is {len(payload)} bytes, above max_message_bytes={self.config.max_message_bytes}"
            )
        kind = wire.KIND_CODES[options.kind]
        tname = options.name.encode()
        plan: list[PlannedCopy] = []
        for peer, flags, kb, partition, service in self.destinations(message, options.name, options.kind):
            if peer is not None and self.outbox.waiting.get(service):
                self.rehome(service)  # what waited for an instance leaves first (see waiting_first)
            if peer is not None and len(payload) > peer.max_message_bytes:
                raise MessageTooLarge(
                    f"{options.name} body is {len(payload)} bytes, above {peer.node}'s limit of {peer.max_message_bytes}"
                )
            item = Outgoing(kind, flags, tname, kb, partition, msg_id, trace_id, cause_id, payload, on_done)
            plan.append((self.outbox.channel(peer) if peer is not None else None, item, service))
        if not plan:
            self.unrouted(options.name)
        return plan

    def unrouted(self, type_name: str, count: int = 1) -> None:
        """A message no declared service consumes: counted, and said once per type (or service)."""
        self.counters.unrouted += count
        self.undelivered[type_name] += count
        if type_name not in self._unrouted_logged:
            self._unrouted_logged.add(type_name)
            known = ", ".join(sorted(self.membership.declared)) or "none yet"
            log.warning("nobody consumes %s: no declared service subscribes to it, so it goes nowhere "
                        "(services declared: %s); `choreo lint` reports it as unconsumed-event", type_name, known)

    def commit(self, plan: list[PlannedCopy]) -> None:
        """Append every copy of a plan whose destinations all have room (see ``Calls.blocked``);
        a copy for a service with no live instance waits for one."""
        now = self.clock()
        outbox = self.outbox
        for ch, item, service in plan:
            if ch is None:  # planned while no instance was live (or before joining): one may be back since
                target = self.new_home(service, item) if self.routing() else None
                if target is None:
                    outbox.park(service, item, new=True)
                    continue
                ch = outbox.channel(target)
            outbox.append(ch, item, now)

    # -- the fast path of emit: one compiled plan per event type, straight into the windows -----

    def check_emittable(self, cls: type) -> MessageOptions:
        """The options of ``cls`` if it is an event type this node may emit outside a handler (else
        the error that says why: TypeError, ChoreoUsageError, UndeclaredMessage)."""
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
        return options

    def compile_emit(self, cls: type) -> EmitPlan:
        """The plan of an event type for the current membership (checked: an event this node may emit)."""
        options = self.check_emittable(cls)
        targets = []
        max_bytes = self.config.max_message_bytes
        unavailable = not self.routing()  # before joining: the waiting path waits for it
        channel = self.outbox.channel
        for r in self.routes(options.name, "event") if not unavailable else ():
            peers = self.membership.instances(r.service)
            if not peers:  # declared, no live instance: the waiting path keeps the copy for one
                unavailable = True
                continue
            if self.outbox.waiting.get(r.service):
                self.rehome(r.service)  # (see waiting_first)
            max_bytes = min(max_bytes, *(p.max_message_bytes for p in peers))
            flags = 0 if r.key_field is not None else wire.FLAG_UNKEYED
            by_partition = None
            if r.broadcast:
                flags |= wire.FLAG_BROADCAST
            elif r.key_field is not None:
                by_partition = self._owner_channels(r)
            targets.append(_EmitTarget(flags, r.key_field, r.partitions, by_partition, [channel(p) for p in peers], r.service))
        plan = EmitPlan(
            self.membership.version, options.name.encode(), targets, options.idempotency is not None, max_bytes, unavailable
        )
        if len(targets) == 1 and not targets[0].flags & wire.FLAG_BROADCAST and not unavailable:
            # one destination service: the compiled lane encodes, checks, routes and writes the
            # envelope straight into its window, and marks the channel for the next flush
            t = targets[0]
            channels = t.by_partition if t.by_partition is not None else t.channels
            plan.lane_channels = channels
            plan.lane = self._lane(cls, plan.tname, t.key_field, t.partitions, channels, max_bytes, wire.KIND_EVENT,
                                   idempotency_id if plan.idempotent else None)
        old = self._emit_plans.get(cls)
        if old is not None and old.lane is not None:
            self.counters.emitted += old.lane.emitted  # what the replaced lane emitted
        self._emit_plans[cls] = plan
        self.emit_table.put(cls, plan.lane)
        return plan

    def request_lane(self, cls: type) -> RequestLane | None:
        """The compiled lane of command or query type ``cls`` and the service that owns it, while
        the membership stays as it is; None while its requests must take the general path (this
        node has not joined, its owner has no live instance)."""
        version = self.membership.version
        cached = self._request_lanes.get(cls)
        if cached is not None and cached[0] == version:
            return cached[1]
        lane = self._compile_request(cls) if self.routing() else None
        self._request_lanes[cls] = (version, lane)
        return lane

    def _compile_request(self, cls: type) -> RequestLane | None:
        options = message_options(cls)
        (route,) = self.routes(options.name, options.kind)  # (NoOwner, or two owners: the general path says)
        peers = self.membership.instances(route.service)
        if not peers:
            return None
        if route.key_field is not None:
            channels = self._owner_channels(route)
        else:
            channels = [self.outbox.channel(p) for p in peers]
        max_bytes = min(self.config.max_message_bytes, *(p.max_message_bytes for p in peers))
        lane = self._lane(cls, options.name.encode(), route.key_field, route.partitions, channels, max_bytes,
                          wire.KIND_CODES[options.kind], None)
        return RequestLane(lane, route.service, channels)

    def _owner_channels(self, route: Route) -> list[OutChannel]:
        """The channel to the owner of each partition of ``route``'s (keyed) service."""
        channels = []
        for p in range(route.partitions):
            owner = self.membership.owner(route.service, p)
            if owner is None:  # pragma: no cover - a service with instances owns every partition
                raise RuntimeError(f"partition {p} of {route.service} has no owner")
            channels.append(self.outbox.channel(owner))
        return channels

    def _lane(
        self, cls: type, tname: bytes, key_field: str | None, partitions: int, channels: list[OutChannel],
        max_bytes: int, kind: int, idempotency: Callable[[Any], bytes | None] | None,
    ) -> Any:
        """The core's lane of ``cls`` into ``channels``: it encodes, checks, routes and writes an
        envelope straight into its window, and marks the channel for the next flush."""
        outbox = self.outbox
        return core.EmitLane(
            tname, key_field, partitions, [ch.window for ch in channels], _encode, key_bytes, self.ids,
            self.config.max_batch, self.config.max_batch_bytes, max_bytes, decoder_for(cls).decode,
            channels=channels, dirty=self._dirty_out, schedule=outbox.schedule_flush, send_full=outbox.send_full,
            clock=self.clock, cls=cls, idempotency=idempotency, fields=simple_fields(cls), kind=kind,
            encode_into=_encode_into,
        )

    def emitted(self) -> int:
        """Events this node emitted (the lanes count their own)."""
        return self.counters.emitted + sum(p.lane.emitted for p in self._emit_plans.values() if p.lane is not None)

    def emit_now(self, event: Message) -> bytes | None:
        """Emit without waiting if every destination has credit; None means: take the waiting path.

        Returns the new message's id. Raises for what no waiting can fix (not an event, an
        event this service does not declare).
        """
        plan = self._emit_plans.get(type(event))
        if plan is None or plan.version != self.membership.version:
            plan = self.compile_emit(type(event))
        lane = plan.lane
        if lane is None or self.holds.by_key:
            return self._emit_general(plan, event)
        return lane.emit(event)  # type: ignore[no-any-return]  # None: no credit (or an invalid or too large body)

    def has_lane(self, event: Message) -> bool:
        """Whether events of this type go through a compiled lane now (it checks them itself)."""
        plan = self._emit_plans.get(type(event))
        if plan is None or plan.version != self.membership.version:
            if not self.routing():
                return False
            plan = self.compile_emit(type(event))
        return plan.lane is not None and not self.holds.by_key

    def emit_many_now(self, events: list[Message], start: int, ids: list[bytes]) -> int:
        """Emit ``events[start:]`` in order while each has credit (one crossing per run of a type);
        returns the index of the first one that must take the waiting path (``len(events)``: none).

        The ids of the events emitted are appended to ``ids``. Every event of a run is checked
        before any of it goes (a body that does not match its type: ``ValidationError``).
        """
        n = len(events)
        plans = self._emit_plans
        version = self.membership.version
        i = start
        while i < n:
            event = events[i]
            plan = plans.get(type(event))
            if plan is None or plan.version != version:
                plan = self.compile_emit(type(event))
            lane = plan.lane
            if lane is None or self.holds.by_key:
                msg_id = self._emit_general(plan, event)
                if msg_id is None:
                    return i
                ids.append(msg_id)
                i += 1
                continue
            i, status = lane.emit_many(events, i, ids)
            if status == _EMIT_INVALID:
                self.check_body(events[i], plan.max_bytes)  # raises with the field (or the size)
                return i  # pragma: no cover - the lane's check and the codec's agree
            if status == _EMIT_BLOCKED:
                return i
        return n

    def check_body(self, message: Message, max_bytes: int) -> bytes:
        """The checked body of ``message`` (``ValidationError``, ``MessageTooLarge`` if it cannot go)."""
        payload = encode_checked(message)
        if len(payload) > max_bytes:
            raise MessageTooLarge(
                f"{message.__choreo_options__.name} body is {len(payload)} bytes, above the limit of {max_bytes}"
            )
        return payload

    def _emit_general(self, plan: EmitPlan, event: Message) -> bytes | None:
        """Several destinations (all or none get it), or a partition held back: in Python."""
        if plan.unavailable:
            return None  # a subscriber has no live instance: the waiting path waits for one
        payload = encode_checked(event)
        if len(payload) > plan.max_bytes:
            return None  # the waiting path raises MessageTooLarge with the details
        msg_id = idempotency_id(event) if plan.idempotent else self.ids.next()
        targets = plan.targets
        tname = plan.tname
        base = _HEADER_SIZE + len(tname) + len(payload)
        if not targets:
            self.unrouted(plan.tname.decode())
            self.counters.emitted += 1
            return msg_id
        sends: list[tuple[OutChannel, int, bytes, int]] = []
        held = self.holds.by_key
        for t in targets:
            if t.by_partition is not None:
                kb = key_bytes(getattr(event, t.key_field))  # type: ignore[arg-type]
                partition = _partition_of(kb, t.partitions)
                ch = t.by_partition[partition]
                if ch.backlog or not ch.window.has_credit(base + len(kb)) or (t.service, partition) in held:
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
                self.outbox.send_full(ch)
            else:
                self._dirty_out[ch] = None
        if not self.outbox.flush_scheduled:
            self.outbox.schedule_flush()
        self.counters.emitted += 1
        return msg_id

    # -- routing again: receivers gone, instances back, holds released ---------------------------

    def new_home(self, service: str, item: Outgoing) -> Peer | None:
        """The instance an envelope of ``service`` goes to now (None: none is live)."""
        if item.flags & wire.FLAG_UNKEYED:
            return self.least_loaded(service)
        return self.membership.owner(service, item.partition)

    def resend(self, service: str | None, items: list[Outgoing]) -> int:
        """Envelopes whose receiver is gone: to the current owners, in order; returns how many moved."""
        now = self.clock()
        moved = 0
        for item in items:
            if item.kind == wire.KIND_HANDOVER:
                continue  # a partition's stream or verdict was for that instance alone: moves start over
            if service is None or (item.flags & wire.FLAG_BROADCAST and self.membership.instances(service)):
                if item.on_done is not None:
                    item.on_done()  # its receiver is gone, the other instances had their copies
                continue
            moved += self.send_again(service, item, now)
        return moved

    def send_again(self, service: str, item: Outgoing, now: float) -> bool:
        """An envelope whose receiver is gone, to its new home (False: no instance, it waits).

        A copy its receiver asked us to keep (:attr:`Outgoing.home`) goes to that receiver's
        next life at the same endpoint if it has one: a node declared dead that rejoined has the
        id of what ran in its last life, and that message runs on there (its outputs went again),
        so the copy waits there as its duplicate. Sent by partition, it would run again at an
        owner without its id (the heal of a long partition, where every node rejoins).
        """
        home = item.home
        if home is not None:
            successor = self.membership.live_at(home)
            if successor is not None and successor.service_name == service:
                # (older than anything a hold orders: it goes ahead of them, as a forward does; its
                # channel keeps its home until the ack, see OutChannel.evacuate)
                self.outbox.append(self.outbox.channel(successor), item, now, forward=True)
                return True
            item.home = None
        target = self.new_home(service, item)
        if target is None:
            self.outbox.park(service, item)
            return False
        self.outbox.append(self.outbox.channel(target), item, now)
        return True

    def rehome(self, service: str | None) -> None:
        """An instance of ``service`` arrived: send it the envelopes that had nowhere to go.

        The *waiting_first* rule: whatever is planned or compiled for a service while envelopes
        wait here for it sends those first, so that nothing new overtakes them. An instance can
        be routable before the call that rehomes for it (a node that joins runs the partitions
        it takes, and their handlers emit, before it rehomes what its last life left waiting): a
        pipeline's second stage handled a key's events out of order so (chaos pipeline seed 36)."""
        if service is None:
            return
        items = self.outbox.take_waiting(service)
        if not items:
            return
        now = self.clock()
        for item in items:
            self.send_again(service, item, now)

    def release_holds(self, released: list[tuple[str, int, Hold]]) -> None:
        """Holds whose old owner is done: their queued envelopes go to the partition's owner now."""
        now = self.clock()
        for service, p, hold in released:
            while hold.queue:
                item = hold.queue.popleft()
                target = self.membership.owner(service, p)
                if target is None:
                    self.outbox.park(service, item)
                else:
                    self.outbox.append(self.outbox.channel(target), item, now)
