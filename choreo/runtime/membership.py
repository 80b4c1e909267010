"""Who is in the mesh, what the system declares, and who owns what.

Every node keeps the same picture, built from gossip (there is no coordinator). Two things in it
must not be confused:

* the **declared system** (:attr:`Membership.declared`): which services exist and what they
  consume. It only grows: a service is learned from its instances' hellos and from gossip,
  survives its instances' deaths, its last instance's graceful leave and this node's own
  reincarnation, and goes only when an operator retires it (:meth:`Membership.retire`);
* **who is live right now** (:attr:`Membership.peers` and their states, see
  :mod:`choreo.states`), which changes every second.

Routing asks the first whether anyone must get a message and the second where to send it now:
a message for a declared service with no live instance waits at its sender, it is never
dropped. The views, recomputed when first read after the picture changed:

* ``instances(service)``: the live instances of a service, in a stable order;
* ``owner(service, partition)``: rendezvous over those instances' keys, so every node that knows
  the same instances picks the same owner, and a join or leave moves only that instance's share.
  An instance's key is its incarnation, unless it is durable: then it is derived from its
  persisted name (:func:`durable_key`), so that a restarted instance takes back the partitions
  whose dedup ids it kept on disk;
* ``subscribers(type)``: every declared service with a handler for an event type;
* ``owners(type)``: the declared services handling a command or query type (exactly one is valid).

Failure detection is :mod:`~choreo.runtime.gossip`'s (SWIM). This table applies what it
concludes and what other nodes say (:meth:`Membership.merge`, the precedence rules of SWIM's
records: a member's own higher ``version`` refutes a suspicion; "dead" and "left" are final for
an incarnation), always through :data:`~choreo.states.PEER_TRANSITIONS`. It also keeps a digest
of its live members in :data:`~choreo.wire.SYNC_BUCKETS` buckets (:attr:`Membership.buckets`),
updated on every change, so that two nodes find what they disagree on by comparing 64 numbers
(anti-entropy: :meth:`Membership.table` is what one sends the other of the buckets that differ,
and :meth:`Membership.system_digest` tells whether their declared systems do).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from .. import core, wire
from ..errors import ChoreoUsageError
from ..spec import HandlerSpec, ServiceSpec, SystemSpec, system_spec
from ..states import PEER_TRANSITIONS, transition

__all__ = ["Peer", "Membership", "Update", "Conflict", "LIVE_STATES", "ROUTABLE_STATES", "durable_key"]

LIVE_STATES = frozenset({"alive", "suspect", "leaving"})  # still answers and acks
ROUTABLE_STATES = frozenset({"alive", "suspect"})  # may be given new work
STATE_CODES = {name: code for code, name in enumerate(wire.MEMBER_STATES)}
_MASK = (1 << 64) - 1


def durable_key(name: str) -> bytes:
    """The rendezvous key of a durable node: the same in every life of the node named ``name``.

    16 bytes, so it never equals an incarnation's 8-byte key::

    >>> durable_key("orders#1") == durable_key("orders#1"), len(durable_key("orders#1"))
    (True, 16)
    """
    return core.hash128(b"choreo-durable:" + name.encode())


def _bit(bitmap: bytes, partition: int) -> bool:
    """Bit ``partition % 8`` of byte ``partition // 8`` (the bitmaps of :meth:`Ownership.holding`)."""
    byte = partition >> 3
    return byte < len(bitmap) and bool(bitmap[byte] >> (partition & 7) & 1)


