"""Membership by gossip: hellos, heartbeats, goodbyes, and telling a peer it was declared dead.

How this works. A node starts knowing only its seeds. It says HELLO to each (its id,
endpoint, declarations, and the peers it knows); every node answers a hello with its own, and
every hello and heartbeat lists the live peers its sender knows, so one seed is enough to
find everybody. The node has *joined* once some peer answered and every endpoint it expects
an answer from has answered or stayed silent for ``join_wait`` (its seeds, every peer they
named, and, when it comes back as a new incarnation, every endpoint it knew: a node that
routes on a partial view sends messages to owners that lack their partition's dedup ids).
Until then it routes nothing; a seed that does not answer is reported by name within
``SEED_REPORT_AFTER`` seconds, and asked again at every heartbeat.

Hellos also carry the declared system: services the sender knows with no live instance, and
services an operator retired (heartbeats carry the retirements too), so that every node knows
whom a message is for even while nobody can take it (see :mod:`~choreo.runtime.membership`).

Heartbeats go to every live peer every ``heartbeat`` seconds; silence makes a peer suspect,
then dead (:data:`~choreo.states.PEER_TRANSITIONS`, applied by
:class:`~choreo.runtime.membership.Membership`). A peer declared dead that speaks again is told
so (REFUSE "dead") and rejoins as a new incarnation; a dead peer is knocked on now and then, so
a healed network partition reunites the mesh. A leaving node says so in its heartbeats (no new
work is routed to it) and says BYE once drained.

A node that was frozen (a long GC pause, a suspended VM, a handler that blocked the event loop)
sees a gap between two ticks: the silence of its peers during that gap is its own, not theirs,
so it does not count towards their failure detection (:meth:`Gossip.forgive`; the engine
decides, and rejoins at once after a gap long enough for the mesh to have declared it dead).

Everything a peer's frame changes is reported to the node through :class:`GossipHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from .. import wire
from ..config import NodeConfig
from ..errors import ChoreoUsageError, ProtocolError
from ..spec import ServiceSpec
from .lifecycle import Lifecycle
from .membership import Conflict, Membership, Peer
from .outbox import Outbox

__all__ = ["Gossip", "GossipHost", "Dialer", "SEED_REPORT_AFTER"]

log = logging.getLogger("choreo.node")
SEED_REPORT_AFTER = 2.0  # seconds without an answer before a seed is reported as unreachable
SEED_REPORT_EVERY = 30.0  # and again this often while it stays silent


class Dialer(Protocol):
    """What gossip needs of the network besides sending: opening and closing connections."""

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...


class GossipHost(Protocol):
    """What gossip tells the node it serves."""

    @property
    def holding(self) -> bytes:
        """The partitions this node owns or drains, as a bitmap (a newcomer waits for their handovers)."""

    def peer_joined(self, peer: Peer) -> None:
        """A new peer (messages waiting for an instance of its service may go to it now)."""

    def peer_gone(self, peer: Peer) -> None:
        """A peer died, left, or was replaced by a new incarnation at its endpoint."""

    def on_joined(self) -> None:
        """This node has joined the mesh (see :class:`~choreo.runtime.lifecycle.Lifecycle`)."""

    def declared_dead(self, reason: str) -> None:
        """The mesh declared this incarnation dead: come back as a new one."""

    def service_retired(self, service: str) -> None:
        """An operator retired a service (we learned it by gossip)."""

    def count_refused(self, reason: str, detail: str) -> None:
        """Something invalid arrived: count it and log it."""


class Gossip:
    """The membership protocol of one node (see the module docstring)."""

    def __init__(
        self,
        membership: Membership,
        outbox: Outbox,
        dialer: Dialer,
        lifecycle: Lifecycle,
        host: GossipHost,
        *,
        config: NodeConfig,
        clock: Callable[[], float],
    ) -> None:
        self.membership = membership
        self.outbox = outbox
        self.dialer = dialer
        self.life = lifecycle
        self.host = host
        self.config = config
        self.clock = clock
        self.me: Peer | None = None
        self.seeds: list[str] = []  # seeds that have not answered yet
        self.initial_seeds: list[str] = []  # what we go back to when we find ourselves alone
        self._hello_sent: dict[str, float] = {}
        self._told_dead: dict[int, float] = {}
        self._next_heartbeat = 0.0
        self._seed_asked: dict[str, float] = {}  # seed -> when we first said hello to it
        self._seed_reported: dict[str, float] = {}
        self._expected: dict[str, float] = {}  # while joining: endpoint -> when we asked it (no answer yet)
        self.refusals: list[str] = []  # conflicts reported by nodes whose word does not stop this one
        self.join_wait = max(2 * config.heartbeat, 1.0)  # how long a silent endpoint holds up joining

    @property
    def incarnation(self) -> int:
        return self.me.incarnation if self.me is not None else 0

    # -- joining ---------------------------------------------------------------------------------

    def start(self, me: Peer, seeds: Iterable[str]) -> None:
        """Register ourselves, then say hello to every seed."""
        self.me = me
        self.membership.upsert(me)
        self.dialer.connect(me.endpoint)
        now = self.clock()
        self._next_heartbeat = now + self.config.heartbeat
        self.seeds = [s for s in seeds if s != me.endpoint]
        self.initial_seeds = list(self.seeds)
        self.life.since = now
        self._seed_asked = {s: now for s in self.seeds}
        self._expected = dict(self._seed_asked)
        if not self.seeds:
            self._joined(now)  # the first node: the mesh is what it knows
        for seed in self.seeds:
            self.say_hello(seed, reply=True)

    def rejoin(self, me: Peer, endpoints: Iterable[str]) -> None:
        """We came back as a new incarnation: hello to every endpoint we knew."""
        self.me = me
        self._told_dead.clear()
        self.membership.upsert(me)
        self.seeds = sorted(set(endpoints) - {me.endpoint}) or list(self.initial_seeds)
        now = self.clock()
        self._seed_asked = {s: now for s in self.seeds}
        self._expected = dict(self._seed_asked)
        self._seed_reported.clear()
        if not self.seeds:
            self._joined(now)
        for endpoint in self.seeds:
            self.say_hello(endpoint, reply=True)

    def _joined(self, now: float) -> None:
        if self.life.joining:
            self._expected.clear()
            self.life.on("joined", now)
            self.host.on_joined()

    def check_joined(self, now: float) -> None:
        """Join once some peer answered and every endpoint we wait for answered or stayed silent for ``join_wait``."""
        if not self.life.joining or not self._answered():
            return
        wait = self.join_wait
        if all(now - asked >= wait for asked in self._expected.values()):
            self._joined(now)

    def _answered(self) -> bool:
        return any(p.live and p is not self.me for p in self.membership.peers.values())

    def join_status(self) -> str:
        """Why this node has not joined yet, naming the seeds that do not answer."""
        if not self.life.joining:
            return ""
        now = self.clock()
        silent = [f"{s} ({now - self._seed_asked.get(s, now):.1f} s)" for s in self.seeds]
        if self.refusals and not self._answered():
            return "refused: " + self.refusals[-1]
        if silent and not self._answered():
            return "no answer from its seeds " + ", ".join(silent) + " (it keeps asking; is a node running there?)"
        return "waiting for the peers its seeds named to answer"

    def _report_silent_seeds(self, now: float) -> None:
        for seed in self.seeds:
            asked = self._seed_asked.setdefault(seed, now)
            if now - asked < SEED_REPORT_AFTER or now - self._seed_reported.get(seed, -1e9) < SEED_REPORT_EVERY:
                continue
            self._seed_reported[seed] = now
            log.warning("%s: seed %s does not answer (%.1f s without a hello back): is a node running there, and "
                        "can it reach this node at %s? Still asking.", self._name, seed, now - asked,
                        self.me.endpoint if self.me else "?")

    def hello(self, reply: bool) -> wire.Hello:
        me = self.me
        assert me is not None, "gossip not started"
        m = self.membership
        waiting = [spec for name, spec in sorted(m.declared.items()) if not m.instances(name) and spec is not me.service]
        return wire.Hello(
            node=me.node,
            incarnation=me.incarnation,
            endpoint=me.endpoint,
            service=me.service,
            window=me.window,
            max_message_bytes=me.max_message_bytes,
            peers=self.peer_refs(),
            reply=reply,
            leaving=self.life.leaving,
            holding=self.host.holding,
            services=waiting,
            retired=sorted(m.retired),
            key=me.own_key,
        )

    def peer_refs(self) -> list[wire.PeerRef]:
        return [wire.PeerRef(p.endpoint, p.incarnation, p.service_name) for p in self.membership.live_peers()]

    def say_hello(self, endpoint: str, reply: bool, receiver: int = 0) -> None:
        self.dialer.connect(endpoint)
        self._hello_sent[endpoint] = self.clock()
        self.outbox.send(endpoint, wire.encode_control(wire.HELLO, self.incarnation, receiver, self.hello(reply)))

    # -- leaving ---------------------------------------------------------------------------------

    def begin_leave(self) -> None:
        """Tell every peer we stop taking new work (they route around us while we drain)."""
        if self.life.state not in ("joining", "joined", "rejoined"):
            return  # leaving already, or refused by the mesh (nothing to hand over)
        self.life.on("leave", self.clock())
        hb = wire.Heartbeat(peers=self.peer_refs(), leaving=True)
        for peer in list(self.membership.live_peers()):
            if peer is not self.me:
                self.outbox.send(peer.endpoint, wire.encode_control(wire.HEARTBEAT, self.incarnation, peer.incarnation, hb))
        if self.me is not None:
            self.membership.leaving(self.incarnation)

    def finish_leave(self) -> None:
        """Say goodbye to every peer (after draining)."""
        bye = wire.Bye()
        for peer in list(self.membership.live_peers()):
            if peer is not self.me:
                self.outbox.send(peer.endpoint, wire.encode_control(wire.BYE, self.incarnation, peer.incarnation, bye))
        if self.life.state == "leaving":
            self.life.on("bye", self.clock())

    # -- timers ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Heartbeats when due, then failure detection."""
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat
            self._heartbeat(now)
        for peer in self.membership.check_silence(now, self.incarnation):
            log.warning("%s: peer %s is %s (silent for %.1f s)", self.me.node if self.me else "?", peer.node,
                        peer.state, now - peer.last_heard)
            if not peer.live:
                self.host.peer_gone(peer)
        self.check_joined(now)

    def forgive(self, gap: float, now: float) -> None:
        """This node was frozen for ``gap`` seconds: its peers' silence meanwhile was its own."""
        log.warning("%s: no tick for %.1f s (this process paused, or its clock jumped): not counting it against "
                    "its peers", self._name, gap)
        self.membership.forgive(gap, now)
        self._next_heartbeat = now  # and tell them at once that we are back

    def _heartbeat(self, now: float) -> None:
        # a seed that has not answered yet (its hello or ours was lost, or it starts later): again
        if self.seeds:
            answered = {p.endpoint for p in self.membership.peers.values() if p.live}
            self.seeds = [s for s in self.seeds if s not in answered]
            for seed in self.seeds:
                self.say_hello(seed, reply=True)
            if self.life.joining:
                self._report_silent_seeds(now)
        # peers we declared dead may be cut off rather than gone: knock now and then, so that a
        # healed partition reunites the mesh (the side found dead rejoins as a new incarnation)
        live_endpoints = {p.endpoint for p in self.membership.live_peers()}
        probe_every = max(4 * self.config.heartbeat, 1.0)
        for peer in list(self.membership.peers.values()):
            if peer.state == "dead" and peer.endpoint not in live_endpoints:
                if now - self._hello_sent.get(peer.endpoint, -1e9) >= probe_every:
                    self.say_hello(peer.endpoint, reply=True)
        if len(live_endpoints) <= 1:  # alone: back to the seeds we were started with
            for seed in self.initial_seeds:
                if now - self._hello_sent.get(seed, -1e9) >= probe_every:
                    self.say_hello(seed, reply=True)
        self.membership.forget_dead(now, keep=self.config.forget_dead_after)
        refs = self.peer_refs()
        holding = self.host.holding
        leaving = self.life.leaving
        retired = sorted(self.membership.retired)
        plain = wire.encode_control(
            wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, leaving, False, holding, retired)
        )
        asking = wire.encode_control(
            wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, leaving, True, holding, retired)
        )
        out = self.outbox.out
        for peer in self.membership.live_peers():
            if peer is not self.me:
                ch = out.get(peer.incarnation)
                self.outbox.send(peer.endpoint, asking if ch is not None and ch.window.in_flight else plain)

    # -- frames in -------------------------------------------------------------------------------

    def on_hello(self, sender: int, hello: wire.Hello, *, trusted_gossip: bool = True) -> None:
        """A hello; ``trusted_gossip`` says whether what it says of the declared system counts."""
        if hello.incarnation != sender or sender == 0:
            raise ProtocolError("malformed", "hello whose incarnation does not match its header")
        if sender == self.incarnation:
            return
        known = self.membership.peers.get(sender)
        if known is None:
            try:
                self.membership.check_conflicts(hello.service)  # our own service is in there too
            except Conflict as exc:
                self.host.count_refused("conflict", f"{hello.node}: {exc}")
                self.dialer.connect(hello.endpoint)
                refuse = wire.Refuse("conflict", str(exc))
                self.outbox.send(hello.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))
                return
        elif not known.live:
            self.tell_dead(known)  # we had declared it dead or gone: it must come back anew
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
                key=hello.key,
            )
        )
        peer.holding = hello.holding
        for old in replaced:
            log.info("%s: %s replaced %s at %s", self._name, peer.node, old.node, old.endpoint)
            self.host.peer_gone(old)
        if new:
            self.dialer.connect(hello.endpoint)
            log.info("%s: %s joined (%s)", self._name, peer.node, peer.endpoint)
            self.host.peer_joined(peer)
        if hello.leaving:
            self.membership.leaving(sender)
        if trusted_gossip:
            self._learn_system(hello.services, hello.retired)
        if hello.reply or new:
            self.say_hello(hello.endpoint, reply=False, receiver=sender)
        self.learn(hello.peers)
        if self.life.joining:
            self._expected.pop(hello.endpoint, None)
            self.check_joined(now)

    def _learn_system(self, services: list[ServiceSpec], retired: list[str]) -> None:
        for name in retired:
            if self.membership.retired_by_gossip(name):
                log.info("%s: %s was retired (gossip)", self._name, name)
                self.host.service_retired(name)
        for spec in services:
            if spec.name not in self.membership.retired:
                try:
                    self.membership.check_conflicts(spec)
                except Conflict as exc:
                    self.host.count_refused("conflict", f"gossiped declaration of {spec.name}: {exc}")
                    continue
                self.membership.declare(spec)

    def learn(self, refs: Iterable[wire.PeerRef]) -> None:
        """Say hello to peers we hear of and do not know yet (at most once per two heartbeats)."""
        now = self.clock()
        joining = self.life.joining
        for ref in refs:
            if ref.incarnation == self.incarnation or ref.incarnation in self.membership.peers:
                continue
            if joining:
                self._expected.setdefault(ref.endpoint, now)
            if now - self._hello_sent.get(ref.endpoint, -1e9) < self.config.heartbeat * 2:
                continue
            self.say_hello(ref.endpoint, reply=True)

    def on_heartbeat(self, sender: int, hb: wire.Heartbeat, *, trusted_gossip: bool = True) -> None:
        peer = self.membership.heard(sender, self.clock())
        if peer is not None:
            peer.holding = hb.holding
            if hb.leaving and peer.routable:
                self.membership.leaving(sender)
            if hb.ack_please:
                ich = self.outbox.inbound.get(sender)
                if ich is not None:
                    self.outbox.send_ack(ich)
            if hb.retired and trusted_gossip:
                self._learn_system([], hb.retired)
        self.learn(hb.peers)

    def on_bye(self, sender: int) -> None:
        if sender == self.incarnation:  # this node says goodbye to others, never to itself
            self.host.count_refused("malformed", "a BYE that claims to come from this node itself")
            return
        peer = self.membership.left(sender)
        if peer is not None:
            log.info("%s: %s left", self._name, peer.node)
            self.host.peer_gone(peer)

    def on_refuse(self, sender: int, refuse: wire.Refuse, *, authoritative: bool = True) -> None:
        """A peer refused one of our frames. ``authoritative``: the refusal comes from a node whose
        word may stop this one (see :mod:`~choreo.runtime.admission`); a stranger's is advisory."""
        self.host.count_refused("refused_by_peer", f"{refuse.reason}: {refuse.detail}")
        peer = self.membership.peers.get(sender)
        if refuse.reason == "conflict":
            if not authoritative:
                self.refusals.append(refuse.detail)
                log.warning("%s: a node this one does not know refuses it: %s (not taken as the mesh's word: "
                            "without keys anyone can send this; still trying to join)", self._name, refuse.detail)
                return
            self.life.fatal = ChoreoUsageError(f"the mesh refused this node: {refuse.detail}")
            if self.life.state != "refused":
                self.life.on("refused", self.clock())
        elif refuse.reason == "dead":
            if peer is None:
                return  # only a node we know can have declared us dead
            self.host.declared_dead(f"{peer.node} declared us dead (a network partition, or a long pause)")
        elif refuse.reason == "stale":
            # we wrote to an incarnation that is over there: ask who is at that endpoint now (its
            # hello replaces the old incarnation, whose unacknowledged envelopes go to the new owners)
            old = self.membership.peers.get(refuse.stale)
            if old is not None and old.live and self.clock() - self._hello_sent.get(old.endpoint, -1e9) >= 1.0:
                self.say_hello(old.endpoint, reply=True)

    def tell_dead(self, peer: Peer) -> None:
        """Tell a peer we declared dead that it is (at most once a second)."""
        now = self.clock()
        if now - self._told_dead.get(peer.incarnation, -1e9) < 1.0:
            return
        self._told_dead[peer.incarnation] = now
        self.dialer.connect(peer.endpoint)
        refuse = wire.Refuse("dead", f"{self._name} declared {peer.node} dead; rejoin as a new incarnation")
        self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, peer.incarnation, refuse))

    def refuse_stale(self, sender: int, receiver: int) -> None:
        """A frame for an incarnation of ours that is over: count it, tell its live sender."""
        self.host.count_refused("stale", f"frame for incarnation {receiver:016x}, this node is {self.incarnation:016x}")
        peer = self.membership.peers.get(sender)
        if peer is not None and peer.live:
            refuse = wire.Refuse("stale", stale=receiver)
            self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))

    @property
    def _name(self) -> str:
        return self.me.node if self.me is not None else "node"
