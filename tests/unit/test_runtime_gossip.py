"""The gossip part on its own (choreo.meshsim): joining, probes, suspicion and refutation, death,
leaving, a declared death, refusals, and what strangers cannot make a node do.

No engine and no sockets: each node is a :class:`Gossip` with its membership and outbox, on the
simulation's fake link under its virtual clock; times are in protocol periods.
"""

from __future__ import annotations

from choreo import Command, Event, Service, wire
from choreo.config import NodeConfig
from choreo.errors import ProtocolError
from choreo.meshsim import MeshSim


class Ping(Event, key="k"):
    k: str


class Charge(Command):
    order: str


pings = Service("pings")
pings.on(Ping)(lambda event: None)
payments, billing = Service("payments"), Service("billing")
payments.command(Charge)(lambda cmd: None)
billing.command(Charge)(lambda cmd: None)


def two(seed: int = 1) -> tuple[MeshSim, object, object]:
    sim = MeshSim(seed=seed)
    a = sim.join(pings.spec(), "a", seeds=[])
    b = sim.join(pings.spec(), "b", seeds=[a])
    sim.until(lambda: a.life.joined and b.life.joined and b.state_of(a) == a.state_of(b) == "alive", 10)
    return sim, a, b


def test_a_seed_is_enough_to_join_and_both_sides_see_both_instances() -> None:
    sim, a, b = two()
    assert a.life.state == b.life.state == "joined", "alone and through the seed, both joined"
    for node in (a, b):
        assert sorted(p.node for p in node.membership.instances("pings")) == ["a", "b"]


def test_a_third_node_learns_the_first_from_the_seed_it_joins_through() -> None:
    sim, a, b = two()
    c = sim.join(pings.spec(), "c", seeds=[b])  # knows only b
    sim.until(lambda: c.life.joined and a.state_of(c) == "alive", 10)
    assert c.state_of(a) == "alive", "b's table named a"
    assert sorted(p.node for p in c.membership.instances("pings")) == ["a", "b", "c"]


def test_an_unanswered_probe_makes_a_peer_suspect_and_hearing_of_it_the_peer_refutes() -> None:
    sim, a, b = two()
    sim.partition([a], [b])
    sim.until(lambda: a.state_of(b) == "suspect", 20)
    assert b.state_of(a) in ("alive", "suspect") and not a.gone, "suspect is not dead: nothing moves yet"
    version = b.gossip.me.version
    sim.heal()
    sim.until(lambda: a.state_of(b) == "alive" and b.state_of(a) == "alive", 20)
    assert a.membership.peers[b.incarnation].version > version, "b refuted with a newer version of its record"
    assert not sim.deaths and b.rejoins == 0


def test_a_suspicion_nobody_refutes_ends_in_death_and_the_peer_is_gone() -> None:
    sim, a, b = two()
    sim.crash(b)
    periods = sim.until(lambda: a.state_of(b) == "dead", 40)
    config = sim.config
    assert periods * config.heartbeat >= config.suspect_after + config.dead_after, "never before the suspicion ran out"
    assert [p.node for p in a.gone] == ["b"]
    assert a.membership.instances("pings") == [a.membership.peers[a.incarnation]]


def test_a_peer_declared_dead_hears_so_after_the_heal_and_rejoins_as_a_new_incarnation() -> None:
    sim, a, b = two()
    old = b.incarnation
    sim.partition([a], [b])
    sim.until(lambda: a.state_of(b) == "dead" and b.state_of(a) == "dead", 40)
    sim.heal()
    sim.until(lambda: a.rejoins + b.rejoins >= 1, 20)
    sim.until(lambda: a.life.joined and b.life.joined and a.state_of(b) == b.state_of(a) == "alive", 20)
    assert b.incarnation != old or a.rejoins, "whoever rejoined is a new incarnation, welcomed as a new peer"
    assert len(a.membership.instances("pings")) == 2


def test_a_leaving_peer_gets_no_new_work_then_says_goodbye() -> None:
    sim, a, b = two()
    b.gossip.begin_leave()
    sim.run(0.1)
    assert a.state_of(b) == "leaving" and [p.node for p in a.membership.instances("pings")] == ["a"]
    assert b.life.state == "leaving"
    b.gossip.finish_leave()
    sim.run(0.1)
    assert a.state_of(b) == "left" and [p.node for p in a.gone] == ["b"] and b.life.state == "left"


def test_everyone_hears_of_a_leave_though_the_leaver_told_only_a_few() -> None:
    sim = MeshSim(seed=3)
    nodes = sim.bootstrap(30)
    leaver = nodes[7]
    sim.leave(leaver)
    sim.until(lambda: sim.everyone_sees(leaver, "left"), 20)
    assert not sim.deaths, "a goodbye is not a death"


def test_a_second_owner_of_a_command_is_refused_and_the_refused_node_stops() -> None:
    sim = MeshSim(seed=1)
    a = sim.join(payments.spec(), "a", seeds=[])
    b = sim.join(billing.spec(), "b", seeds=[a])
    sim.until(lambda: b.life.state == "refused", 10)
    assert a.refused["conflict"] == 1 and a.state_of(b) is None
    assert "two owners" in str(b.life.fatal)