@dataclass(eq=False, slots=True)
class Peer:
    """One node as this node sees it."""

    incarnation: int
    endpoint: str
    node: str
    service: ServiceSpec | None
    window: int
    max_message_bytes: int
    last_heard: float
    state: str = "alive"
    holding: bytes = b""  # the partitions it says it owns or drains (a bitmap): they move by handover
    told: bool = False  # it said (hello or heartbeat) what it holds: until then ``holding`` means nothing
    version: int = 0  # its own counter (wire.Member.version): raised to refute a suspicion or to leave
    claims: str | None = None  # the service it serves, by name, while its declarations are not known here
    identity: bytes | None = None  # the connection its frames come on (bound at its first frame)
    principal: str | None = None  # the key that connection authenticated as (None without keys)
    key: bytes = b""  # the rendezvous identity: the incarnation's bytes unless given (durable nodes)
    copies: bytes = b""  # the partitions it says it keeps a standby copy of (a bitmap)
    restored: dict[int, int] = field(default_factory=dict)  # of those it holds: read back, not settled -> epoch
    # False while the only word for it is a client's introduction (with keys: gossip.introducer):
    # no work goes to it, and we pass it on to nobody, until it speaks for itself
    vouched: bool = True
    introduced_by: str | None = None  # the key that introduced it, while it is not vouched
    # derived from ``state`` and ``vouched`` (kept by Membership._move and vouch, their writers):
    # read on every frame's path, so attributes rather than properties
    live: bool = field(default=True, init=False)
    routable: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.incarnation.to_bytes(8, "little")
        self._derive()

    def _derive(self) -> None:
        """``live`` and ``routable`` from ``state`` (and ``vouched``)."""
        self.live = self.state in LIVE_STATES
        self.routable = self.vouched and self.state in ROUTABLE_STATES

    @property
    def durable(self) -> bool:
        """A durable node's: its key comes from its name (:func:`durable_key`), the same in every life."""
        return len(self.key) == 16

    @property
    def own_key(self) -> bytes:
        """The key to announce in hellos: empty when it is the incarnation's (peers derive that)."""
        return b"" if self.key == self.incarnation.to_bytes(8, "little") else self.key

    def holds(self, partition: int) -> bool:
        """Whether this peer said it owns or drains ``partition``."""
        return _bit(self.holding, partition)

    def advertised(self, said: wire.Hello | wire.Heartbeat) -> None:
        """What its hello or heartbeat says it holds, keeps copies of, and read back."""
        self.holding, self.copies, self.told = said.holding, said.copies, True
        self.restored = dict(said.restored) if said.restored else {}

    def keeps(self, partition: int) -> bool:
        """Whether this peer said it keeps a standby copy of ``partition``."""
        return _bit(self.copies, partition)

    @property
    def service_name(self) -> str | None:
        return self.service.name if self.service else self.claims

    def record(self, state: str | None = None) -> wire.Member:
        """This peer as gossip carries it (``state`` overrides its own, e.g. "suspect" for a leaving peer)."""
        return wire.Member(
            self.incarnation, self.version, STATE_CODES[state or self.state], self.endpoint, self.node,
            self.service_name, self.window, self.max_message_bytes, self.own_key,
        )


@dataclass(frozen=True, slots=True)
class Update:
    """What a record changed (:meth:`Membership.merge`): ``event`` is ``joined``, ``suspected``,
    ``refuted``, ``leaving``, ``dead``, ``left`` or ``newer`` (a newer version, nothing else)."""

    peer: Peer
    event: str
    replaced: tuple[Peer, ...] = ()


class Conflict(Exception):
    """A peer's declarations contradict the mesh's (a second owner of a command type)."""


