"""Two gossip parts over an in-memory pair: join, suspect, dead, leave, and a declared death.

No engine and no sockets: each side is a :class:`Gossip` with its own membership and outbox;
frames go straight from one side's outbox into the other side's handlers, under a clock the
test moves. What the node would do about a change is recorded by a stub host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from choreo import Event, Service, wire
from choreo.config import NodeConfig
from choreo.errors import ProtocolError
from choreo.runtime.gossip import Gossip
from choreo.runtime.holds import Holds
from choreo.runtime.lifecycle import Lifecycle
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.outbox import Outbox
from choreo.runtime.stats import Counters


class Ping(Event, key="k"):
    k: str


pings = Service("pings")


@pings.on(Ping)
def on_ping(event: Ping) -> None: ...


@dataclass
class Host:
    holding: bytes = b""
    joined: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    joined_mesh: int = 0

    def peer_joined(self, peer: Peer) -> None:
        self.joined.append(peer.node)

    def peer_gone(self, peer: Peer) -> None:
        self.gone.append(peer.node)

    def on_joined(self) -> None:
        self.joined_mesh += 1

    def declared_dead(self, reason: str) -> None:
        self.dead.append(reason)

    def service_retired(self, service: str) -> None:
        self.retired.append(service)

    def count_refused(self, reason: str, detail: str) -> None:
        self.refused.append(reason)


class Pair:
    """Two gossip parts whose frames reach each other unless the link is cut."""

    def __init__(self) -> None:
        self.now = 0.0
        self.config = NodeConfig()
        self.cut = False
        self.sides: dict[str, Side] = {}

    def clock(self) -> float:
        return self.now

    def add(self, name: str, incarnation: int, service: Service | None = pings) -> Side:
        side = Side(self, name, incarnation, service)
        self.sides[side.endpoint] = side
        return side

    def deliver(self, src: str, dst: str, frame: bytes) -> None:
        side = self.sides.get(dst)
        if side is None or self.cut or src == dst:
            return
        side.inbox.append(frame)

    def pump(self) -> None:
        """Deliver every frame in flight (and what the answers send), until none is left."""
        for _ in range(100):
            busy = False
            for side in self.sides.values():
                while side.inbox:
                    busy = True
                    side.receive(side.inbox.pop(0))
            if not busy:
                return
        raise AssertionError("gossip did not settle")

    def advance(self, seconds: float, step: float = 0.1) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for side in self.sides.values():
                side.gossip.tick(self.now)
            self.pump()


class Side:
    def __init__(self, pair: Pair, name: str, incarnation: int, service: Service | None) -> None:
        self.pair = pair
        self.endpoint = f"inproc://fake/{name}"
        self.inbox: list[bytes] = []
        self.host = Host()
        self.membership = Membership(pair.config.suspect_after, pair.config.dead_after)
        self.outbox = Outbox(self, pair.config, clock=pair.clock, holds=Holds(), counters=Counters())
        self.outbox.start(None, incarnation)
        self.life = Lifecycle()
        self.gossip = Gossip(self.membership, self.outbox, self, self.life, self.host, config=pair.config, clock=pair.clock)
        self.me = Peer(incarnation, self.endpoint, name, service.spec() if service else None, 4096, 1 << 20, 0.0)

    # the transport, as gossip and the outbox see it
    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...

    def send(self, endpoint: str, frame: bytes) -> None:
        self.pair.deliver(self.endpoint, endpoint, frame)

    def receive(self, frame: bytes) -> None:
        frame_type, _, sender, receiver = wire.parse_header(frame)
        g = self.gossip
        if receiver and receiver != g.incarnation:
            g.refuse_stale(sender, receiver)
            return
        known = self.membership.peers.get(sender)
        if known is not None and known.state == "dead" and frame_type != wire.REFUSE:
            g.tell_dead(known)
            return
        body = wire.decode_control(frame_type, frame) if frame_type != wire.BYE else None
        {wire.HELLO: g.on_hello, wire.HEARTBEAT: g.on_heartbeat, wire.REFUSE: g.on_refuse}.get(
            frame_type, lambda s, b: g.on_bye(s)
        )(sender, body)

    def state_of(self, other: Side) -> str | None:
        peer = self.membership.peers.get(other.me.incarnation)
        return peer.state if peer is not None else None


def joined_pair() -> tuple[Pair, Side, Side]:
    pair = Pair()
    a, b = pair.add("a", 11), pair.add("b", 22)
    a.gossip.start(a.me, [])
    b.gossip.start(b.me, [a.endpoint])
    pair.pump()
    return pair, a, b


def test_a_seed_is_enough_to_join_and_both_sides_join() -> None:
    pair, a, b = joined_pair()
    assert a.life.state == b.life.state == "joined", "alone and through the seed, both joined"
    assert a.state_of(b) == b.state_of(a) == "alive"
    assert a.host.joined == ["b"] and b.host.joined == ["a"]
    assert b.host.joined_mesh == 1
    assert [p.node for p in a.membership.instances("pings")] == ["a", "b"]


def test_a_third_node_learns_the_first_through_gossip_from_the_second() -> None:
    pair, a, b = joined_pair()
    c = pair.add("c", 33)
    c.gossip.start(c.me, [b.endpoint])  # only knows b
    pair.pump()
    pair.advance(1.0)
    assert c.state_of(a) == "alive" and a.state_of(c) == "alive"
    assert c.life.state == "joined"


def test_silence_makes_a_peer_suspect_then_dead_and_a_word_makes_it_alive_again() -> None:
    pair, a, b = joined_pair()
    pair.cut = True
    pair.advance(pair.config.suspect_after + 0.2)
    assert a.state_of(b) == "suspect" and not a.host.gone
    pair.cut = False
    pair.advance(0.6)
    assert a.state_of(b) == "alive", "a heartbeat brings a suspect back"
    pair.cut = True
    pair.advance(pair.config.dead_after + 0.2)
    assert a.state_of(b) == "dead" and a.host.gone == ["b"]


def test_a_peer_declared_dead_is_told_so_and_rejoins_as_a_new_incarnation() -> None:
    pair, a, b = joined_pair()
    pair.cut = True
    pair.advance(pair.config.dead_after + 0.2)
    assert a.state_of(b) == "dead" and b.state_of(a) == "dead"
    pair.cut = False
    pair.advance(2.0)
    assert b.host.dead or a.host.dead, "the first to speak after the heal is told it was declared dead"
    side = b if b.host.dead else a
    assert "declared us dead" in side.host.dead[0]
    # the node comes back as a new incarnation and is welcomed as a new peer
    other = a if side is b else b
    side.membership.clear()
    side.life.on("declared_dead", pair.now)
    side.me = Peer(99, side.endpoint, side.me.node + "'", side.me.service, 4096, 1 << 20, pair.now)
    side.outbox.incarnation = 99
    side.gossip.rejoin(side.me, [other.endpoint])
    pair.pump()
    pair.advance(1.0)
    assert other.membership.peers[99].state == "alive" and side.life.state == "joined"


def test_a_leaving_peer_gets_no_new_work_then_says_goodbye() -> None:
    pair, a, b = joined_pair()
    b.gossip.begin_leave()
    pair.pump()
    assert a.state_of(b) == "leaving" and [p.node for p in a.membership.instances("pings")] == ["a"]
    assert b.life.state == "leaving"
    b.gossip.finish_leave()
    pair.pump()
    assert a.state_of(b) == "left" and a.host.gone == ["b"] and b.life.state == "left"


def test_a_second_owner_of_a_command_is_refused_and_the_refused_node_stops() -> None:
    from choreo import Command

    class Charge(Command):
        order: str

    payments, billing = Service("payments"), Service("billing")
    payments.command(Charge)(lambda cmd: None)
    billing.command(Charge)(lambda cmd: None)
    pair = Pair()
    a, b = pair.add("a", 11, payments), pair.add("b", 22, billing)
    a.gossip.start(a.me, [])
    b.gossip.start(b.me, [a.endpoint])
    pair.pump()
    assert a.host.refused == ["conflict"] and a.state_of(b) is None
    assert b.life.state == "refused" and "two owners" in str(b.life.fatal)


def test_a_hello_that_lies_about_its_incarnation_is_refused() -> None:
    pair, a, b = joined_pair()
    hello = wire.Hello("x", 5, "fake://x", None, 10, 10)
    try:
        a.gossip.on_hello(6, hello)
    except ProtocolError as exc:
        assert exc.reason == "malformed"
    else:  # pragma: no cover
        raise AssertionError("a hello whose incarnation differs from its header must be refused")
