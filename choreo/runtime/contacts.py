"""Whom gossip talks to directly, and what it says to them: hellos, partitions held, refusals.

How this works. SWIM's probes and rumors (:mod:`~choreo.runtime.gossip`) go to live members;
everything else a node says is addressed to one endpoint, and costs a socket if that endpoint is
new. :class:`Contacts` keeps that bookkeeping for one node incarnation:

* who has spoken to us (``spoke``: they know us, so a ping need not introduce us, a random pick
  prefers them, and only they are knocked on once declared dead), and when we last said hello to
  each endpoint;
* the dial budget: at most ``NEW_DIALS`` endpoints that are not live members are greeted per
  period (:meth:`Contacts.greet_later` queues the rest, within bounds);
* our partners (the other instances of our service, and the peers we exchange messages with), the
  partitions we hold, sent to our service's other instances when they change (``HOLDING_REPEATS``
  periods in a row, against loss) or when one may have missed them;
* the refusals we send: a peer we declared dead (``dead``, at most once a second), a frame for an
  incarnation of ours that is over (``stale``);
* members dialled afresh: one whose probe got no answer of its own, as a connection may still be
  backing off after a cut (:meth:`Contacts.redial`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Protocol

import msgspec

from .. import wire
from .lifecycle import Lifecycle
from .membership import Membership, Peer
from .outbox import Outbox

__all__ = ["Contacts", "ContactsHost", "NEW_DIALS", "HOLDING_REPEATS"]

log = logging.getLogger("choreo.node")
NEW_DIALS = 32  # endpoints that are not live members contacted per period, at most
HOLDING_REPEATS = 3  # periods a change of partitions held is sent again (against loss)


class ContactsHost(Protocol):
    """What contacts need of the node (a part of :class:`~choreo.runtime.gossip.GossipHost`)."""

    @property
    def holding(self) -> bytes: ...

    @property
    def copies(self) -> bytes: ...

    @property
    def restored(self) -> list[tuple[int, int]]: ...

    def count_refused(self, reason: str, detail: str) -> None: ...


class Contacts:
    """The direct contacts of one node's gossip (see the module docstring)."""

    def __init__(
        self,
        membership: Membership,
        outbox: Outbox,
        lifecycle: Lifecycle,
        host: ContactsHost,
        *,
        period: float,
        clock: Callable[[], float],
        rng: random.Random,
        redial_every: float = 6.0,
    ) -> None:
        """``period``: the protocol period (``NodeConfig.heartbeat``); ``rng``: gossip's own (seeded);
        ``redial_every``: how often one member is dialled afresh at most (see :meth:`redial`)."""
        self.me: Peer | None = None
        self.membership = membership
        self.outbox = outbox
        outbox.on_open = self.introduce  # a channel's first data goes after a hello (see there)
        self.life = lifecycle
        self.host = host
        self.clock = clock
        self.rng = rng
        self.knock_every = max(4 * period, 1.0)  # how often a dead peer or a silent seed is knocked on
        self.hello_sent: dict[str, float] = {}
        self.told_dead: dict[int, float] = {}
        self.spoke: set[int] = set()  # incarnations that sent us a frame (they know us; we may knock)
        self._greet: dict[str, bool] = {}  # endpoints to say hello to when the budget allows (-> ask for a table)
        self._budget = NEW_DIALS
        self._holding_sent: tuple[bytes, bytes, list[tuple[int, int]]] = (b"", b"", [])
        self._holding_repeats = 0
        self._holding_owed: set[int] = set()  # instances of our service that may lack our partitions
        self.redial_every = redial_every
        self._redialled: dict[int, float] = {}  # member -> when we last dialled it afresh

    @property
    def incarnation(self) -> int:
        return self.me.incarnation if self.me is not None else 0

    @property
    def name(self) -> str:
        return self.me.node if self.me is not None else "node"

    # -- hellos ----------------------------------------------------------------------------------

    def hello(self, reply: bool, sync: bool = False) -> wire.Hello:
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
            reply=reply,
            leaving=self.life.leaving,
            holding=self.host.holding,
            copies=self.host.copies,
            restored=self.host.restored,
            services=waiting,
            retired=sorted(m.retired),
            sync=sync,
            version=me.version,
            key=me.own_key,
        )

    def say_hello(self, endpoint: str, reply: bool, receiver: int = 0, sync: bool = False) -> None:
        self.hello_sent[endpoint] = self.clock()
        self.outbox.send(endpoint, wire.encode_control(wire.HELLO, self.incarnation, receiver, self.hello(reply, sync)))

    def greet_later(self, endpoint: str, sync: bool = False) -> None:
        """Say hello to an endpoint that is not a live member, within the budget of ``NEW_DIALS`` per period."""
        if self._budget > 0:
            self._budget -= 1
            self.say_hello(endpoint, reply=True, sync=sync)
        elif len(self._greet) < 4 * NEW_DIALS:
            self._greet[endpoint] = self._greet.get(endpoint, False) or sync
        # beyond: forgotten (whoever needs us will say hello again)

    def new_period(self) -> None:
        """A protocol period starts: a fresh dial budget, spent first on the greetings that waited."""
        self._budget = NEW_DIALS
        while self._greet and self._budget > 0:
            endpoint = next(iter(self._greet))
            self.greet_later(endpoint, self._greet.pop(endpoint))

    def knock(self, now: float, seeds: list[str]) -> None:
        """Peers we declared dead may be cut off rather than gone: knock on one (that once spoke to
        us) per period, so that a healed partition reunites the mesh (the side found dead rejoins
        as a new incarnation). Alone, go back to ``seeds`` (those we were started with)."""
        every = self.knock_every
        live = {p.endpoint for p in self.membership.live_peers()}
        oldest: Peer | None = None
        for peer in self.membership.peers.values():
            if peer.state == "dead" and peer.incarnation in self.spoke and peer.endpoint not in live:
                if now - self.hello_sent.get(peer.endpoint, -1e9) >= every and (
                    oldest is None or self.hello_sent.get(peer.endpoint, -1e9) < self.hello_sent.get(oldest.endpoint, -1e9)
                ):
                    oldest = peer
        if oldest is not None:
            self.say_hello(oldest.endpoint, reply=True)
        if len(live) <= 1:
            for seed in seeds:
                if now - self.hello_sent.get(seed, -1e9) >= every:
                    self.greet_later(seed, sync=True)

    def introduce(self, peer: Peer) -> None:
        """A channel to ``peer`` opens: unless it spoke to us (it knows us), a hello goes first. A
        member that heard of a newcomer from a third node's table writes to it before the newcomer
        hears of the writer, and a newcomer takes no data from a node it does not know: it refused
        the first frame, which came again a retransmission timeout later (``rto``: a second, by
        default, on a client's first messages to a new instance)."""
        me = self.me
        if me is not None and peer.incarnation not in self.spoke and peer.incarnation != me.incarnation:
            # (not say_hello: this is no greeting that waits for an answer, and must not put off
            # the next one to that endpoint, which asks who lives there after a stale refusal)
            self.outbox.send(peer.endpoint, wire.encode_control(wire.HELLO, me.incarnation, peer.incarnation,
                                                                self.hello(reply=False)))

    # -- who -------------------------------------------------------------------------------------

    def heard(self, sender: int, now: float) -> Peer | None:
        peer = self.membership.heard(sender, now)
        if peer is not None:
            self.spoke.add(sender)
        return peer

    def member(self, sender: int, what: str) -> Peer | None:
        """The live member that sent a frame: its word counts (a stranger's is refused and counted)."""
        peer = self.heard(sender, self.clock())
        if peer is None:
            self.host.count_refused("unknown_peer", f"{what} from {sender:016x}, which is not a live member here")
        return peer

    def random_members(self, k: int, besides: int = 0) -> list[Peer]:
        """``k`` random live members (for news, indirect probes, anti-entropy): among those that
        have spoken to us first, so that names we only heard of (perhaps made up) cost no socket."""
        me = self.incarnation
        spoke = self.spoke
        known, heard_of = [], []
        for p in self.membership.live_peers():
            if p.incarnation not in (me, besides):
                (known if p.incarnation in spoke else heard_of).append(p)
        pool = known or heard_of  # (a node that just started has heard from nobody yet)
        return self.rng.sample(pool, min(k, len(pool)))

    def partners(self) -> list[Peer]:
        """Peers that must hear our news directly: the other instances of our service, and those we
        exchange messages with."""
        me = self.me
        if me is None:
            return []
        peers = self.membership.peers
        out = {p.incarnation: p for p in self.own_service()}
        for inc in (*self.outbox.out, *self.outbox.inbound):
            peer = peers.get(inc)
            if peer is not None and peer.live and peer is not me:
                out[inc] = peer
        return list(out.values())

    def own_service(self) -> list[Peer]:
        me = self.me
        if me is None or me.service is None:
            return []
        name = me.service.name
        return [p for p in self.membership.live_peers() if p.service_name == name and p is not me]

    # -- partitions held -------------------------------------------------------------------------

    def same_service_changed(self, peer: Peer) -> None:
        me = self.me
        if me is not None and me.service is not None and peer.service_name == me.service.name:
            self._holding_owed.add(peer.incarnation)  # it may have missed our partitions

    def announce_holding(self) -> None:
        """Our partitions (held, and standby copies), to the other instances of our service: all of
        them when they changed (``HOLDING_REPEATS`` periods in a row, against loss), else those that
        may have missed them."""
        said = self.heartbeat()
        if (said.holding, said.copies, said.restored) != self._holding_sent:
            self._holding_sent = (said.holding, said.copies, said.restored)
            self._holding_repeats = HOLDING_REPEATS
        if not self.life.joined or not (self._holding_repeats > 0 or self._holding_owed):
            return
        if self._holding_repeats > 0:
            self._holding_repeats -= 1
            peers = self.own_service()
        else:
            peers = [p for p in self.own_service() if p.incarnation in self._holding_owed]
        self._holding_owed.clear()
        hb = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, said)
        for peer in peers:
            self.outbox.send(peer.endpoint, hb)

    def heartbeat(self, *, ack_please: bool = False, leaving: bool | None = None) -> wire.Heartbeat:
        """A heartbeat that says what this node holds (its partitions, copies, what it read back)."""
        host = self.host
        return wire.Heartbeat(
            leaving=self.life.leaving if leaving is None else leaving, ack_please=ack_please,
            holding=host.holding, copies=host.copies, restored=host.restored,
        )

    # -- frames out ------------------------------------------------------------------------------

    def redial(self, peer: Peer) -> None:
        """Our probe of ``peer`` got no answer of its own (it came through another member, or not
        at all): dial it afresh, at most once per ``redial_every`` (``suspect_after + dead_after``).

        Over TCP, a member that answers others and not us is rarely losing frames: more often our
        connection to it is still backing off after a cut, and its next retransmission may come
        many seconds after the cut healed (the chaos test on hosts: one direction carried nothing
        for 12 s after a heal while gossip, answered through the producer, kept both ends alive;
        at shutdown, the producer gone, each took the other for dead). A new connection starts at
        once (see ``ZmqTransport.redial``); the other end, whose probes fail likewise, dials its own.
        """
        now = self.clock()
        if now - self._redialled.get(peer.incarnation, -1e9) < self.redial_every:
            return
        if len(self._redialled) > 4 * len(self.membership.peers) + 64:  # (members come and go: keep the live)
            self._redialled = {inc: t for inc, t in self._redialled.items() if inc in self.membership.peers}
        self._redialled[peer.incarnation] = now
        log.info("%s: no answer of its own from %s: dialling it again", self.name, peer.node)
        self.outbox.redial(peer.endpoint)

    def ask_for_acks(self) -> None:
        """A heartbeat asking for an ack to every live peer we have envelopes in flight to (once a
        period: an ack lost on the way would otherwise wait for the envelopes' resend)."""
        asking = None
        for ch in list(self.outbox.out.values()):
            if ch.window.in_flight and ch.peer.live and not ch.closed:
                asking = asking or wire.encode_control(wire.HEARTBEAT, self.incarnation, 0, self.heartbeat(ack_please=True))
                self.outbox.send(ch.peer.endpoint, asking)

    def send(self, peer: Peer, frame_type: int, body: msgspec.Struct) -> None:
        self.outbox.send(peer.endpoint, wire.encode_control(frame_type, self.incarnation, peer.incarnation, body))

    def tell_dead(self, peer: Peer) -> None:
        """Tell a peer we declared dead that it is (at most once a second)."""
        now = self.clock()
        if now - self.told_dead.get(peer.incarnation, -1e9) < 1.0:
            return
        self.told_dead[peer.incarnation] = now
        refuse = wire.Refuse("dead", f"{self.name} declared {peer.node} dead; rejoin as a new incarnation")
        self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, peer.incarnation, refuse))

    def refuse_stale(self, sender: int, receiver: int) -> None:
        """A frame for an incarnation of ours that is over: count it, tell its live sender."""
        self.host.count_refused("stale", f"frame for incarnation {receiver:016x}, this node is {self.incarnation:016x}")
        peer = self.membership.peers.get(sender)
        if peer is not None and peer.live:
            refuse = wire.Refuse("stale", stale=receiver)
            self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))