def test_a_hello_that_lies_about_its_incarnation_is_refused() -> None:
    sim, a, b = two()
    hello = wire.Hello("x", 5, "inproc://x", None, 10, 10)
    try:
        a.gossip.on_hello(6, hello)
    except ProtocolError as exc:
        assert exc.reason == "malformed"
    else:  # pragma: no cover
        raise AssertionError("a hello whose incarnation differs from its header must be refused")


def test_a_stranger_cannot_tell_a_node_about_the_mesh() -> None:
    sim, a, b = two()
    fake = wire.Member(99, 0, wire.MEMBER_STATES.index("dead"), "inproc://x", "x")
    news = wire.encode_control(wire.NEWS, 1234, a.incarnation, wire.News([b.gossip.me.record(), fake]))
    a.receive(news)
    sync = wire.encode_control(wire.SYNC, 1234, a.incarnation, wire.Sync(members=[fake], full=True))
    a.receive(sync)
    assert a.refused["unknown_peer"] == 2 and 99 not in a.membership.peers


def test_a_table_naming_thousands_of_strangers_opens_no_socket_to_most_of_them() -> None:
    # a member (a bug, or a stolen key) lists 5,000 nodes that do not exist: the node probes them
    # one per period like any member, finds them dead, and never greets or knocks on them
    sim = MeshSim(seed=5, config=NodeConfig(indirect_probes=3))
    a = sim.join(None, "a", seeds=[])
    b = sim.join(None, "b", seeds=[a])
    sim.until(lambda: a.life.joined and b.life.joined, 10)
    sent: list[tuple[str, int]] = []
    send = a.send

    def recording(endpoint: str, frame: bytes) -> None:
        sent.append((endpoint, frame[5]))
        send(endpoint, frame)

    a.send = recording  # type: ignore[method-assign]
    a.outbox.sender = a
    fakes = [wire.Member(1000 + i, 0, 0, f"tcp://10.9.{i // 250}.{i % 250 + 1}:7000", f"fake{i}") for i in range(5000)]
    a.receive(wire.encode_control(wire.SYNC, b.incarnation, a.incarnation, wire.Sync(members=fakes)))
    assert a.membership.live_count == 5002, "they are members now, by b's word"
    periods = 20
    sim.run(periods * sim.config.heartbeat)
    strangers = {endpoint for endpoint, _ in sent if "10.9." in endpoint}
    # a probe per period, and the news that a probed one is suspect to that one; news, indirect
    # probes and anti-entropy go to members that spoke to us: nowhere near 5,000
    assert len(strangers) <= 2 * periods, len(strangers)
    assert not [e for e, kind in sent if kind == wire.HELLO and "10.9." in e], "no greeting, no knocking on strangers"
    assert sum(p.state == "dead" for p in a.membership.peers.values()) > 0, "those probed were found dead"


def test_a_hello_listing_thousands_of_peers_makes_a_node_contact_none_of_them() -> None:
    # peers are learned from tables and rumors of members, never from the list a hello carries
    # (older nodes sent one): a newcomer's hello naming 5,000 endpoints dials none of them
    import msgspec

    sim, a, b = two()
    sent: list[str] = []
    send = a.send

    def recording(endpoint: str, frame: bytes) -> None:
        sent.append(endpoint)
        send(endpoint, frame)

    a.send = recording  # type: ignore[method-assign]
    a.outbox.sender = a
    listed = [[f"tcp://10.9.{i // 250}.{i % 250 + 1}:7000", 1000 + i, None] for i in range(5000)]
    hello = {"node": "x", "incarnation": 777, "endpoint": "inproc://sim/x", "service": None, "window": 10,
             "max_message_bytes": 10, "reply": True, "peers": listed}
    a.receive(wire.frame(wire.HELLO, 777, 0, msgspec.msgpack.encode(hello)))
    sim.run(10 * sim.config.heartbeat)
    assert a.state_of(b) == "alive" and 777 in a.membership.peers, "the newcomer is a member; the list is ignored"
    assert not [e for e in sent if "10.9." in e]


def test_a_node_that_re_incarnates_still_knows_whom_it_found_dead() -> None:
    """Its next incarnation learns the live members again, but an incarnation the last one knew
    dead (or gone) stays dead: gossip that has not caught up yet does not bring it back as a
    member to send to (it would handle what the live owner already did)."""
    from choreo.runtime.membership import Membership

    alive, dead = wire.MEMBER_STATES.index("alive"), wire.MEMBER_STATES.index("dead")
    members = Membership()
    for inc in (11, 12, 13):
        assert members.merge(wire.Member(inc, 1, alive, f"inproc://m{inc}", f"m{inc}"), 0.0) is not None
    members.suspect(12)
    members.expire(12)  # its suspicion ran out: dead
    assert members.merge(wire.Member(13, 2, wire.MEMBER_STATES.index("left"), "inproc://m13", "m13"), 1.0) is not None
    members.clear()  # this node was declared dead and re-incarnates
    assert members.live_count == 0 and not list(members.live_peers())
    assert members.merge(wire.Member(12, 1, alive, "inproc://m12", "m12"), 2.0) is None, "still dead"
    assert members.merge(wire.Member(13, 1, alive, "inproc://m13", "m13"), 2.0) is None, "still gone"
    update = members.merge(wire.Member(11, 1, alive, "inproc://m11", "m11"), 2.0)
    assert update is not None and update.peer.live, "a live member is learned again"
    assert [p.incarnation for p in members.live_peers()] == [11]


