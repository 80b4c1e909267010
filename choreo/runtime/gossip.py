"""Membership by gossip, SWIM-style: probes, rumors, anti-entropy, joining, leaving.

How this works. The cost of membership to one node does not grow with the mesh: per protocol
period (``heartbeat`` seconds) a node sends one PING and answers about one, whatever the number
of members (:mod:`~choreo.runtime.probes` decides whom, and what silence means). Every change
(a member joined, is suspect, refuted a suspicion, left, died; a service was declared or
retired) is a *rumor* (:mod:`~choreo.runtime.rumors`) that rides on those pings and pongs, and,
while there is news, on NEWS frames to ``GOSSIP_FANOUT`` random members every quarter period:
each rumor goes out O(log n) times per node, and reaches every node in O(log n) periods.
A suspected member hears of it and refutes it by raising its record's version; the suspecting
node also tells the suspect directly. Every ``SYNC_EVERY`` periods a node compares its whole
table with one random member (64 bucket digests, then only the buckets that differ:
anti-entropy, for what rumors missed, such as news lost in a network partition; the digests and
tables are :class:`~choreo.runtime.membership.Membership`'s).

Joining. A node starts knowing only its seeds. It says HELLO to each, asking for the whole
table (``sync``); a seed answers with its own hello and a full SYNC (members, declared system,
retirements), and spreads the newcomer's record. The newcomer then greets the instances of its
own service (their hellos say which partitions they hold: a newcomer waits for a handover only
from an instance that holds the partition). It has *joined* once it has a full table, every
endpoint it expects an answer from has answered or stayed silent for ``join_wait``, and every
live instance of its service has said what it holds (asked again until it does); until then
it routes nothing (a node that routes on a partial view sends messages to owners that lack
their partition's dedup ids). A seed that does not answer is reported by name within
``SEED_REPORT_AFTER`` seconds, and asked again every period. (:mod:`~choreo.runtime.joining`
keeps the seeds and the answers waited for.)

Partitions held travel where they matter, to the other instances of the node's service: in
hellos, and in HEARTBEATs to them whenever they change (repeated ``HOLDING_REPEATS`` periods
against loss), and to one that joins or refutes a suspicion (it may have missed them).
HEARTBEATs also go, every period, to the peers this node has messages in flight to (asking
for their ack).

A peer declared dead that speaks again is told so (REFUSE "dead"), as is a node that hears a
rumor of its own death: it rejoins as a new incarnation. A dead peer that once spoke to this
node is knocked on now and then (one per period at most), so a healed network partition
reunites the mesh. A leaving node says so (a rumor, and directly to its partners: no new work
is routed to it) and says BYE once drained. Gossip contacts at most ``NEW_DIALS`` endpoints that
are not live members per period, and never those only named by others: a hello or a table
listing thousands of strangers opens no socket to them. (:mod:`~choreo.runtime.contacts` keeps
who spoke to us, the dial budget, partners and partitions held, and sends the hellos and refusals.)

A node that was frozen (a long GC pause, a suspended VM, a handler that blocked the event loop)
sees a gap between two ticks: the silence of its peers during that gap is its own, not theirs,
so its probes' and suspicions' clocks move on by the gap (:meth:`Gossip.forgive`; the engine
decides, and rejoins at once after a gap long enough for the mesh to have declared it dead).

Everything a peer's frame changes is reported to the node through :class:`GossipHost`; peer
states change only through :data:`~choreo.states.PEER_TRANSITIONS` (:class:`~choreo.runtime.membership.Membership`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from .. import wire
from ..config import NodeConfig
from ..errors import ChoreoUsageError, ProtocolError
from ..spec import ServiceSpec
from .contacts import NEW_DIALS, Contacts
from .joining import SEED_REPORT_AFTER, Joining
from .lifecycle import Lifecycle
from .membership import Conflict, Membership, Peer, Update
from .outbox import Outbox
from .probes import Probes
from .rumors import Rumors

__all__ = ["Gossip", "GossipHost", "SEED_REPORT_AFTER", "GOSSIP_FANOUT", "SYNC_EVERY", "NEW_DIALS"]

log = logging.getLogger("choreo.node")
_ALIVE = wire.MEMBER_STATES.index("alive")
GOSSIP_FANOUT = 3  # members a node sends its news to, every quarter period, while it has news
RETRANSMIT_MULT = 4  # each rumor goes out RETRANSMIT_MULT * ceil(log10(n + 1)) times per node
PIGGYBACK_BYTES = 4096  # rumors per frame, at most (one always goes, however large)
SYNC_EVERY = 20  # periods between two anti-entropy rounds of a node
_encode = msgspec.msgpack.Encoder().encode


class GossipHost(Protocol):
    """What gossip tells the node it serves."""

    @property
    def holding(self) -> bytes:
        """The partitions this node owns or drains, as a bitmap (a newcomer waits for their handovers)."""

    @property
    def copies(self) -> bytes:
        """The partitions this node keeps a standby copy of, as a bitmap."""

    @property
    def restored(self) -> list[tuple[int, int]]:
        """Of the partitions held, those read back and not settled yet, with their epochs."""

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
        lifecycle: Lifecycle,
        host: GossipHost,
        *,
        config: NodeConfig,
        clock: Callable[[], float],
    ) -> None:
        self.membership = membership
        self.outbox = outbox
        self.life = lifecycle
        self.host = host
        self.config = config
        self.clock = clock
        self.period = config.heartbeat
        self.rng = random.Random(0)  # reseeded by the incarnation at start: replays under the harness's seed
        self.probes = Probes(suspect_after=config.suspect_after, dead_after=config.dead_after, rng=self.rng)
        self.rumors = Rumors(mult=RETRANSMIT_MULT)
        self.contacts = Contacts(membership, outbox, lifecycle, host, period=self.period, clock=clock, rng=self.rng,
                                 redial_every=config.suspect_after + config.dead_after)
        self.joining = Joining(self.contacts, membership, lifecycle, host, config=config, clock=clock)
        self._next_period = 0.0
        self._next_gossip = float("inf")
        self._periods = 0
        self._spec_asked: dict[str, float] = {}
        self._retired_told: set[str] = set()  # retirements we spread (or learned by gossip)
        self.tell_dead = self.contacts.tell_dead  # (the engine's receive path refuses for us)
        self.refuse_stale = self.contacts.refuse_stale

    @property
    def me(self) -> Peer | None:
        """This node's own record (None until started)."""
        return self.contacts.me

    @property
    def incarnation(self) -> int:
        return self.contacts.incarnation

    # -- joining ---------------------------------------------------------------------------------

    def start(self, me: Peer, seeds: Iterable[str]) -> None:
        """Register ourselves, then say hello to every seed."""
        self.rng.seed(me.incarnation)
        joining = self.joining
        self._begin(me, [s for s in seeds if s != me.endpoint])
        joining.initial_seeds = list(joining.seeds)
        self.life.since = self.clock()
        joining.ask(joining.seeds)

    def rejoin(self, me: Peer, endpoints: Iterable[str]) -> None:
        """We came back as a new incarnation: ask a few endpoints we knew (the one that told us we
        were dead among them) for their table."""
        joining = self.joining
        if self.contacts.me is not None and self.contacts.me.incarnation != me.incarnation:
            _bury_former_life(self.rumors, self.contacts.me)
        self.contacts.told_dead.clear()
        self.contacts.spoke.clear()
        known = sorted(set(endpoints) - {me.endpoint})
        self.rng.shuffle(known)
        first = [e for e in (joining.refused_by, *joining.initial_seeds) if e and e != me.endpoint]
        picked = list(dict.fromkeys([*first, *known[:GOSSIP_FANOUT]]))
        self._begin(me, picked or list(joining.initial_seeds))
        joining.seed_reported.clear()
        joining.ask(joining.seeds)

    def _begin(self, me: Peer, seeds: list[str]) -> None:
        self.contacts.me = me
        self.membership.upsert(me)
        now = self.clock()
        self._next_period = now + self.period
        self._periods = self.rng.randrange(SYNC_EVERY)  # nodes started together do not sync together
        self.rumors.add(("m", me.incarnation), me.record(), len(_encode(me.record())))
        self.joining.begin(seeds, now)

    def settled(self, next_period: float) -> None:
        """As after a long quiet run (a simulation's starting point): every member we know has
        spoken to us, nothing is news, and our next period starts at ``next_period``."""
        self.contacts.spoke = {p.incarnation for p in self.membership.live_peers()}
        self.rumors = Rumors(mult=RETRANSMIT_MULT)
        self._next_period = next_period

    # -- leaving ---------------------------------------------------------------------------------

    def begin_leave(self) -> None:
        """Tell the mesh we stop taking new work (our partners directly: they route around us at once)."""
        if self.life.state not in ("joining", "joined", "rejoined"):
            return  # leaving already, or refused by the mesh (nothing to hand over)
        self.life.on("leave", self.clock())
        me = self.me
        if me is None:
            return
        self.membership.leaving(me.incarnation)
        self.membership.bump(me)
        self._rumor(me.record())
        hb = self.contacts.heartbeat(leaving=True)
        for peer in self.contacts.partners():
            self.outbox.send(peer.endpoint, wire.encode_control(wire.HEARTBEAT, self.incarnation, peer.incarnation, hb))

    def finish_leave(self) -> None:
        """Say goodbye (after draining) to our partners and a few others, who spread it."""
        bye = wire.Bye()
        told = {p.incarnation: p for p in self.contacts.partners()}
        for peer in self.contacts.random_members(GOSSIP_FANOUT):
            told.setdefault(peer.incarnation, peer)
        for peer in told.values():
            self.outbox.send(peer.endpoint, wire.encode_control(wire.BYE, self.incarnation, peer.incarnation, bye))
        if self.life.state == "leaving":
            self.life.on("bye", self.clock())

    # -- timers ----------------------------------------------------------------------------------

    @property
    def next_due(self) -> float:
        """When :meth:`tick` next has something to do (the clock's time)."""
        due = min(self._next_period, self.probes.due())
        if len(self.rumors):
            due = min(due, self._next_gossip)
        return min(due, self.joining.due())

    def tick(self, now: float) -> None:
        """Whatever is due: the period's probe and chores, overdue probes, suspicions, news."""
        if now >= self._next_period:
            self._next_period = max(self._next_period + self.period, now + self.period / 2)
            self._each_period(now)
        indirect, failed = self.probes.overdue(now)
        for target in indirect:
            self._probe_indirectly(target)
        for target in failed:
            self._probe_failed(target, now)
        membership = self.membership  # (with two or more members, when this node last heard any)
        for inc in self.probes.expired(now, membership.heard_at if membership.live_count > 2 else None):
            peer = self.membership.expire(inc)
            if peer is not None:
                log.warning("%s: peer %s is dead (no answer, nor a refutation within %.1f s)", self.contacts.name, peer.node,
                            self.config.dead_after)
                record = peer.record()
                self._rumor(record)
                # its service's other instances take its partitions: they hear it first, before
                # anything we resend them of what it had not acknowledged (one connection: in order)
                for other in self.membership.instances(peer.service_name or "") if peer.vouched else ():
                    if other is not self.me:
                        self.contacts.send(other, wire.NEWS, wire.News([record]))
                self.host.peer_gone(peer)
        if len(self.rumors) and now >= self._next_gossip:
            self._spread()
        if len(self.rumors):
            if self._next_gossip == float("inf") or now >= self._next_gossip:
                self._next_gossip = now + self.period / 4
        else:
            self._next_gossip = float("inf")
        self.joining.check(now)

    def _each_period(self, now: float) -> None:
        self._periods += 1
        contacts = self.contacts
        contacts.new_period()
        if self.joining.seeds:
            self.joining.ask_seeds(now)
        contacts.knock(now, self.joining.initial_seeds)
        me = self.me
        if me is None:
            return
        # each suspicion we time, ours or heard, to the suspect, until it refutes or dies: a refutation
        # may reach some members and not us (its rumor runs out), and it answers us with its record
        for inc in list(self.probes.suspicions):
            peer = self.membership.peers.get(inc)
            if peer is not None and peer.live:
                self.contacts.send(peer, wire.NEWS, wire.News([peer.record("suspect")]))
        target = self.probes.next_target(self._probe_candidates(), self.membership.peers)
        if target is not None:
            self._ping(self.membership.peers[target], self.probes.start(target, now))
        contacts.ask_for_acks()
        for name in self.membership.retired - self._retired_told:  # an operator's order, given here
            self._retired_told.add(name)
            self._rumor(wire.Retired(name))
        if self._periods % SYNC_EVERY == 0:
            self.membership.forget_dead(now, keep=self.config.forget_dead_after)
            self.contacts.spoke &= set(self.membership.peers)
            self.probes.sweep(now)
            partner = self.contacts.random_members(1)
            if partner:
                contacts.send(partner[0], wire.SYNC, wire.Sync(buckets=list(self.membership.buckets),
                                                               system=self.membership.system_digest(), reply=True))
        contacts.announce_holding()

    def _probe_candidates(self) -> list[int]:
        me = self.incarnation
        return [p.incarnation for p in self.membership.live_peers() if p.incarnation != me]

    def forgive(self, gap: float, now: float) -> None:
        """This node was frozen for ``gap`` seconds: its peers' silence meanwhile was its own."""
        log.warning("%s: no tick for %.1f s (this process paused, or its clock jumped): not counting it against "
                    "its peers", self.contacts.name, gap)
        self.probes.forgive(gap, now)
        self._next_period = now  # and probe at once: they hear that we are back

    # -- probing ---------------------------------------------------------------------------------

    def _ping(self, peer: Peer, seq: int) -> None:
        source = None if peer.incarnation in self.contacts.spoke or self.me is None else self.me.record()
        self.contacts.send(peer, wire.PING, wire.Ping(seq, source, self._news()))

    def _probe_indirectly(self, target: int) -> None:
        peer = self.membership.peers.get(target)
        seq = self.probes.seq_of(target)
        if peer is None or seq is None:
            return
        helpers = self.contacts.random_members(self.config.indirect_probes, besides=target) if peer.vouched else []
        record = peer.record()
        for helper in helpers:
            self.contacts.send(helper, wire.PING_REQ, wire.PingReq(seq, record, self._news()))
        self._ping(peer, seq)  # and directly again (memberlist's fallback ping): one lost frame is not a failure

    def _probe_failed(self, target: int, now: float) -> None:
        peer = self.membership.suspect(target)
        if peer is None:
            return
        log.info("%s: peer %s is suspect (no answer to a probe within %.1f s)", self.contacts.name, peer.node,
                 self.config.suspect_after)
        self.probes.suspect(target, now)
        record = peer.record("suspect")
        self._rumor(record)
        self.contacts.send(peer, wire.NEWS, wire.News([record]))  # if it hears this, it refutes at once
        self.contacts.redial(peer)

    # -- rumors ----------------------------------------------------------------------------------

    def _rumor(self, rumor: wire.Member | wire.Declared | wire.Retired) -> None:
        if isinstance(rumor, wire.Member):
            known = self.membership.peers.get(rumor.incarnation)
            if known is not None and not known.vouched:
                return  # only a client's word for it: we pass on nothing of it (see introducer)
            key: tuple[str, Any] = ("m", rumor.incarnation)
        elif isinstance(rumor, wire.Declared):
            key = ("s", rumor.spec.name)
        else:
            key = ("s", rumor.service)
        self.rumors.add(key, rumor, len(_encode(rumor)))
        if self._next_gossip == float("inf"):
            self._next_gossip = self.clock() + self.period / 4
        if key[0] == "s" and self.me is not None:
            # the declared system changed (rare): spread it at once, every hop, since a node that does
            # not know a service yet has nobody to send its messages to
            self._spread()

    def _news(self) -> list[Any]:
        return self.rumors.take(PIGGYBACK_BYTES, self.membership.live_count)

    def _spread(self) -> None:
        for peer in self.contacts.random_members(GOSSIP_FANOUT):
            news = self._news()
            if not news:
                return
            self.contacts.send(peer, wire.NEWS, wire.News(news))

    def _hear(self, rumors: list[Any], now: float, sender: Peer | None = None, trusted: bool = True) -> None:
        """Rumors a member passed on; ``trusted``: whether its word about the declared system and
        about other members counts (see :meth:`~choreo.runtime.admission.Admission.may_gossip`)."""
        for rumor in rumors:
            if isinstance(rumor, wire.Member):
                if not self._may_speak_of(rumor, sender, trusted):
                    continue
                if (self._learn_member(rumor, now, spread=True, introduced_by=introducer(rumor, sender, trusted))
                        and sender is not None and self.me is not None):
                    self.contacts.send(sender, wire.NEWS, wire.News([self.me.record()]))  # our refutation, to who told us
            elif not trusted:
                continue
            elif isinstance(rumor, wire.Declared):
                if self._learn_system([rumor.spec], []):
                    self._rumor(rumor)
            elif self._learn_system([], [rumor.service]):
                self._rumor(rumor)

    def _may_speak_of(self, record: wire.Member, sender: Peer | None, trusted: bool) -> bool:
        return may_speak_of(self.membership, record, sender, trusted, self.config.max_members_per_key)

    def _learn_member(self, record: wire.Member, now: float, spread: bool, introduced_by: str | None = None) -> bool:
        """Apply a member's record (``introduced_by``: see :func:`introducer`); True if about us and refuted."""
        me = self.me
        if me is None:
            return False
        if record.incarnation == me.incarnation:
            return self._about_me(record)
        if (dead := self.membership.bury_former_life(record, me.endpoint, now)) is not None:
            self._rumor(dead)  # a former life of ours, alive in the news: dead, and the mesh hears so
            return False
        known = self.membership.peers.get(record.incarnation) if introduced_by is None else None
        if known is not None and not known.vouched and known.live:
            self.vouched(known)  # (a member we trust, or the member itself, speaks of it)
        update = self.membership.merge(record, now, introduced_by)
        if update is None:
            return False
        if spread or update.event != "joined":
            self._rumor(record)
        self._apply(update, now)
        return False

    def _apply(self, update: Update, now: float) -> None:
        peer, event = update.peer, update.event
        if event == "joined":
            for old in update.replaced:
                self.probes.forget(old.incarnation)
                self.host.peer_gone(old)
            self.probes.added(peer.incarnation)
            if peer.state == "suspect":
                self.probes.suspect(peer.incarnation, now)
            if peer.service is None and peer.claims is not None:
                self._ask_spec(peer, now)
            elif peer.service is not None:
                self.host.peer_joined(peer)
            self.contacts.same_service_changed(peer)
        elif event == "suspected":
            self.probes.suspect(peer.incarnation, now)
        elif event in ("dead", "left"):
            self.probes.forget(peer.incarnation)
            self.host.peer_gone(peer)
        else:  # refuted, leaving, or simply newer: no suspicion stands
            self.probes.cleared(peer.incarnation)
            if event == "refuted":
                self.contacts.same_service_changed(peer)

    def _about_me(self, record: wire.Member) -> bool:
        me = self.me
        assert me is not None
        state = wire.MEMBER_STATES[record.state]
        if state in ("dead", "left"):
            if not self.life.leaving:
                self.host.declared_dead("the mesh declared us dead (gossip: a network partition, or a long pause)")
        elif record.version >= me.version and (state == "suspect" or record.version > me.version):
            self.membership.bump(me, record.version)  # refute: a newer record of ours than the suspicion
            self._rumor(me.record())
            return True
        elif state == "suspect":
            return True  # refuted already, and the teller missed it: it hears our record from us
        return False

    def _ask_spec(self, peer: Peer, now: float) -> None:
        """A member of a service whose declarations we lack: ask it (once per two periods per service)."""
        name = peer.claims or ""
        if now - self._spec_asked.get(name, -1e9) >= 2 * self.period:
            self._spec_asked[name] = now
            self.contacts.greet_later(peer.endpoint)

    # -- the declared system ---------------------------------------------------------------------

    def _learn_system(self, services: list[ServiceSpec], retired: list[str]) -> bool:
        """Learn declared services and retirements; True if anything was new."""
        news = False
        for name in retired:
            self._retired_told.add(name)
            if self.membership.retired_by_gossip(name):
                log.info("%s: %s was retired (gossip)", self.contacts.name, name)
                self.host.service_retired(name)
                news = True
        for spec in services:
            if spec.name not in self.membership.retired:
                try:
                    self.membership.check_conflicts(spec)
                except Conflict as exc:
                    self.host.count_refused("conflict", f"gossiped declaration of {spec.name}: {exc}")
                    continue
                gained = self.membership.declare(spec)
                if gained is not None:
                    news = True
                    self._gained(gained)
        return news

    def vouched(self, peer: Peer) -> None:
        """``peer``, only a client's introduction so far, is vouched for: it may have work, the mesh hears of it."""
        if self.membership.vouch(peer):
            self._rumor(peer.record())
            if peer.routable and peer.service is not None and peer is not self.me:
                self.host.peer_joined(peer)

    def _gained(self, peers: list[Peer]) -> None:
        """Members we knew by name only got their declarations: they are instances now."""
        for peer in peers:
            if peer.routable and peer is not self.me:
                self.host.peer_joined(peer)

    # -- frames in -------------------------------------------------------------------------------

    def handlers(self) -> dict[int, Callable[[int, bytes, bool], None]]:
        """What to do with each membership frame type: ``handler(sender, frame, trusted)`` (the engine's
        frame table; ``trusted``: whether the sender's word about the declared system counts). The
        engine handles HELLO and REFUSE itself first (admission), then calls :meth:`on_hello` and
        :meth:`on_refuse`."""

        def decoded(frame_type: int, fn: Callable[..., None]) -> Callable[[int, bytes, bool], None]:
            return lambda sender, data, trusted: fn(sender, wire.decode_control(frame_type, data), trusted=trusted)

        return {
            wire.HEARTBEAT: decoded(wire.HEARTBEAT, self.on_heartbeat),
            wire.BYE: lambda sender, data, trusted: self.on_bye(sender),
            wire.PING: decoded(wire.PING, self.on_ping),
            wire.PING_REQ: decoded(wire.PING_REQ, self.on_ping_req),
            wire.PONG: decoded(wire.PONG, self.on_pong),
            wire.NEWS: decoded(wire.NEWS, self.on_news),
            wire.SYNC: decoded(wire.SYNC, self.on_sync),
        }

    def on_ping(self, sender: int, ping: wire.Ping, *, trusted: bool = True) -> None:
        now = self.clock()
        if ping.source is not None and ping.source.incarnation == sender and sender not in self.membership.peers:
            self._learn_member(ping.source, now, spread=True)  # a newcomer introduces itself
        peer = self.contacts.member(sender, "ping")
        if peer is not None:
            self._hear(ping.rumors, now, peer, trusted)
            self.contacts.send(peer, wire.PONG, wire.Pong(ping.seq, self._news()))

    def on_ping_req(self, sender: int, req: wire.PingReq, *, trusted: bool = True) -> None:
        now = self.clock()
        requester = self.contacts.member(sender, "ping_req")
        if requester is None:
            return
        self._hear(req.rumors, now, requester, trusted)
        if req.target.incarnation == self.incarnation:
            return
        target = self.membership.peers.get(req.target.incarnation)
        if target is None and self._may_speak_of(req.target, requester, trusted):
            self._learn_member(req.target, now, spread=False, introduced_by=introducer(req.target, requester, trusted))
            target = self.membership.peers.get(req.target.incarnation)
        if target is not None and target.live:
            self._ping(target, self.probes.relay(sender, req.seq, now))

    def on_pong(self, sender: int, pong: wire.Pong, *, trusted: bool = True) -> None:
        now = self.clock()
        peer = self.contacts.member(sender, "pong")
        if peer is None:
            return
        self._hear(pong.rumors, now, peer, trusted)
        target = self.probes.answered(pong.seq)
        if target is not None:
            probed = self.membership.peers.get(target)
            if target != sender and probed is not None:  # answered through another member
                self.contacts.redial(probed)
            return
        relay = self.probes.relayed(pong.seq)
        if relay is not None:
            requester = self.membership.peers.get(relay[0])
            if requester is not None and requester.live:
                self.contacts.send(requester, wire.PONG, wire.Pong(relay[1], self._news()))

    def on_news(self, sender: int, news: wire.News, *, trusted: bool = True) -> None:
        peer = self.contacts.member(sender, "news")
        if peer is not None:
            self._hear(news.rumors, self.clock(), peer, trusted)

    def on_sync(self, sender: int, sync: wire.Sync, *, trusted: bool = True) -> None:
        now = self.clock()
        peer = self.contacts.member(sender, "sync")
        if peer is None:
            return
        if trusted:
            self._learn_system(sync.services, sync.retired)
        for record in sync.members:
            if self._may_speak_of(record, peer, trusted):
                self._learn_member(record, now, spread=False, introduced_by=introducer(record, peer, trusted))
        if sync.full and self.life.joining and not self.joining.synced:
            self.joining.synced = True
            me = self.me
            if me is not None and me.service is not None:
                self._rumor(wire.Declared(me.service))  # our own word, to whoever lacks it
            self.joining.full_table(peer, now)
        m = self.membership
        if sync.reply:  # its digests: answer with what differs, and ask for its side of it (anti-entropy)
            mine = m.buckets
            differ = [b for b, digest in enumerate(sync.buckets) if b < len(mine) and mine[b] != digest]
            system = m.system_digest() != sync.system
            if differ or system:
                self.contacts.send(peer, wire.SYNC, m.table(differ, system, want=differ))
        elif sync.want:
            self.contacts.send(peer, wire.SYNC, m.table(sync.want, bool(sync.services)))

    def on_hello(self, sender: int, hello: wire.Hello, *, trusted: bool = True) -> None:
        """A hello; ``trusted`` says whether what it says of the declared system counts."""
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
                refuse = wire.Refuse("conflict", str(exc))
                self.outbox.send(hello.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))
                return
        elif not known.live:
            self.contacts.tell_dead(known)  # we had declared it dead or gone: it must come back anew
            return
        had_spec = known is not None and known.service is not None
        news = hello.service is not None and hello.service.name not in self.membership.declared
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
                version=hello.version,
                key=hello.key,
            )
        )
        self.contacts.spoke.add(sender)
        peer.advertised(hello)
        self._gained([p for p in self.membership.gained if p is not peer])
        for old in replaced:
            log.info("%s: %s replaced %s at %s", self.contacts.name, peer.node, old.node, old.endpoint)
            self.probes.forget(old.incarnation)
            self.host.peer_gone(old)
        if hello.version > peer.version:  # its own newer word: refutes a suspicion we hold
            state = wire.MEMBER_STATES.index("leaving" if hello.leaving else "alive")
            self._learn_member(wire.Member(sender, hello.version, state, hello.endpoint, hello.node,
                                           peer.service_name, hello.window, hello.max_message_bytes), now, spread=True)
        if new:
            log.info("%s: %s joined (%s)", self.contacts.name, peer.node, peer.endpoint)
            self.probes.added(sender)
            self._rumor(peer.record())
            self.host.peer_joined(peer)
            self.contacts.same_service_changed(peer)
        elif not had_spec and peer.service is not None:
            self.host.peer_joined(peer)
        if hello.leaving:
            self.membership.leaving(sender)
        if trusted:
            self._learn_system(hello.services, hello.retired)
        ask = self.joining.wants_table  # (then whoever greets us is asked for it, as a seed is)
        if hello.reply or new or ask:
            self.contacts.say_hello(hello.endpoint, reply=False, receiver=sender, sync=ask)
        if news and hello.service is not None and trusted:
            # a service new to us: the mesh learns it by gossip, spread at once (to the newcomer too,
            # perhaps), so only after our answer: it refuses a frame from a node it does not know yet
            self._rumor(wire.Declared(hello.service))
        if hello.sync:
            self.contacts.send(peer, wire.SYNC, self.membership.table(None, True))
        self.joining.answered(hello.endpoint, now)

    def on_heartbeat(self, sender: int, hb: wire.Heartbeat, *, trusted: bool = True) -> None:
        peer = self.contacts.heard(sender, self.clock())
        if peer is None:
            return
        peer.advertised(hb)
        if hb.leaving and peer.routable:
            self.membership.leaving(sender)
            self.probes.cleared(sender)
        if hb.ack_please:
            ich = self.outbox.inbound.get(sender)
            if ich is not None:
                self.outbox.send_ack(ich)
        if hb.retired and trusted:
            self._learn_system([], hb.retired)

    def on_bye(self, sender: int) -> None:
        if sender == self.incarnation:  # this node says goodbye to others, never to itself
            self.host.count_refused("malformed", "a BYE that claims to come from this node itself")
            return
        peer = self.membership.left(sender)
        if peer is not None:
            log.info("%s: %s left", self.contacts.name, peer.node)
            self._rumor(peer.record())
            self.probes.forget(sender)
            self.host.peer_gone(peer)

    def on_refuse(self, sender: int, refuse: wire.Refuse, *, authoritative: bool = True) -> None:
        """A peer refused one of our frames. ``authoritative``: the refusal comes from a node whose
        word may stop this one (see :mod:`~choreo.runtime.admission`); a stranger's is advisory."""
        peer = self.membership.peers.get(sender)
        who = peer.node if peer is not None else f"incarnation {sender:016x}"
        self.host.count_refused("refused_by_peer", _refusal(refuse, who))
        if refuse.reason == "conflict":
            if not authoritative:
                self.joining.refusals.append(refuse.detail)
                log.warning("%s: a node this one does not know refuses it: %s (not taken as the mesh's word: "
                            "without keys anyone can send this; still trying to join)", self.contacts.name, refuse.detail)
                return
            self.life.fatal = ChoreoUsageError(f"the mesh refused this node: {refuse.detail}")
            if self.life.state != "refused":
                self.life.on("refused", self.clock())
        elif refuse.reason == "dead":  # only a node we know can have declared us dead, unless we are
            if peer is None and self.membership.live_count > 1:  # alone: the members are all new to us
                return  # (the other side of a long partition rejoined meanwhile: nemesis seed 3109, 100 s)
            self.joining.refused_by = peer.endpoint if peer is not None else ""
            who = peer.node if peer is not None else "a member new to this node, which has no live peer,"
            self.host.declared_dead(f"{who} declared us dead (a network partition, or a long pause)")
        elif refuse.reason == "stale":
            # we wrote to an incarnation that is over there: ask who is at that endpoint now (its
            # hello replaces the old incarnation, whose unacknowledged envelopes go to the new owners)
            old = self.membership.peers.get(refuse.stale)
            if old is not None and old.live and self.clock() - self.contacts.hello_sent.get(old.endpoint, -1e9) >= 1.0:
                self.contacts.say_hello(old.endpoint, reply=True)

    # -- frames out ------------------------------------------------------------------------------