class Membership:
    """The peer table and the routing views derived from it.

    >>> m = Membership()
    >>> m.instances("orders")
    []
    """

    def __init__(self) -> None:
        self.peers: dict[int, Peer] = {}
        self.version = 0  # bumped on every change of the routing views
        self.buckets = [0] * wire.SYNC_BUCKETS  # a digest of the live members, by incarnation % SYNC_BUCKETS
        self._stale = True
        self._instances: dict[str, list[Peer]] = {}
        self._assignment: dict[str, list[int]] = {}
        self._subscribers: dict[str, list[tuple[ServiceSpec, HandlerSpec]]] = {}
        self._owners: dict[str, list[ServiceSpec]] = {}
        self._specs: dict[str, ServiceSpec] = {}  # services with a routable instance now
        self.declared: dict[str, ServiceSpec] = {}  # the declared system (see the module docstring)
        self.retired: set[str] = set()  # services an operator retired (gossip never brings them back)
        self.live_count = 0  # live peers, this node included
        self.heard_at: float | None = None  # when a member last gave a sign of life (see heard)
        self._at: dict[str, Peer] = {}  # endpoint -> the live peer there
        self.gained: list[Peer] = []  # after upsert: known members that got their declarations with it
        self.on_change: list[Callable[[], None]] = []  # called at each new version (caches built on a view)

    def live_at(self, endpoint: str) -> Peer | None:
        """The live peer at ``endpoint``, if any."""
        peer = self._at.get(endpoint)
        return peer if peer is not None and peer.live else None

    # -- changes -------------------------------------------------------------------------------

    def rejoin_endpoints(self, me: int) -> list[str]:
        """Before a re-incarnation clears the table: where to ask for one again. The members we
        took for alive (any of them can answer), else every endpoint we knew: asked at random among
        tombstones, a node can miss the one live member and wait for ever (seed 9065 of the 100 s
        schedules)."""
        others = [p for p in self.peers.values() if p.incarnation != me]
        live = sorted({p.endpoint for p in others if p.live and p.vouched})
        return live or sorted({p.endpoint for p in others})

    def clear(self) -> None:
        """Forget every live peer (this node re-incarnates and learns who is live again).

        The declared system stays: what was meant for a service still waits for its instances.
        So do the tombstones: an incarnation this node knew dead or gone stays so for its next
        incarnation, or gossip that has not caught up yet would bring it back, and the next
        incarnation would send to a member the last one declared dead (nemesis seed 854: an
        event handled by the partition's live owner, then again by such a member). The version
        goes on, so views cached under an older one stay stale.
        """
        tombstones = [peer for peer in self.peers.values() if not peer.live]
        self.heard_at = None
        self.peers.clear()
        self.peers.update((peer.incarnation, peer) for peer in tombstones)
        self._at.clear()
        self.buckets = [0] * wire.SYNC_BUCKETS
        self.live_count = 0
        self._changed()

    def declare(self, spec: ServiceSpec) -> list[Peer] | None:
        """Learn a service from gossip (a third party's word); None if the declared system did not
        change, else the members known to serve it by name only, which get its declarations now.

        A service learned this way never replaces what its own instances said, and never
        brings back a retired service: only an instance of it can (its hello, :meth:`upsert`).
        """
        if spec.name in self.retired or spec.name in self.declared:
            return None
        return self._declare(spec)

    def _declare(self, spec: ServiceSpec) -> list[Peer]:
        self.declared[spec.name] = spec
        gained = [p for p in self.peers.values() if p.service is None and p.claims == spec.name]
        for peer in gained:
            peer.service = spec
        self._changed()
        return gained

    def retire(self, service: str) -> None:
        """An operator scales ``service`` to zero for good: forget it (ChoreoUsageError while it has
        live instances; stop them first)."""
        live = [p.node for p in self.peers.values() if p.live and p.service_name == service]
        if live:
            raise ChoreoUsageError(f"{service} still has live instances ({', '.join(live)}): stop them, then retire it")
        self.retired.add(service)
        if self.declared.pop(service, None) is not None:
            self._changed()

    def retired_by_gossip(self, service: str) -> bool:
        """Another node says ``service`` was retired; True if we forgot it now."""
        if service in self.retired:
            return False
        try:
            self.retire(service)
        except ChoreoUsageError:
            return False  # an instance of it is live here: it came back since
        return True

    def check_conflicts(self, candidate: ServiceSpec | None) -> None:
        """Raise :class:`Conflict` if ``candidate`` would give a command or query a second owner."""
        if candidate is None:
            return
        owners = self._views()._owners
        for h in candidate.handlers:
            if h.kind == "event":
                continue
            for other in owners.get(h.message, ()):
                if other.name != candidate.name:
                    raise Conflict(f"{h.kind} {h.message} has two owners: {other.name}, {candidate.name}")

    def upsert(self, peer: Peer) -> tuple[Peer, bool, list[Peer]]:
        """Add a peer (or note a sign of life of a known one). Returns (the peer, whether it is
        new, peers it replaced): a new incarnation at the endpoint of a known one replaces it.

        A peer that brings its own declarations (a hello: its own word) (re)declares its service;
        members known to serve it by name only get them too (see :attr:`gained`).
        """
        self.gained = []
        existing = self.peers.get(peer.incarnation)
        if existing is not None:
            existing.last_heard = max(existing.last_heard, peer.last_heard)
            if existing.service is None and peer.service is not None:  # its own word on what it serves
                self.retired.discard(peer.service.name)
                self.gained = self._declare(peer.service)
            return existing, False, []
        replaced = []
        other = self._at.get(peer.endpoint)
        if other is not None and other.live:
            self._move(other, "replaced")
            replaced.append(other)
        self.peers[peer.incarnation] = peer
        if peer.service is not None:  # an instance's own word: it (re)declares its service
            self.retired.discard(peer.service.name)
            self.gained = self._declare(peer.service)
        elif peer.claims is not None:
            peer.service = self.declared.get(peer.claims)
        if peer.live:
            self.live_count += 1
            self._at[peer.endpoint] = peer
            self._rehash(peer, 0)
        self._changed()
        return peer, True, replaced

    def bury_former_life(self, record: wire.Member, endpoint: str, now: float) -> wire.Member | None:
        """A record, alive, of an unknown incarnation at this node's own ``endpoint``: a former
        life of this node that its peers have not found dead yet. Taken for a newer node there, it
        would replace this one (a restarted node declared itself dead so, voiding its hand-overs:
        nemesis durable seed 3245). It is kept as dead instead; returns that record, to spread
        (None: not a former life)."""
        if (record.endpoint != endpoint or record.incarnation in self.peers
                or wire.MEMBER_STATES[record.state] in ("dead", "left")):
            return None
        dead = msgspec.structs.replace(record, state=wire.MEMBER_STATES.index("dead"))
        self.merge(dead, now)
        return dead

    def merge(self, record: wire.Member, now: float, introduced_by: str | None = None) -> Update | None:
        """Apply what gossip says of a member (not this node: gossip answers for itself); None if
        nothing changed. SWIM's precedence: a record of a known incarnation counts only with a
        newer ``version`` (or an equal one, for a suspicion); "dead" and "left" are final.
        ``introduced_by``: the key of a client whose introduction is the only word for a new
        member (it joins not vouched for)."""
        state = wire.MEMBER_STATES[record.state]
        peer = self.peers.get(record.incarnation)
        if peer is None:
            gone = state in ("dead", "left")
            peer = Peer(
                record.incarnation, record.endpoint, record.node, None, record.window, record.max_message_bytes,
                now, state if gone else "alive", version=record.version, claims=record.service, key=record.key,
                vouched=introduced_by is None, introduced_by=introduced_by,
            )
            if gone:  # a tombstone: stale news of this incarnation can never bring it back
                self.peers[record.incarnation] = peer
                return None
            _, _, replaced = self.upsert(peer)
            if state in ("suspect", "leaving"):
                self._move(peer, "suspected" if state == "suspect" else "leaving")
            return Update(peer, "joined", tuple(replaced))
        if not peer.live:
            return None
        if state in ("dead", "left"):
            self._move(peer, "bye" if state == "left" else "confirmed")
            return Update(peer, state)
        if record.version < peer.version or (record.version == peer.version and state != "suspect"):
            return None
        newer = record.version > peer.version
        if newer:
            old = self._hash(peer)
            peer.version = record.version
            self._rehash(peer, old)
        if state == "suspect":
            if peer.state == "alive":
                self._move(peer, "suspected")
                return Update(peer, "suspected")
            return Update(peer, "suspected") if peer.state == "leaving" or newer else None
        if state == "leaving" and peer.state in ROUTABLE_STATES:
            self._move(peer, "leaving")
            return Update(peer, "leaving")
        if peer.state == "suspect":
            self._move(peer, "refuted")
            return Update(peer, "refuted")
        return Update(peer, "newer")

    def suspect(self, incarnation: int) -> Peer | None:
        """Our probe of it went unanswered: suspect it (a leaving peer keeps its state; gossip times
        the suspicion either way). None if unknown, gone, or suspect already."""
        peer = self.peers.get(incarnation)
        if peer is None or peer.state not in ("alive", "leaving"):
            return None
        if peer.state == "alive":
            self._move(peer, "silence")
        return peer

    def expire(self, incarnation: int) -> Peer | None:
        """A suspicion ran out without a refutation: the peer is dead. None if it was not live."""
        peer = self.peers.get(incarnation)
        if peer is None or peer.state not in ("suspect", "leaving"):
            return None
        self._move(peer, "silence")
        return peer

    def heard(self, incarnation: int, now: float) -> Peer | None:
        """Note a sign of life (a frame from it). None if unknown or gone.

        A suspicion stays: only the peer's own refutation (a newer version) clears it, so that
        every node that heard the suspicion hears its end.
        """
        peer = self.peers.get(incarnation)
        if peer is None or not peer.live:
            return None
        if now > peer.last_heard:
            peer.last_heard = now
        self.heard_at = now
        return peer

    def leaving(self, incarnation: int) -> Peer | None:
        """The peer announced it is draining: no new work for it, but it still acks."""
        peer = self.peers.get(incarnation)
        if peer is None or peer.state not in ROUTABLE_STATES:
            return None
        self._move(peer, "leaving")
        return peer

    def left(self, incarnation: int) -> Peer | None:
        """The peer said goodbye."""
        peer = self.peers.get(incarnation)
        if peer is None or not peer.live:
            return None
        self._move(peer, "bye")
        return peer

    def vouch(self, peer: Peer) -> bool:
        """``peer`` spoke for itself (its own frame, on a connection its key may serve from) or a
        member we trust spoke of it: work may go to it, and gossip passes it on. True if it was
        not vouched for until now."""
        if peer.vouched:
            return False
        old = self._hash(peer)
        peer.vouched, peer.introduced_by = True, None
        peer._derive()
        self._rehash(peer, old)
        self._changed()
        return True

    def introduced(self, principal: str | None) -> int:
        """How many live members here have only ``principal``'s introduction to vouch for them."""
        return sum(1 for p in self.peers.values() if not p.vouched and p.live and p.introduced_by == principal)

    def bump(self, peer: Peer, above: int = 0) -> int:
        """Raise ``peer``'s version (this node's own, to refute a suspicion or announce a change)
        past ``above``; returns the new version."""
        old = self._hash(peer)
        peer.version = max(peer.version, above) + 1
        self._rehash(peer, old)
        return peer.version

    def forget_dead(self, now: float, keep: float = 60.0) -> None:
        """Drop peers gone for ``keep`` seconds (they stay a while so gossip cannot revive them)."""
        for inc in [i for i, p in self.peers.items() if not p.live and now - p.last_heard > keep]:
            del self.peers[inc]

    def _move(self, peer: Peer, event: str) -> None:
        """Every state change of a peer, through the table."""
        was_live = peer.live
        old = self._hash(peer)
        peer.state = transition(PEER_TRANSITIONS, peer.state, event)
        peer._derive()
        if was_live and not peer.live:
            self.live_count -= 1
            if self._at.get(peer.endpoint) is peer:
                del self._at[peer.endpoint]
        self._rehash(peer, old)
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._stale = True
        for hook in self.on_change:
            hook()

    def touch(self) -> None:
        """The routing views change meaning (this node joined: they route now): a new version."""
        self._changed()

    # -- digests -------------------------------------------------------------------------------

    @staticmethod
    def _hash(peer: Peer) -> int:
        if not peer.live or not peer.vouched:  # (an introduced member is in no digest: we pass it on to none)
            return 0
        h = (peer.incarnation ^ (peer.version * 0x9E3779B97F4A7C15)) & _MASK  # splitmix64's finalizer
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        return (h ^ (h >> 31)) & 0xFFFFFFFF

    def _rehash(self, peer: Peer, old: int) -> None:
        new = self._hash(peer)
        if new != old:
            self.buckets[peer.incarnation % wire.SYNC_BUCKETS] ^= old ^ new

    def in_buckets(self, buckets: Iterable[int]) -> list[Peer]:
        """The peers (tombstones too) whose incarnation falls in ``buckets``."""
        wanted = set(buckets)
        n = wire.SYNC_BUCKETS
        return [p for p in self.peers.values() if p.incarnation % n in wanted]

    def system_digest(self) -> int:
        """A digest of the declared system (services and retirements), for anti-entropy."""
        names = sorted(self.declared) + ["!" + name for name in sorted(self.retired)]
        return int.from_bytes(hashlib.blake2b("\n".join(names).encode(), digest_size=4).digest(), "little")

    def table(self, buckets: list[int] | None, system: bool, want: Iterable[int] = ()) -> wire.Sync:
        """Our records (of ``buckets``; None: all of them), and the declared system if ``system``:
        a SYNC frame's body, asking for the peer's side of ``want``."""
        peers = self.peers.values() if buckets is None else self.in_buckets(buckets)
        return wire.Sync(
            system=self.system_digest(),
            members=[p.record() for p in peers if p.vouched],
            services=list(self.declared.values()) if system else [],
            retired=sorted(self.retired) if system else [],
            want=list(want),
            full=buckets is None,
        )

    # -- views ---------------------------------------------------------------------------------

    def _views(self) -> Membership:
        if self._stale:
            self._rebuild()
        return self

    def _rebuild(self) -> None:
        self._stale = False
        instances: dict[str, list[Peer]] = {}
        specs: dict[str, ServiceSpec] = {}
        for peer in self.peers.values():
            if peer.routable and peer.service is not None:
                instances.setdefault(peer.service.name, []).append(peer)
                specs.setdefault(peer.service.name, peer.service)
        for peers in instances.values():
            peers.sort(key=lambda p: p.incarnation)
        self._instances = instances
        self._specs = specs
        self._assignment = {
            name: core.assign_partitions(specs[name].partitions, [p.key for p in peers])
            for name, peers in instances.items()
        }
        subscribers: dict[str, list[tuple[ServiceSpec, HandlerSpec]]] = {}
        owners: dict[str, list[ServiceSpec]] = {}
        for spec in sorted({**self.declared, **specs}.values(), key=lambda s: s.name):
            for h in spec.handlers:
                if h.kind == "event":
                    subscribers.setdefault(h.message, []).append((spec, h))
                else:
                    owners.setdefault(h.message, []).append(spec)
        self._subscribers = subscribers
        self._owners = owners

    def instances(self, service: str) -> list[Peer]:
        return self._views()._instances.get(service, [])

    def owner(self, service: str, partition: int) -> Peer | None:
        if self._stale:
            self._rebuild()
        peers = self._instances.get(service)
        if not peers:
            return None
        return peers[self._assignment[service][partition]]

    def partitions_of(self, service: str, incarnation: int) -> list[int]:
        """The partitions of ``service`` owned by one instance."""
        peers = self._views()._instances.get(service, [])
        idx = next((i for i, p in enumerate(peers) if p.incarnation == incarnation), None)
        if idx is None:
            return []
        return [p for p, owner in enumerate(self._assignment[service]) if owner == idx]

    def subscribers(self, message_type: str) -> list[tuple[ServiceSpec, HandlerSpec]]:
        return self._views()._subscribers.get(message_type, [])

    def owners(self, message_type: str) -> list[ServiceSpec]:
        return self._views()._owners.get(message_type, [])

    def receiver_missing(self, message_type: str) -> bool:
        """Has a service declared to take ``message_type`` no routable instance now?"""
        takers = [spec for spec, _ in self.subscribers(message_type)] + self.owners(message_type)
        return any(not self.instances(spec.name) for spec in takers)

    def services(self) -> dict[str, ServiceSpec]:
        """The services with a routable instance now."""
        return dict(self._views()._specs)

    def live_peers(self) -> Iterator[Peer]:
        return (p for p in self.peers.values() if p.live)

    def system_spec(self) -> SystemSpec:
        """The declared system, live instances or not, as one system (what the analyzer reads)."""
        specs = self._views()._specs
        return system_spec(sorted({**self.declared, **specs}.values(), key=lambda s: s.name))
