"""Who is in the mesh, what the system declares, and who owns what.

Every node keeps the same picture, built from hellos and gossip (there is no coordinator). Two
things in it must not be confused:

* the **declared system** (:attr:`Membership.declared`): which services exist and what they
  consume. It only grows: a service is learned from its instances' hellos and from gossip,
  survives its instances' deaths, its last instance's graceful leave and this node's own
  reincarnation, and goes only when an operator retires it (:meth:`Membership.retire`);
* **who is live right now** (:attr:`Membership.peers` and their states, see
  :mod:`choreo.states`), which changes every second.

Routing asks the first whether anyone must get a message and the second where to send it now:
a message for a declared service with no live instance waits at its sender, it is never
dropped. The views, recomputed whenever the picture changes:

* ``instances(service)``: the live instances of a service, in a stable order;
* ``owner(service, partition)``: rendezvous over those instances' keys, so every node that knows
  the same instances picks the same owner, and a join or leave moves only that instance's share.
  An instance's key is its incarnation, unless it is durable: then it is derived from its
  persisted name (:func:`durable_key`), so that a restarted instance takes back the partitions
  whose dedup ids it kept on disk;
* ``subscribers(type)``: every declared service with a handler for an event type;
* ``owners(type)``: the declared services handling a command or query type (exactly one is valid).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .. import core
from ..errors import ChoreoUsageError
from ..spec import HandlerSpec, ServiceSpec, SystemSpec, system_spec
from ..states import PEER_TRANSITIONS, transition

__all__ = ["Peer", "Membership", "Conflict", "LIVE_STATES", "ROUTABLE_STATES", "durable_key"]

LIVE_STATES = frozenset({"alive", "suspect", "leaving"})  # still answers and acks
ROUTABLE_STATES = frozenset({"alive", "suspect"})  # may be given new work


def durable_key(name: str) -> bytes:
    """The rendezvous key of a durable node: the same in every life of the node named ``name``.

    16 bytes, so it never equals an incarnation's 8-byte key::

    >>> durable_key("orders#1") == durable_key("orders#1"), len(durable_key("orders#1"))
    (True, 16)
    """
    return core.hash128(b"choreo-durable:" + name.encode())


@dataclass(eq=False)
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
    identity: bytes | None = None  # the connection it joined on: its frames come only from there
    principal: str | None = None  # the key that connection authenticated as (None without keys)

    def holds(self, partition: int) -> bool:
        """Whether this peer said it owns or drains ``partition``."""
        byte = partition >> 3
        return byte < len(self.holding) and bool(self.holding[byte] >> (partition & 7) & 1)

    key: bytes = b""  # the rendezvous identity: the incarnation's bytes unless given (durable nodes)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.incarnation.to_bytes(8, "little")

    @property
    def own_key(self) -> bytes:
        """The key to announce in hellos: empty when it is the incarnation's (peers derive that)."""
        return b"" if self.key == self.incarnation.to_bytes(8, "little") else self.key

    @property
    def service_name(self) -> str | None:
        return self.service.name if self.service else None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE_STATES


class Conflict(Exception):
    """A peer's declarations contradict the mesh's (a second owner of a command type)."""