def _bury_former_life(rumors: Rumors, former: Peer) -> None:
    """Our former incarnation's news goes out as dead from now on, never as alive: a member that
    heard the old "alive" after the new incarnation took it for a newer node at our endpoint and
    declared the new one dead (a lone node, frozen: the news of its join had waited in the queue
    with nobody to hear it, and went out to the next node to join)."""
    record = former.record("dead")
    rumors.add(("m", former.incarnation), record, len(_encode(record)))


def _refusal(refuse: wire.Refuse, who: str) -> str:
    """What a peer's refusal of our frame says, for the log (a stale one carries no detail)."""
    if refuse.reason == "stale":
        return (f"stale: {who} says the incarnation {refuse.stale:016x} this node wrote to is over "
                "(it restarted or rejoined); asking who is at its endpoint now")
    return f"{refuse.reason}: {refuse.detail}"


# -- whose word about a member counts ----------------------------------------------------------

def may_speak_of(membership: Membership, record: wire.Member, sender: Peer | None, trusted: bool, limit: int) -> bool:
    """Whether ``sender``'s word about ``record``'s member counts. With keys, a node whose key
    serves nothing (a client's) speaks for itself, and of others only to introduce them: a member
    alive, unknown here, at an endpoint no live member holds (a client may be a newcomer's seed),
    and no more than ``limit`` (``max_members_per_key``) at once, each costing a dial. So it cannot
    declare a member suspect or dead (a member told it is dead starts a new life, and everyone
    drops its channels) nor put another incarnation in a member's place. (Not counted as a
    refusal: a client passes on what it heard, as every member does.)"""
    key = introducer(record, sender, trusted)
    if key is None:
        return True
    return (record.state == _ALIVE and record.incarnation not in membership.peers
            and membership.live_at(record.endpoint) is None and membership.introduced(key) < limit)


def introducer(record: wire.Member, sender: Peer | None, trusted: bool) -> str | None:
    """The key of the client whose word alone would bring ``record``'s member here, or None when
    the word vouches for it (a member we trust, or the member itself). A member only a client
    introduced gets no work and is passed on to nobody (no rumor, no SYNC, no digest, no indirect
    probe: a helper would learn it) until its own frame, on a connection its key may serve from,
    vouches for it (:meth:`Gossip.vouched`): otherwise a client key could add phantom instances at
    free endpoints, which every node would route to, then wait for their death."""
    if trusted or sender is None or record.incarnation == sender.incarnation:
        return None
    return sender.principal or "?"