def test_news_of_a_former_life_at_a_nodes_endpoint_does_not_replace_it() -> None:
    """A node restarted at the same endpoint hears, from a member that has not found it dead yet,
    of its previous incarnation, alive. That is a former life, not a newer node there: the node
    stays itself, keeps the old one as dead and tells the mesh so (taking the news for a newer
    incarnation, it declared itself dead and rejoined, voiding its hand-overs: durable seed 3245)."""
    sim, a, b = two()
    former = wire.Member(4242, 3, wire.MEMBER_STATES.index("alive"), a.gossip.me.endpoint, "a")
    a.receive(wire.encode_control(wire.NEWS, b.incarnation, a.incarnation, wire.News([former])))
    assert a.state_of(a) == "alive" and a.rejoins == 0, "still itself"
    assert a.membership.peers[4242].state == "dead"
    sim.until(lambda: 4242 in b.membership.peers and b.membership.peers[4242].state == "dead", 10)
    assert b.state_of(a) == "alive", "the mesh keeps the node that lives there"


def test_alone_a_node_believes_a_member_new_to_it_that_says_it_was_declared_dead() -> None:
    """After a long partition the other side rejoined under incarnations this node never met, and
    refuses its knocks as a dead member's. With a live peer, a stranger's word that it is dead does
    not count; alone, it is the only word there is: the node rejoins (it knocked on for ever
    instead, a mesh split for good: nemesis seed 3109, 100 s)."""
    sim, a, b = two()

    def told_dead() -> bytes:
        return wire.encode_control(wire.REFUSE, 777, a.incarnation, wire.Refuse("dead", "m#777 declared a dead"))

    a.receive(told_dead())
    assert a.rejoins == 0, "with a live peer, a stranger cannot make it start a new life"
    sim.crash(b)
    sim.until(lambda: a.state_of(b) == "dead", 40)
    old = a.incarnation
    a.receive(told_dead())
    assert a.rejoins == 1 and a.incarnation != old, "alone, it rejoins"


def test_a_stale_refusal_is_logged_as_what_it_means() -> None:
    """A peer that restarted refuses frames for its former incarnation; no detail travels with that
    refusal, so the node's log said only ``refused (refused_by_peer): stale:``. The line (the
    detail the node counts and logs) now says who refused, that the incarnation written to is
    over, and what the node does about it."""
    sim, a, b = two()
    said: list[str] = []
    count_refused = a.count_refused
    a.count_refused = lambda reason, detail: (said.append(f"{reason}: {detail}"), count_refused(reason, detail))
    a.receive(wire.encode_control(wire.REFUSE, b.incarnation, a.incarnation, wire.Refuse("stale", stale=0x1234)))
    assert said == [f"refused_by_peer: stale: {b.name} says the incarnation 0000000000001234 this node wrote to "
                    "is over (it restarted or rejoined); asking who is at its endpoint now"], said


def test_a_member_that_missed_a_refutation_hears_it_from_the_suspect_before_the_suspicion_runs_out() -> None:
    """b's probes of s fail (cut both ways) and a hears of the suspicion by gossip; s hears of it
    too and refutes, but its refutation reaches nobody (s cannot send to a either) and its rumor
    runs out. The links come back well within ``dead_after``: whoever still holds the old
    suspicion tells s so, and s answers a suspicion older than its record with that record
    (it would otherwise ignore it, as it refuted it already). Before, a member that never heard
    the refutation declared s dead when its timer ran out, and everyone followed, s too, while
    it ran all along (the 100 s schedules, durable with standbys, seed 7121)."""
    sim = MeshSim(seed=3)
    a = sim.join(pings.spec(), "a", seeds=[])
    b = sim.join(pings.spec(), "b", seeds=[a])
    s = sim.join(pings.spec(), "s", seeds=[a])
    sim.until(lambda: all(x.life.joined for x in (a, b, s)) and sim.everyone_sees(s, "alive"), 20)
    version = s.gossip.me.version
    sim.cut |= {(b.endpoint, s.endpoint), (s.endpoint, b.endpoint), (s.endpoint, a.endpoint)}
    sim.until(lambda: a.state_of(s) == "suspect" and b.state_of(s) == "suspect" and s.gossip.me.version > version, 40)
    config = sim.config
    sim.run(config.dead_after / 3)  # its refutation's rumor runs out meanwhile, delivered to nobody
    sim.heal()
    sim.run(config.dead_after + config.suspect_after)
    assert not sim.deaths and s.rejoins == 0, f"s ran all along and was declared dead: {sim.deaths}"
    assert a.state_of(s) == b.state_of(s) == "alive"
