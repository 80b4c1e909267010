"""Membership by gossip: hellos, heartbeats, goodbyes, and telling a peer it was declared dead.

How this works. A node starts knowing only its seeds. It says HELLO to each (its id,
endpoint, declarations, and the peers it knows); every node answers a hello with its own, and
every hello and heartbeat lists the live peers its sender knows, so one seed is enough to
find everybody. The node has *joined* once every peer the mesh told it about has answered (or
its seeds stayed silent for ``dead_after``: it then acts on what it knows).

Heartbeats go to every live peer every ``heartbeat`` seconds; silence makes a peer suspect,
then dead (:data:`~choreo.states.PEER_TRANSITIONS`, applied by
:class:`~choreo.runtime.membership.Membership`). A peer declared dead that speaks again is told
so (REFUSE "dead") and rejoins as a new incarnation; a dead peer is knocked on now and then, so
a healed network partition reunites the mesh. A leaving node says so in its heartbeats (no new
work is routed to it) and says BYE once drained.

Everything a peer's frame changes is reported to the node through :class:`GossipHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from .. import wire
from ..config import NodeConfig
from ..errors import ChoreoUsageError, ProtocolError
from .lifecycle import Lifecycle
from .membership import Conflict, Membership, Peer
from .outbox import Outbox

__all__ = ["Gossip", "GossipHost", "Dialer"]

log = logging.getLogger("choreo.node")


class Dialer(Protocol):
    """What gossip needs of the network besides sending: opening and closing connections."""

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...


class GossipHost(Protocol):
    """What gossip tells the node it serves."""

    @property
    def serving(self) -> bool:
        """Whether this node owns partitions already (a newcomer waits for their handovers)."""

    def peer_joined(self, peer: Peer) -> None:
        """A new peer (messages waiting for an instance of its service may go to it now)."""

    def peer_gone(self, peer: Peer) -> None:
        """A peer died, left, or was replaced by a new incarnation at its endpoint."""

    def on_joined(self) -> None:
        """This node has joined the mesh (see :class:`~choreo.runtime.lifecycle.Lifecycle`)."""

    def declared_dead(self, reason: str) -> None:
        """The mesh declared this incarnation dead: come back as a new one."""

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
        if not self.seeds:
            self._joined(now)
        for seed in self.seeds:
            self.say_hello(seed, reply=True)

    def rejoin(self, me: Peer, endpoints: Iterable[str]) -> None:
        """We came back as a new incarnation: hello to every endpoint we knew."""
        self.me = me
        self._told_dead.clear()
        self.membership.upsert(me)
        self.seeds = sorted(set(endpoints) - {me.endpoint})
        for endpoint in self.seeds:
            self.say_hello(endpoint, reply=True)

    def _joined(self, now: float) -> None:
        if self.life.joining:
            self.life.on("joined", now)
            self.host.on_joined()

    def check_joined(self, now: float) -> None:
        """The seeds never answered within ``dead_after``: act on what we know."""
        if self.life.joining and now - self.life.since >= self.config.dead_after:
            self._joined(now)

    def hello(self, reply: bool) -> wire.Hello:
        me = self.me
        assert me is not None, "gossip not started"
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
            serving=self.host.serving,
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

    def _heartbeat(self, now: float) -> None:
        # a seed that has not answered yet (its hello or ours was lost, or it starts later): again
        if self.seeds:
            answered = {p.endpoint for p in self.membership.peers.values()}
            self.seeds = [s for s in self.seeds if s not in answered]
            for seed in self.seeds:
                self.say_hello(seed, reply=True)
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
        serving = self.host.serving
        leaving = self.life.leaving
        plain = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, leaving, False, serving))
        asking = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, wire.Heartbeat(refs, leaving, True, serving))
        out = self.outbox.out
        for peer in self.membership.live_peers():
            if peer is not self.me:
                ch = out.get(peer.incarnation)
                self.outbox.send(peer.endpoint, asking if ch is not None and ch.window.in_flight else plain)

    # -- frames in -------------------------------------------------------------------------------

    def on_hello(self, sender: int, hello: wire.Hello) -> None:
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
            )
        )
        peer.serving = peer.serving or hello.serving
        for old in replaced:
            log.info("%s: %s replaced %s at %s", self._name, peer.node, old.node, old.endpoint)
            self.host.peer_gone(old)
        if new:
            self.dialer.connect(hello.endpoint)
            log.info("%s: %s joined (%s)", self._name, peer.node, peer.endpoint)
            self.host.peer_joined(peer)
        if hello.leaving:
            self.membership.leaving(sender)
        if hello.reply or new:
            self.say_hello(hello.endpoint, reply=False, receiver=sender)
        self.learn(hello.peers)
        if self.life.joining:
            # joined once every peer the mesh told us about has answered our hello
            known_endpoints = {p.endpoint for p in self.membership.peers.values()}
            if all(ref.endpoint in known_endpoints or ref.incarnation in self.membership.peers for ref in hello.peers):
                self._joined(now)

    def learn(self, refs: Iterable[wire.PeerRef]) -> None:
        """Say hello to peers we hear of and do not know yet (at most once per two heartbeats)."""
        now = self.clock()
        for ref in refs:
            if ref.incarnation == self.incarnation or ref.incarnation in self.membership.peers:
                continue
            if now - self._hello_sent.get(ref.endpoint, -1e9) < self.config.heartbeat * 2:
                continue
            self.say_hello(ref.endpoint, reply=True)

    def on_heartbeat(self, sender: int, hb: wire.Heartbeat) -> None:
        peer = self.membership.heard(sender, self.clock())
        if peer is not None:
            peer.serving = peer.serving or hb.serving
            if hb.leaving and peer.routable:
                self.membership.leaving(sender)
            if hb.ack_please:
                ich = self.outbox.inbound.get(sender)
                if ich is not None:
                    self.outbox.send_ack(ich)
        self.learn(hb.peers)

    def on_bye(self, sender: int) -> None:
        peer = self.membership.left(sender)
        if peer is not None:
            log.info("%s: %s left", self._name, peer.node)
            self.host.peer_gone(peer)

    def on_refuse(self, sender: int, refuse: wire.Refuse) -> None:
        self.host.count_refused("refused_by_peer", f"{refuse.reason}: {refuse.detail}")
        if refuse.reason == "conflict":
            self.life.fatal = ChoreoUsageError(f"the mesh refused this node: {refuse.detail}")
            self.life.on("refused", self.clock())
        elif refuse.reason == "dead":
            peer = self.membership.peers.get(sender)
            who = peer.node if peer is not None else f"{sender:016x}"
            self.host.declared_dead(f"{who} declared us dead (a network partition, or a long pause)")

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
            refuse = wire.Refuse("stale")
            self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))

    @property
    def _name(self) -> str:
        return self.me.node if self.me is not None else "node"
