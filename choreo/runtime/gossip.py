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
anti-entropy, for what rumors missed, such as news lost in a network partition).

Joining. A node starts knowing only its seeds. It says HELLO to each, asking for the whole
table (``sync``); a seed answers with its own hello and a full SYNC (members, declared system,
retirements), and spreads the newcomer's record. The newcomer then greets the instances of its
own service (their hellos say which partitions they hold: a newcomer waits for a handover only
from an instance that holds the partition). It has *joined* once it has a full table and every
endpoint it expects an answer from has answered or stayed silent for ``join_wait``; until then
it routes nothing (a node that routes on a partial view sends messages to owners that lack
their partition's dedup ids). A seed that does not answer is reported by name within
``SEED_REPORT_AFTER`` seconds, and asked again every period.

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
listing thousands of strangers opens no socket to them.

A node that was frozen (a long GC pause, a suspended VM, a handler that blocked the event loop)
sees a gap between two ticks: the silence of its peers during that gap is its own, not theirs,
so its probes' and suspicions' clocks move on by the gap (:meth:`Gossip.forgive`; the engine
decides, and rejoins at once after a gap long enough for the mesh to have declared it dead).

Everything a peer's frame changes is reported to the node through :class:`GossipHost`; peer
states change only through :data:`~choreo.states.PEER_TRANSITIONS` (:class:`~choreo.runtime.membership.Membership`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from .. import wire
from ..config import NodeConfig
from ..errors import ChoreoUsageError, ProtocolError
from ..spec import ServiceSpec
from .lifecycle import Lifecycle
from .membership import Conflict, Membership, Peer, Update
from .outbox import Outbox
from .probes import Probes
from .rumors import Rumors

__all__ = ["Gossip", "GossipHost", "SEED_REPORT_AFTER", "GOSSIP_FANOUT", "SYNC_EVERY", "NEW_DIALS"]

log = logging.getLogger("choreo.node")
SEED_REPORT_AFTER = 2.0  # seconds without an answer before a seed is reported as unreachable
SEED_REPORT_EVERY = 30.0  # and again this often while it stays silent
GOSSIP_FANOUT = 3  # members a node sends its news to, every quarter period, while it has news
RETRANSMIT_MULT = 4  # each rumor goes out RETRANSMIT_MULT * ceil(log10(n + 1)) times per node
PIGGYBACK_BYTES = 4096  # rumors per frame, at most (one always goes, however large)
SYNC_EVERY = 20  # periods between two anti-entropy rounds of a node
NEW_DIALS = 32  # endpoints that are not live members contacted per period, at most
HOLDING_REPEATS = 3  # periods a change of partitions held is sent again (against loss)
_encode = msgspec.msgpack.Encoder().encode


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
        self.me: Peer | None = None
        self.rng = random.Random(0)  # reseeded by the incarnation at start: replays under the harness's seed
        self.probes = Probes(suspect_after=config.suspect_after, dead_after=config.dead_after, rng=self.rng)
        self.rumors = Rumors(mult=RETRANSMIT_MULT)
        self.seeds: list[str] = []  # seeds that have not answered yet
        self.initial_seeds: list[str] = []  # what we go back to when we find ourselves alone
        self.join_wait = max(2 * config.heartbeat, 1.0)  # how long a silent endpoint holds up joining
        self._hello_sent: dict[str, float] = {}
        self._told_dead: dict[int, float] = {}
        self._seed_asked: dict[str, float] = {}  # seed -> when we first said hello to it
        self._seed_reported: dict[str, float] = {}
        self._expected: dict[str, float] = {}  # while joining: endpoint -> when we asked it (no answer yet)
        self._synced = False  # while joining: we have a whole table
        self.refusals: list[str] = []  # conflicts reported by nodes whose word does not stop this one
        self.refusals: list[str] = []  # conflicts reported by nodes whose word does not stop this one
        self._spoke: set[int] = set()  # incarnations that sent us a frame (they know us; we may knock)
        self._refused_by = ""  # the endpoint that last told us we were declared dead
        self._greet: dict[str, bool] = {}  # endpoints to say hello to when the budget allows (-> ask for a table)
        self._budget = NEW_DIALS
        self._next_period = 0.0
        self._next_gossip = float("inf")
        self._periods = 0
        self._holding_sent = b""
        self._holding_repeats = 0
        self._holding_owed: set[int] = set()  # instances of our service that may lack our partitions
        self._spec_asked: dict[str, float] = {}
        self._retired_told: set[str] = set()  # retirements we spread (or learned by gossip)
        self._suspecting: set[int] = set()  # suspicions our own probes raised (we tell the suspect each period)

    @property
    def incarnation(self) -> int:
        return self.me.incarnation if self.me is not None else 0

    # -- joining ---------------------------------------------------------------------------------

    def start(self, me: Peer, seeds: Iterable[str]) -> None:
        """Register ourselves, then say hello to every seed."""
        self.rng.seed(me.incarnation)
        self._begin(me, [s for s in seeds if s != me.endpoint])
        self.initial_seeds = list(self.seeds)
        self.life.since = self.clock()
        self._ask(self.seeds)

    def rejoin(self, me: Peer, endpoints: Iterable[str]) -> None:
        """We came back as a new incarnation: ask a few endpoints we knew (the one that told us we
        were dead among them) for their table."""
        self._told_dead.clear()
        self._spoke.clear()
        known = sorted(set(endpoints) - {me.endpoint})
        self.rng.shuffle(known)
        first = [e for e in (self._refused_by, *self.initial_seeds) if e and e != me.endpoint]
        picked = list(dict.fromkeys([*first, *known[:GOSSIP_FANOUT]]))
        self._begin(me, picked or list(self.initial_seeds))
        self._seed_reported.clear()
        self._ask(self.seeds)

    def _begin(self, me: Peer, seeds: list[str]) -> None:
        self.me = me
        self.membership.upsert(me)
        now = self.clock()
        self._next_period = now + self.period
        self._periods = self.rng.randrange(SYNC_EVERY)  # nodes started together do not sync together
        self.seeds = seeds
        self._synced = False
        self._seed_asked = {s: now for s in seeds}
        self._expected = dict(self._seed_asked)
        self.rumors.add(("m", me.incarnation), me.record(), len(_encode(me.record())))
        if not seeds:
            self._synced = True
            self._joined(now)  # the first node: the mesh is what it knows

    def settled(self, next_period: float) -> None:
        """As after a long quiet run (a simulation's starting point): every member we know has
        spoken to us, nothing is news, and our next period starts at ``next_period``."""
        self._spoke = {p.incarnation for p in self.membership.live_peers()}
        self.rumors = Rumors(mult=RETRANSMIT_MULT)
        self._next_period = next_period

    def _ask(self, endpoints: Iterable[str]) -> None:
        for endpoint in endpoints:
            self.say_hello(endpoint, reply=True, sync=True)

    def _joined(self, now: float) -> None:
        if self.life.joining:
            self._expected.clear()
            self.life.on("joined", now)
            self.membership.touch()  # plans made before joining routed nothing: callers plan again
            self.host.on_joined()

    def check_joined(self, now: float) -> None:
        """Join once we have a whole table and every endpoint we wait for answered or stayed silent for ``join_wait``."""
        if not self.life.joining or not self._synced:
            return
        wait = self.join_wait
        if all(now - asked >= wait for asked in self._expected.values()):
            self._joined(now)

    def join_status(self) -> str:
        """Why this node has not joined yet, naming the seeds that do not answer."""
        if not self.life.joining:
            return ""
        now = self.clock()
        silent = [f"{s} ({now - self._seed_asked.get(s, now):.1f} s)" for s in self.seeds]
        if self.refusals and not self._synced:
            return "refused: " + self.refusals[-1]
        if silent and not self._synced:
            return "no answer from its seeds " + ", ".join(silent) + " (it keeps asking; is a node running there?)"
        return "waiting for the instances of its service to say which partitions they hold"

    def _report_silent_seeds(self, now: float) -> None:
        for seed in self.seeds:
            asked = self._seed_asked.setdefault(seed, now)
            if now - asked < SEED_REPORT_AFTER or now - self._seed_reported.get(seed, -1e9) < SEED_REPORT_EVERY:
                continue
            self._seed_reported[seed] = now
            log.warning("%s: seed %s does not answer (%.1f s without a hello back): is a node running there, and "
                        "can it reach this node at %s? Still asking.", self._name, seed, now - asked,
                        self.me.endpoint if self.me else "?")

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
            services=waiting,
            retired=sorted(m.retired),
            sync=sync,
            version=me.version,
            key=me.own_key,
        )

    def say_hello(self, endpoint: str, reply: bool, receiver: int = 0, sync: bool = False) -> None:
        self._hello_sent[endpoint] = self.clock()
        self.outbox.send(endpoint, wire.encode_control(wire.HELLO, self.incarnation, receiver, self.hello(reply, sync)))

    def _greet_later(self, endpoint: str, sync: bool = False) -> None:
        """Say hello to an endpoint that is not a live member, within the budget of ``NEW_DIALS`` per period."""
        if self._budget > 0:
            self._budget -= 1
            self.say_hello(endpoint, reply=True, sync=sync)
        elif len(self._greet) < 4 * NEW_DIALS:
            self._greet[endpoint] = self._greet.get(endpoint, False) or sync
        # beyond: forgotten (whoever needs us will say hello again)

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
        hb = wire.Heartbeat(leaving=True, holding=self.host.holding)
        for peer in self._partners():
            self.outbox.send(peer.endpoint, wire.encode_control(wire.HEARTBEAT, self.incarnation, peer.incarnation, hb))

    def finish_leave(self) -> None:
        """Say goodbye (after draining) to our partners and a few others, who spread it."""
        bye = wire.Bye()
        told = {p.incarnation: p for p in self._partners()}
        for peer in self._random_members(GOSSIP_FANOUT):
            told.setdefault(peer.incarnation, peer)
        for peer in told.values():
            self.outbox.send(peer.endpoint, wire.encode_control(wire.BYE, self.incarnation, peer.incarnation, bye))
        if self.life.state == "leaving":
            self.life.on("bye", self.clock())

    def _partners(self) -> list[Peer]:
        """Peers that must hear our news directly: the other instances of our service, and those we
        exchange messages with."""
        me = self.me
        if me is None:
            return []
        peers = self.membership.peers
        out = {p.incarnation: p for p in self._own_service()}
        for inc in (*self.outbox.out, *self.outbox.inbound):
            peer = peers.get(inc)
            if peer is not None and peer.live and peer is not me:
                out[inc] = peer
        return list(out.values())

    def _own_service(self) -> list[Peer]:
        me = self.me
        if me is None or me.service is None:
            return []
        name = me.service.name
        return [p for p in self.membership.live_peers() if p.service_name == name and p is not me]

    # -- timers ----------------------------------------------------------------------------------

    @property
    def next_due(self) -> float:
        """When :meth:`tick` next has something to do (the clock's time)."""
        due = min(self._next_period, self.probes.due())
        if len(self.rumors):
            due = min(due, self._next_gossip)
        if self.life.joining and self._synced and self._expected:
            due = min(due, min(self._expected.values()) + self.join_wait)
        return due

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
        for inc in self.probes.expired(now):
            self._suspecting.discard(inc)
            peer = self.membership.expire(inc)
            if peer is not None:
                log.warning("%s: peer %s is dead (no answer, nor a refutation within %.1f s)", self._name, peer.node,
                            self.config.dead_after)
                record = peer.record()
                self._rumor(record)
                # its service's other instances take its partitions: they hear it first, before
                # anything we resend them of what it had not acknowledged (one connection: in order)
                for other in self.membership.instances(peer.service_name or ""):
                    if other is not self.me:
                        self._send(other, wire.NEWS, wire.News([record]))
                self.host.peer_gone(peer)
        if len(self.rumors) and now >= self._next_gossip:
            self._spread()
        if len(self.rumors):
            if self._next_gossip == float("inf") or now >= self._next_gossip:
                self._next_gossip = now + self.period / 4
        else:
            self._next_gossip = float("inf")
        self.check_joined(now)

    def _each_period(self, now: float) -> None:
        self._periods += 1
        self._budget = NEW_DIALS
        while self._greet and self._budget > 0:
            endpoint = next(iter(self._greet))
            self._greet_later(endpoint, self._greet.pop(endpoint))
        if self.seeds:
            self._ask_seeds(now)
        self._knock(now)
        me = self.me
        if me is None:
            return
        for inc in list(self._suspecting):  # until it refutes (after a short partition, say) or dies
            peer = self.membership.peers.get(inc)
            if peer is None or not peer.live or inc not in self.probes.suspicions:
                self._suspecting.discard(inc)
            else:
                self._send(peer, wire.NEWS, wire.News([peer.record("suspect")]))
        target = self.probes.next_target(self._probe_candidates(), self.membership.peers)
        if target is not None:
            self._ping(self.membership.peers[target], self.probes.start(target, now))
        out = self.outbox.out
        asking = None
        for ch in list(out.values()):
            if ch.window.in_flight and ch.peer.live and not ch.closed:
                asking = asking or wire.encode_control(
                    wire.HEARTBEAT, self.incarnation, 0,
                    wire.Heartbeat(leaving=self.life.leaving, ack_please=True, holding=self.host.holding),
                )
                self.outbox.send(ch.peer.endpoint, asking)
        for name in self.membership.retired - self._retired_told:  # an operator's order, given here
            self._retired_told.add(name)
            self._rumor(wire.Retired(name))
        if self._periods % SYNC_EVERY == 0:
            self.membership.forget_dead(now, keep=self.config.forget_dead_after)
            self._spoke &= set(self.membership.peers)
            self.probes.sweep(now)
            partner = self._random_members(1)
            if partner:
                self._send(partner[0], wire.SYNC, wire.Sync(buckets=list(self.membership.buckets),
                                                             system=self._system_digest(), reply=True))
        self._announce_holding()

    def _probe_candidates(self) -> list[int]:
        me = self.incarnation
        return [p.incarnation for p in self.membership.live_peers() if p.incarnation != me]

    def _ask_seeds(self, now: float) -> None:
        # a seed that has not answered yet (its hello or ours was lost, or it starts later): again
        live = {p.endpoint for p in self.membership.live_peers()}
        if self._synced:
            self.seeds = [s for s in self.seeds if s not in live]
        for seed in self.seeds:
            if self.life.joining or now - self._hello_sent.get(seed, -1e9) >= self._knock_every:
                self.say_hello(seed, reply=True, sync=not self._synced)
        if self.life.joining:
            self._report_silent_seeds(now)

    @property
    def _knock_every(self) -> float:
        return max(4 * self.config.heartbeat, 1.0)

    def _knock(self, now: float) -> None:
        """Peers we declared dead may be cut off rather than gone: knock on one (that once spoke to
        us) per period, so that a healed partition reunites the mesh (the side found dead rejoins
        as a new incarnation). Alone, go back to the seeds we were started with."""
        every = self._knock_every
        live = {p.endpoint for p in self.membership.live_peers()}
        oldest: Peer | None = None
        for peer in self.membership.peers.values():
            if peer.state == "dead" and peer.incarnation in self._spoke and peer.endpoint not in live:
                if now - self._hello_sent.get(peer.endpoint, -1e9) >= every and (
                    oldest is None or self._hello_sent.get(peer.endpoint, -1e9) < self._hello_sent.get(oldest.endpoint, -1e9)
                ):
                    oldest = peer
        if oldest is not None:
            self.say_hello(oldest.endpoint, reply=True)
        if len(live) <= 1:
            for seed in self.initial_seeds:
                if now - self._hello_sent.get(seed, -1e9) >= every:
                    self._greet_later(seed, sync=True)

    def _announce_holding(self) -> None:
        """Our partitions, to the other instances of our service: all of them when they changed
        (``HOLDING_REPEATS`` periods in a row, against loss), else those that may have missed them."""
        holding = self.host.holding
        if holding != self._holding_sent:
            self._holding_sent = holding
            self._holding_repeats = HOLDING_REPEATS
        if not self.life.joined or not (self._holding_repeats > 0 or self._holding_owed):
            return
        if self._holding_repeats > 0:
            self._holding_repeats -= 1
            peers = self._own_service()
        else:
            peers = [p for p in self._own_service() if p.incarnation in self._holding_owed]
        self._holding_owed.clear()
        hb = wire.encode_control(wire.HEARTBEAT, self.incarnation, 0,
                                 wire.Heartbeat(leaving=self.life.leaving, holding=holding))
        for peer in peers:
            self.outbox.send(peer.endpoint, hb)

    def forgive(self, gap: float, now: float) -> None:
        """This node was frozen for ``gap`` seconds: its peers' silence meanwhile was its own."""
        log.warning("%s: no tick for %.1f s (this process paused, or its clock jumped): not counting it against "
                    "its peers", self._name, gap)
        self.probes.forgive(gap, now)
        self._next_period = now  # and probe at once: they hear that we are back

    # -- probing ---------------------------------------------------------------------------------

    def _ping(self, peer: Peer, seq: int) -> None:
        source = None if peer.incarnation in self._spoke or self.me is None else self.me.record()
        self._send(peer, wire.PING, wire.Ping(seq, source, self._news()))

    def _probe_indirectly(self, target: int) -> None:
        peer = self.membership.peers.get(target)
        seq = self.probes.seq_of(target)
        if peer is None or seq is None:
            return
        helpers = self._random_members(self.config.indirect_probes, besides=target)
        record = peer.record()
        for helper in helpers:
            self._send(helper, wire.PING_REQ, wire.PingReq(seq, record, self._news()))
        self._ping(peer, seq)  # and directly again (memberlist's fallback ping): one lost frame is not a failure

    def _probe_failed(self, target: int, now: float) -> None:
        peer = self.membership.suspect(target)
        if peer is None:
            return
        log.info("%s: peer %s is suspect (no answer to a probe within %.1f s)", self._name, peer.node,
                 self.config.suspect_after)
        self.probes.suspect(target, now)
        self._suspecting.add(target)
        record = peer.record("suspect")
        self._rumor(record)
        self._send(peer, wire.NEWS, wire.News([record]))  # if it hears this, it refutes at once

    def _random_members(self, k: int, besides: int = 0) -> list[Peer]:
        """``k`` random live members (for news, indirect probes, anti-entropy): among those that
        have spoken to us first, so that names we only heard of (perhaps made up) cost no socket."""
        me = self.incarnation
        spoke = self._spoke
        known, heard_of = [], []
        for p in self.membership.live_peers():
            if p.incarnation not in (me, besides):
                (known if p.incarnation in spoke else heard_of).append(p)
        pool = known or heard_of  # (a node that just started has heard from nobody yet)
        return self.rng.sample(pool, min(k, len(pool)))

    # -- rumors ----------------------------------------------------------------------------------

    def _rumor(self, rumor: wire.Member | wire.Declared | wire.Retired) -> None:
        if isinstance(rumor, wire.Member):
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
        for peer in self._random_members(GOSSIP_FANOUT):
            news = self._news()
            if not news:
                return
            self._send(peer, wire.NEWS, wire.News(news))

    def _hear(self, rumors: list[Any], now: float, sender: Peer | None = None, trusted: bool = True) -> None:
        """Rumors a member passed on; ``trusted``: whether its word about the declared system counts
        (see :meth:`~choreo.runtime.admission.Admission.may_gossip`)."""
        for rumor in rumors:
            if isinstance(rumor, wire.Member):
                if self._learn_member(rumor, now, spread=True) and sender is not None and self.me is not None:
                    self._send(sender, wire.NEWS, wire.News([self.me.record()]))  # our refutation, to who told us
            elif not trusted:
                continue
            elif isinstance(rumor, wire.Declared):
                if self._learn_system([rumor.spec], []):
                    self._rumor(rumor)
            elif self._learn_system([], [rumor.service]):
                self._rumor(rumor)

    def _learn_member(self, record: wire.Member, now: float, spread: bool) -> bool:
        """Apply a member's record; True if it was about us and we refuted it."""
        me = self.me
        if me is None:
            return False
        if record.incarnation == me.incarnation:
            return self._about_me(record)
        update = self.membership.merge(record, now)
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
            self._same_service_changed(peer)
        elif event == "suspected":
            self.probes.suspect(peer.incarnation, now)
        elif event in ("dead", "left"):
            self.probes.forget(peer.incarnation)
            self._suspecting.discard(peer.incarnation)
            self.host.peer_gone(peer)
        else:  # refuted, leaving, or simply newer: no suspicion stands
            self.probes.cleared(peer.incarnation)
            if event == "refuted":
                self._same_service_changed(peer)

    def _same_service_changed(self, peer: Peer) -> None:
        me = self.me
        if me is not None and me.service is not None and peer.service_name == me.service.name:
            self._holding_owed.add(peer.incarnation)  # it may have missed our partitions

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
        return False

    def _ask_spec(self, peer: Peer, now: float) -> None:
        """A member of a service whose declarations we lack: ask it (once per two periods per service)."""
        name = peer.claims or ""
        if now - self._spec_asked.get(name, -1e9) >= 2 * self.period:
            self._spec_asked[name] = now
            self._greet_later(peer.endpoint)

    # -- the declared system ---------------------------------------------------------------------

    def _learn_system(self, services: list[ServiceSpec], retired: list[str]) -> bool:
        """Learn declared services and retirements; True if anything was new."""
        news = False
        for name in retired:
            self._retired_told.add(name)
            if self.membership.retired_by_gossip(name):
                log.info("%s: %s was retired (gossip)", self._name, name)
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

    def _gained(self, peers: list[Peer]) -> None:
        """Members we knew by name only got their declarations: they are instances now."""
        for peer in peers:
            if peer.routable and peer is not self.me:
                self.host.peer_joined(peer)

    def _system_digest(self) -> int:
        m = self.membership
        names = sorted(m.declared) + ["!" + name for name in sorted(m.retired)]
        return int.from_bytes(_digest("\n".join(names).encode()), "little")

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

    def _heard(self, sender: int, now: float) -> Peer | None:
        peer = self.membership.heard(sender, now)
        if peer is not None:
            self._spoke.add(sender)
        return peer

    def _member(self, sender: int, what: str) -> Peer | None:
        """The live member that sent a frame: its word counts (a stranger's is refused and counted)."""
        peer = self._heard(sender, self.clock())
        if peer is None:
            self.host.count_refused("unknown_peer", f"{what} from {sender:016x}, which is not a live member here")
        return peer

    def on_ping(self, sender: int, ping: wire.Ping, *, trusted: bool = True) -> None:
        now = self.clock()
        if ping.source is not None and ping.source.incarnation == sender and sender not in self.membership.peers:
            self._learn_member(ping.source, now, spread=True)  # a newcomer introduces itself
        peer = self._member(sender, "ping")
        if peer is not None:
            self._hear(ping.rumors, now, peer, trusted)
            self._send(peer, wire.PONG, wire.Pong(ping.seq, self._news()))

    def on_ping_req(self, sender: int, req: wire.PingReq, *, trusted: bool = True) -> None:
        now = self.clock()
        requester = self._member(sender, "ping_req")
        if requester is None:
            return
        self._hear(req.rumors, now, requester, trusted)
        if req.target.incarnation == self.incarnation:
            return
        target = self.membership.peers.get(req.target.incarnation)
        if target is None:
            self._learn_member(req.target, now, spread=False)
            target = self.membership.peers.get(req.target.incarnation)
        if target is not None and target.live:
            self._ping(target, self.probes.relay(sender, req.seq, now))

    def on_pong(self, sender: int, pong: wire.Pong, *, trusted: bool = True) -> None:
        now = self.clock()
        peer = self._member(sender, "pong")
        if peer is None:
            return
        self._hear(pong.rumors, now, peer, trusted)
        if self.probes.answered(pong.seq) is not None:
            return
        relay = self.probes.relayed(pong.seq)
        if relay is not None:
            requester = self.membership.peers.get(relay[0])
            if requester is not None and requester.live:
                self._send(requester, wire.PONG, wire.Pong(relay[1], self._news()))

    def on_news(self, sender: int, news: wire.News, *, trusted: bool = True) -> None:
        peer = self._member(sender, "news")
        if peer is not None:
            self._hear(news.rumors, self.clock(), peer, trusted)

    def on_sync(self, sender: int, sync: wire.Sync, *, trusted: bool = True) -> None:
        now = self.clock()
        peer = self._member(sender, "sync")
        if peer is None:
            return
        if trusted:
            self._learn_system(sync.services, sync.retired)
        for record in sync.members:
            self._learn_member(record, now, spread=False)
        if sync.full and self.life.joining and not self._synced:
            self._synced = True
            me = self.me
            if me is not None and me.service is not None:
                self._rumor(wire.Declared(me.service))  # our own word, to whoever lacks it
            self._expected.pop(peer.endpoint, None)
            self.seeds = [s for s in self.seeds if s != peer.endpoint]
            for other in self._own_service():  # which partitions they hold: we may wait for their handovers
                self._expected.setdefault(other.endpoint, now)
                self._greet_later(other.endpoint)
            self.check_joined(now)
        m = self.membership
        if sync.reply:  # its digests: answer with what differs, and ask for its side of it
            mine = m.buckets
            differ = [b for b, digest in enumerate(sync.buckets) if b < len(mine) and mine[b] != digest]
            system = self._system_digest() != sync.system
            if differ or system:
                self._send(peer, wire.SYNC, self._table(differ, system, want=differ))
        elif sync.want:
            self._send(peer, wire.SYNC, self._table(sync.want, bool(sync.services)))

    def _table(self, buckets: list[int] | None, system: bool, want: Iterable[int] = ()) -> wire.Sync:
        """Our records (of ``buckets``; None: all of them), and the declared system if ``system``."""
        m = self.membership
        peers = m.peers.values() if buckets is None else m.in_buckets(buckets)
        return wire.Sync(
            system=self._system_digest(),
            members=[p.record() for p in peers],
            services=list(m.declared.values()) if system else [],
            retired=sorted(m.retired) if system else [],
            want=list(want),
            full=buckets is None,
        )

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
            self.tell_dead(known)  # we had declared it dead or gone: it must come back anew
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
        self._spoke.add(sender)
        peer.holding = hello.holding
        if news and hello.service is not None and trusted:  # a service new to us: the mesh learns it by gossip
            self._rumor(wire.Declared(hello.service))
        self._gained([p for p in self.membership.gained if p is not peer])
        for old in replaced:
            log.info("%s: %s replaced %s at %s", self._name, peer.node, old.node, old.endpoint)
            self.probes.forget(old.incarnation)
            self.host.peer_gone(old)
        if hello.version > peer.version:  # its own newer word: refutes a suspicion we hold
            state = wire.MEMBER_STATES.index("leaving" if hello.leaving else "alive")
            self._learn_member(wire.Member(sender, hello.version, state, hello.endpoint, hello.node,
                                           peer.service_name, hello.window, hello.max_message_bytes), now, spread=True)
        if new:
            log.info("%s: %s joined (%s)", self._name, peer.node, peer.endpoint)
            self.probes.added(sender)
            self._rumor(peer.record())
            self.host.peer_joined(peer)
            self._same_service_changed(peer)
        elif not had_spec and peer.service is not None:
            self.host.peer_joined(peer)
        if hello.leaving:
            self.membership.leaving(sender)
        if trusted:
            self._learn_system(hello.services, hello.retired)
        if hello.reply or new:
            self.say_hello(hello.endpoint, reply=False, receiver=sender)
        if hello.sync:
            self._send(peer, wire.SYNC, self._table(None, True))
        if self.life.joining:
            self._expected.pop(hello.endpoint, None)
            self.check_joined(now)

    def on_heartbeat(self, sender: int, hb: wire.Heartbeat, *, trusted: bool = True) -> None:
        peer = self._heard(sender, self.clock())
        if peer is None:
            return
        peer.holding = hb.holding
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
            log.info("%s: %s left", self._name, peer.node)
            self._rumor(peer.record())
            self.probes.forget(sender)
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
            self._refused_by = peer.endpoint
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
        refuse = wire.Refuse("dead", f"{self._name} declared {peer.node} dead; rejoin as a new incarnation")
        self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, peer.incarnation, refuse))

    def refuse_stale(self, sender: int, receiver: int) -> None:
        """A frame for an incarnation of ours that is over: count it, tell its live sender."""
        self.host.count_refused("stale", f"frame for incarnation {receiver:016x}, this node is {self.incarnation:016x}")
        peer = self.membership.peers.get(sender)
        if peer is not None and peer.live:
            refuse = wire.Refuse("stale", stale=receiver)
            self.outbox.send(peer.endpoint, wire.encode_control(wire.REFUSE, self.incarnation, sender, refuse))

    # -- frames out ------------------------------------------------------------------------------

    def _send(self, peer: Peer, frame_type: int, body: msgspec.Struct) -> None:
        self.outbox.send(peer.endpoint, wire.encode_control(frame_type, self.incarnation, peer.incarnation, body))

    @property
    def _name(self) -> str:
        return self.me.node if self.me is not None else "node"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=4).digest()