class Membership:
    """The peer table and the routing views derived from it.

    >>> m = Membership(suspect_after=1.5, dead_after=5.0)
    >>> m.instances("orders")
    []
    """

    def __init__(self, suspect_after: float = 1.5, dead_after: float = 5.0) -> None:
        if not 0 < suspect_after < dead_after:
            raise ValueError(f"need 0 < suspect_after < dead_after, got {suspect_after}, {dead_after}")
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.peers: dict[int, Peer] = {}
        self.version = 0  # bumped on every change of the routing views
        self._instances: dict[str, list[Peer]] = {}
        self._assignment: dict[str, list[int]] = {}
        self._subscribers: dict[str, list[tuple[ServiceSpec, HandlerSpec]]] = {}
        self._owners: dict[str, list[ServiceSpec]] = {}
        self._specs: dict[str, ServiceSpec] = {}  # services with a routable instance now
        self.declared: dict[str, ServiceSpec] = {}  # the declared system (see the module docstring)
        self.retired: set[str] = set()  # services an operator retired (gossip never brings them back)

    # -- changes -------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every peer (this node re-incarnates and learns who is live again).

        The declared system stays: what was meant for a service still waits for its instances.
        The version goes on, so views cached under an older one stay stale.
        """
        self.peers.clear()
        self._rebuild()

    def declare(self, spec: ServiceSpec) -> bool:
        """Learn a service from gossip (a third party's word); True if the declared system changed.

        A service learned this way never replaces what its own instances said, and never
        brings back a retired service: only an instance of it can (its hello, :meth:`upsert`).
        """
        if spec.name in self.retired or spec.name in self.declared:
            return False
        self.declared[spec.name] = spec
        self._rebuild()
        return True

    def retire(self, service: str) -> None:
        """An operator scales ``service`` to zero for good: forget it (ChoreoUsageError while it has
        live instances; stop them first)."""
        live = [p.node for p in self.peers.values() if p.live and p.service_name == service]
        if live:
            raise ChoreoUsageError(f"{service} still has live instances ({', '.join(live)}): stop them, then retire it")
        self.retired.add(service)
        if self.declared.pop(service, None) is not None:
            self._rebuild()

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
        for h in candidate.handlers:
            if h.kind == "event":
                continue
            for other in self._owners.get(h.message, ()):
                if other.name != candidate.name:
                    raise Conflict(f"{h.kind} {h.message} has two owners: {other.name}, {candidate.name}")

    def upsert(self, peer: Peer) -> tuple[Peer, bool, list[Peer]]:
        """Add or refresh a peer. Returns (the peer, whether it is new, peers it replaced).

        A new incarnation at the endpoint of a known one replaces it: the old one is dead.
        """
        replaced: list[Peer] = []
        existing = self.peers.get(peer.incarnation)
        if existing is not None:
            existing.last_heard = max(existing.last_heard, peer.last_heard)
            if existing.state == "suspect":
                existing.state = transition(PEER_TRANSITIONS, existing.state, "heard")
                self._rebuild()
            return existing, False, replaced
        for other in self.peers.values():
            if other.endpoint == peer.endpoint and other.live:
                other.state = transition(PEER_TRANSITIONS, other.state, "replaced")
                replaced.append(other)
        self.peers[peer.incarnation] = peer
        if peer.service is not None:  # an instance's own word: it (re)declares its service
            self.retired.discard(peer.service.name)
            self.declared[peer.service.name] = peer.service
        self._rebuild()
        return peer, True, replaced

    def heard(self, incarnation: int, now: float) -> Peer | None:
        """Note a sign of life; a suspect peer becomes alive again. None if unknown or gone."""
        peer = self.peers.get(incarnation)
        if peer is None or not peer.live:
            return None
        peer.last_heard = max(peer.last_heard, now)
        if peer.state == "suspect":
            peer.state = transition(PEER_TRANSITIONS, peer.state, "heard")
            self._rebuild()
        return peer

    def leaving(self, incarnation: int) -> Peer | None:
        """The peer announced it is draining: no new work for it, but it still acks."""
        peer = self.peers.get(incarnation)
        if peer is None or not peer.routable:
            return None
        peer.state = transition(PEER_TRANSITIONS, peer.state, "leaving")
        self._rebuild()
        return peer

    def left(self, incarnation: int) -> Peer | None:
        """The peer said goodbye."""
        peer = self.peers.get(incarnation)
        if peer is None or not peer.live:
            return None
        peer.state = transition(PEER_TRANSITIONS, peer.state, "bye")
        self._rebuild()
        return peer

    def check_silence(self, now: float, me: int) -> list[Peer]:
        """Apply timeouts; returns the peers whose state changed."""
        changed = []
        for peer in self.peers.values():
            if peer.incarnation == me or not peer.live:
                continue
            silent = now - peer.last_heard
            if peer.state == "alive" and silent >= self.suspect_after:
                peer.state = transition(PEER_TRANSITIONS, peer.state, "silence")
                changed.append(peer)
            if peer.state in ("suspect", "leaving") and silent >= self.dead_after:
                peer.state = transition(PEER_TRANSITIONS, peer.state, "silence")
                changed.append(peer)
        if changed:
            self._rebuild()
        return changed

    def forgive(self, gap: float, now: float) -> None:
        """This node itself was silent for ``gap`` seconds: do not count that against its peers."""
        for peer in self.peers.values():
            if peer.live:
                peer.last_heard = min(peer.last_heard + gap, now)

    def forget_dead(self, now: float, keep: float = 60.0) -> None:
        """Drop peers gone for ``keep`` seconds (they stay a while so gossip cannot revive them)."""
        for inc in [i for i, p in self.peers.items() if not p.live and now - p.last_heard > keep]:
            del self.peers[inc]

    # -- views ---------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        self.version += 1
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
        return self._instances.get(service, [])

    def owner(self, service: str, partition: int) -> Peer | None:
        peers = self._instances.get(service)
        if not peers:
            return None
        return peers[self._assignment[service][partition]]

    def partitions_of(self, service: str, incarnation: int) -> list[int]:
        """The partitions of ``service`` owned by one instance."""
        peers = self._instances.get(service, [])
        idx = next((i for i, p in enumerate(peers) if p.incarnation == incarnation), None)
        if idx is None:
            return []
        return [p for p, owner in enumerate(self._assignment[service]) if owner == idx]

    def subscribers(self, message_type: str) -> list[tuple[ServiceSpec, HandlerSpec]]:
        return self._subscribers.get(message_type, [])

    def owners(self, message_type: str) -> list[ServiceSpec]:
        return self._owners.get(message_type, [])

    def services(self) -> dict[str, ServiceSpec]:
        """The services with a routable instance now."""
        return dict(self._specs)

    def live_peers(self) -> Iterable[Peer]:
        return (p for p in self.peers.values() if p.live)

    def system_spec(self) -> SystemSpec:
        """The declared system, live instances or not, as one system (what the analyzer reads)."""
        return system_spec(sorted({**self.declared, **self._specs}.values(), key=lambda s: s.name))
