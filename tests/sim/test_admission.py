"""What a stranger, or a member out of its lane, cannot do: the attacks of issue 17, on the fake link.

Every test runs a small mesh on the fake link and injects frames from a connection of its own
(``Harness.inject``): forged control frames that speak for somebody else, envelopes a key may not
send, a hand-over from outside the service, a replay flag from the wire, an out-of-range
partition. Each is refused and counted, and the mesh goes on as if nothing happened. With a
policy, the link behaves as a mesh with keys (every frame's principal is its sender's key).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import pytest

from choreo import Command, Event, NodeConfig, NotAllowed, Query, Service, core, wire
from choreo.runtime.admission import STRANGER_FRAMES, Admission
from choreo.testing import Harness
from choreo.trust import Permissions, Policy

CONFIG = NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25)
STRANGER = "inproc://fake/mallory"


class PlaceOrder(Command, key="order"):
    order: str


class CreateOrder(Command, key="order"):
    order: str


class OrderCreated(Event, key="order"):
    order: str


class Reading(Event, key="sensor"):
    sensor: str
    n: int


class GetCount(Query):
    order: str


def shop(created: list[str]) -> tuple[Service, Service]:
    api = Service("api")
    orders = Service("orders")

    @api.command(PlaceOrder, sends=[CreateOrder])
    def place(cmd: PlaceOrder, ctx) -> str:  # type: ignore[no-untyped-def]
        ctx.send(CreateOrder(cmd.order))
        return cmd.order

    @orders.command(CreateOrder, emits=[OrderCreated])
    def create(cmd: CreateOrder, ctx) -> str:  # type: ignore[no-untyped-def]
        created.append(cmd.order)
        return cmd.order

    @orders.query(GetCount)
    def count(q: GetCount) -> int:
        return len(created)

    return api, orders


def shop_mesh(seed: int, created: list[str]) -> tuple[Harness, Any, Any]:
    """A client, an api node and an orders node on the fake link: (harness, client, orders node)."""
    api, orders = shop(created)
    h = Harness(seed=seed, config=CONFIG)
    client = h.add(None)
    h.add(api)
    return h, client, h.add(orders)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def frame_from(sender: int, receiver: int, frame_type: int, body: msgspec.Struct | bytes = b"") -> bytes:
    if isinstance(body, bytes):
        return wire.frame(frame_type, sender, receiver, body)
    return wire.encode_control(frame_type, sender, receiver, body)


def envelope(type_name: str, kind: int, payload: bytes, seq: int, partition: int = 0, flags: int = 0) -> bytes:
    return core.pack_envelope(seq, kind, flags, type_name.encode(), b"o-1", partition, os.urandom(16), os.urandom(16),
                              bytes(16), payload)


def test_forged_control_frames_for_another_node_are_refused() -> None:
    created: list[str] = []
    h, client, owner = shop_mesh(1, created)
    victim_of = owner.incarnation

    async def scenario() -> None:
        await h.start()
        before = client.counters.refused.copy()
        # a BYE, a heartbeat saying "leaving", and an ACK, all under the orders node's incarnation
        h.inject(STRANGER, client, frame_from(victim_of, 0, wire.BYE, wire.Bye()))
        h.inject(STRANGER, client, frame_from(victim_of, 0, wire.HEARTBEAT, wire.Heartbeat(leaving=True)))
        h.inject(STRANGER, client, frame_from(victim_of, client.incarnation, wire.ACK, core.encode_ack(99, 99, [])))
        await h.advance(1.0)
        assert client.counters.refused["impersonation"] - before["impersonation"] == 3
        peer = client.membership.peers[victim_of]
        assert peer.state == "alive", "the mesh keeps the node a stranger said goodbye for"
        assert await h.run(client.send(PlaceOrder("o-1"))) == "o-1"

    run(scenario)
    assert created == ["o-1"]


def test_a_members_frame_on_a_connection_without_its_routing_id_never_binds_it() -> None:
    # a node's connections carry the routing id its transport chose; ZeroMQ makes one up (a zero
    # byte first) for a socket that named none, and for a connection that a reconnection took
    # over. Such a frame, taken as a member's first, used to bind the member to that connection:
    # every later frame on its real one was refused as an impersonation, and its commands hung
    created: list[str] = []
    h, client, owner = shop_mesh(3, created)

    async def scenario() -> None:
        await h.start()
        peer = client.membership.peers[owner.incarnation]
        peer.identity = None  # as for a member the client only heard of by gossip: its next frame binds it
        before = client.counters.refused.copy()
        h.inject("\x00renamed", client, frame_from(owner.incarnation, 0, wire.HEARTBEAT, wire.Heartbeat()))
        await h.advance(0.5)
        assert await h.run(client.send(PlaceOrder("o-1")), timeout=10) == "o-1"
        assert client.counters.refused["impersonation"] == before["impersonation"]
        assert client.counters.refused["replaced_connection"] - before["replaced_connection"] == 1
        assert peer.identity == owner.transport.endpoint.encode(), "bound to the connection the node dialled"

    run(scenario)
    assert created == ["o-1"]


def test_a_strangers_refusal_never_stops_a_node() -> None:
    h = Harness(seed=2, config=CONFIG)
    client = h.add(None)
    h.add(shop([])[1])

    async def scenario() -> None:
        await h.start()
        conflict = wire.Refuse("conflict", "command CreateOrder has two owners: orders, evil")
        h.inject(STRANGER, client, frame_from(0x1234_5679, client.incarnation, wire.REFUSE, conflict))
        h.inject(STRANGER, client, frame_from(0x1234_5679, client.incarnation, wire.REFUSE, wire.Refuse("dead")))
        await h.advance(1.0)
        assert client.state == "joined" and client.fatal is None
        assert client.counters.reincarnations == 0, "only a node we know can declare us dead"

    run(scenario)


def test_only_the_service_a_command_went_to_answers_it() -> None:
    # a member of another service (here the api node) that knows a pending command's id (an
    # idempotent command's is computable from its fields) answers it first, on its own connection
    created: list[str] = []
    h, client, owner = shop_mesh(4, created)
    api = next(e for e in h.engines.values() if e.service is not None and e.service.name == "api")

    async def scenario() -> None:
        await h.start()
        before = client.counters.refused["not_allowed"]
        pending = asyncio.ensure_future(client.send(CreateOrder("o-1")))
        await asyncio.sleep(0)  # written to the link; its answer is two hops away, the forgery one
        (msg_id,) = client.calls.pending
        forged = wire.reply_entry(msg_id, b"CreateOrder", b"\x01" + msgspec.msgpack.encode("forged"))
        h.inject(api.transport.endpoint, client, frame_from(api.incarnation, client.incarnation, wire.REPLY, forged))
        assert await h.run(pending) == "o-1", "the caller got the owner's answer, not the forgery"
        assert client.counters.refused["not_allowed"] - before == 1

    run(scenario)
    assert created == ["o-1"]


def test_a_hand_over_comes_only_from_an_instance_of_the_service() -> None:
    created: list[str] = []
    api, orders = shop(created)
    h = Harness(seed=3, config=CONFIG)
    client = h.add(None)
    owner = h.add(orders)

    async def scenario() -> None:
        await h.start()
        # the client plants a "hand-over" of partition 0 (dedup ids and cached results) on its own channel
        planted = msgspec.msgpack.encode({"dedup": {}, "results": [[os.urandom(16), 0.0, 300.0, b"\x01\xa2ok"]], "now": 0.0})
        mallory = client  # a member out of its lane: a client's channel, a hand-over's kind
        ch = mallory.outbox.channel(mallory.membership.peers[owner.incarnation])
        ch.push(_outgoing(wire.KIND_HANDOVER, b"choreo.handover", 0, planted), h.now)
        mallory.outbox.dirty_out[ch] = None
        mallory.outbox.flush()
        await h.advance(1.0)
        assert owner.counters.refused["not_allowed"] == 1
        assert not owner.dispatcher.results, "nothing planted"
        assert await h.run(client.send(CreateOrder("o-2"))) == "o-2"

    run(scenario)
    assert created == ["o-2"]


def _outgoing(kind: int, type_name: bytes, partition: int, payload: bytes):  # type: ignore[no-untyped-def]
    from choreo.runtime.channels import Outgoing

    return Outgoing(kind, 0, type_name, b"", partition, os.urandom(16), bytes(16), bytes(16), payload, None)


def test_a_replay_flag_from_the_wire_and_an_impossible_partition_are_refused() -> None:
    created: list[str] = []
    api, orders = shop(created)
    h = Harness(seed=4, config=CONFIG)
    client = h.add(None)
    owner = h.add(orders)

    async def scenario() -> None:
        await h.start()
        ch = client.outbox.channel(client.membership.peers[owner.incarnation])
        body = msgspec.msgpack.encode({"order": "o-1"})
        replayed = _outgoing(wire.KIND_COMMAND, b"CreateOrder", 3, body)
        replayed.flags = wire.FLAG_REPLAY
        ch.push(replayed, h.now)
        ch.push(_outgoing(wire.KIND_COMMAND, b"CreateOrder", 60_000, body), h.now)
        client.outbox.dirty_out[ch] = None
        client.outbox.flush()
        await h.run_until(lambda: ch.idle, 10, "both acknowledged: refused, not wedged")
        assert owner.counters.refused["malformed"] == 2
        assert await h.run(client.send(CreateOrder("o-3"))) == "o-3", "the channel still works"

    run(scenario)
    assert created == ["o-3"]


POLICY = Policy(
    {
        "api-1": Permissions.of(serves=["api"]),
        "orders-1": Permissions.of(serves=["orders"]),
        "mobile": Permissions.of(originates=["PlaceOrder"]),
        "ops": Permissions.of(admin=["*"]),
    }
)


def keyed_shop_mesh(seed: int, created: list[str]) -> tuple[Harness, Any, Any, Any]:
    """The shop with keys: a client (``mobile``), an api node (``api-1``) and an orders node
    (``orders-1``) on the fake link: (harness, client, api node, orders node)."""
    api, orders = shop(created)
    h = Harness(seed=seed, config=CONFIG, policy=POLICY)
    return h, h.add(None, key="mobile"), h.add(api, key="api-1"), h.add(orders, key="orders-1")


def test_with_keys_a_client_may_originate_only_its_entry_points() -> None:
    created: list[str] = []
    h, mobile, _, owner = keyed_shop_mesh(5, created)

    async def scenario() -> None:
        await h.start()
        assert await h.run(mobile.send(PlaceOrder("o-4"))) == "o-4", "its entry point goes through"
        with pytest.raises(NotAllowed, match=r"key 'mobile' may not originate CreateOrder \(it originates: PlaceOrder\)"):
            await h.run(mobile.send(CreateOrder("o-5")))  # skipping the api's checks
        assert owner.counters.refused["not_allowed"] == 1

    run(scenario)
    assert created == ["o-4"]


def test_with_keys_a_node_serves_only_what_its_key_may_serve() -> None:
    created: list[str] = []
    api, orders = shop(created)
    h = Harness(seed=6, config=CONFIG, policy=POLICY)
    mobile = h.add(None, key="mobile")
    h.add(orders, key="orders-1")

    async def scenario() -> None:
        await h.start()
        impostor = h.join(orders, key="api-1")  # a key that may serve api claims to be an instance of orders
        await h.advance(2.0)
        assert impostor.incarnation not in mobile.membership.peers, "its hello is refused everywhere"
        assert len(mobile.membership.instances("orders")) == 1, "the real instance keeps every partition"
        assert mobile.counters.refused["not_allowed"] >= 1
        assert impostor.state == "joining", "nobody answers it: it never routes, never owns a partition"

    run(scenario)


def test_with_keys_one_key_cannot_fill_the_membership_table() -> None:
    # a stolen client key joins again and again, each time under a new endpoint and incarnation
    created: list[str] = []
    api, orders = shop(created)
    h = Harness(seed=8, config=NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25, max_members_per_key=3),
                policy=POLICY)
    mobile = h.add(None, key="mobile")
    h.add(api, key="api-1")
    owner = h.add(orders, key="orders-1")

    async def scenario() -> None:
        await h.start()
        before = owner.counters.refused["not_allowed"]
        for i in range(5):
            inc = 0x7000_0000 + i
            hello = wire.Hello(f"phone-{i}", inc, f"inproc://fake/phone-{i}", None, 64, 1 << 20)
            h.inject(f"inproc://fake/phone-{i}", owner, frame_from(inc, 0, wire.HELLO, hello), key="mobile")
        await h.advance(0.5)
        under_key = [p for p in owner.membership.peers.values() if p.live and p.principal == "mobile"]
        assert len(under_key) == 3, "the real client and two of the five: the key's limit"
        assert owner.counters.refused["not_allowed"] - before == 3
        assert await h.run(mobile.send(PlaceOrder("o-6"))) == "o-6", "the key's first member is served as before"

    run(scenario)
    assert created == ["o-6"]


def test_with_keys_system_queries_need_the_admin_right() -> None:
    h = Harness(seed=7, config=CONFIG, policy=POLICY)
    owner = h.add(shop([])[1], key="orders-1")
    answers: list[wire.RpcReply] = []

    async def scenario() -> None:
        await h.start()
        for key, src in (("mobile", "inproc://fake/phone"), ("ops", "inproc://fake/ops-console")):
            h.inject(src, owner, frame_from(7, 0, wire.RPC, wire.Rpc(1, "dlq.list")), key=key)
        await h.advance(0.5)

    orig = h.engines[owner.transport.endpoint].transport.reply  # what the node answers, on the connection asked

    def capture(identity: bytes, frame: bytes) -> None:
        answers.append(wire.decode_control(wire.RPC_REPLY, frame))
        orig(identity, frame)

    owner.transport.reply = capture  # type: ignore[method-assign]
    run(scenario)
    refused, allowed = answers
    assert not refused.ok and "key 'mobile' may not call dlq.list" in refused.error
    assert allowed.ok and allowed.result == []


def test_with_keys_a_client_speaks_of_no_member_but_itself() -> None:
    # a stolen client key joins as a member, then tells the mesh that the orders node is dead (at a
    # version above its own) and that another incarnation now holds the orders node's endpoint
    created: list[str] = []
    h, mobile, front, owner = keyed_shop_mesh(9, created)

    async def scenario() -> None:
        await h.start()
        me = owner.gossip.me.record()
        dead = msgspec.structs.replace(me, version=me.version + 100, state=wire.MEMBER_STATES.index("dead"))
        ghost = wire.Member(0x7300_0000, 1, wire.MEMBER_STATES.index("alive"), me.endpoint, "ghost", "orders",
                            64, 1 << 20)
        inc = 0x7200_0000
        hello = wire.Hello("phone", inc, "inproc://fake/phone", None, 64, 1 << 20)
        for victim in (front, owner):
            h.inject("inproc://fake/phone", victim, frame_from(inc, 0, wire.HELLO, hello), key="mobile")
        await h.advance(0.2)
        for victim in (front, owner):
            for frame_type, body in ((wire.NEWS, wire.News([dead, ghost])),
                                     (wire.SYNC, wire.Sync(members=[dead, ghost]))):
                h.inject("inproc://fake/phone", victim, frame_from(inc, victim.incarnation, frame_type, body),
                         key="mobile")
        await h.advance(2.0)
        assert owner.incarnation == me.incarnation, "the orders node was made to start a new life"
        assert front.membership.peers[me.incarnation].live
        assert all(ghost.incarnation not in n.membership.peers for n in (front, owner, mobile))
        assert await h.run(mobile.send(PlaceOrder("o-7"))) == "o-7"

    run(scenario)
    assert created == ["o-7"]


def _introduce(h: Harness, victim: Any, members: list[wire.Member], phone: int = 0x7500_0000) -> None:
    """A stolen client key joins ``victim`` as a phone, then introduces ``members`` to it."""
    hello = wire.Hello("phone", phone, "inproc://fake/phone", None, 64, 1 << 20)
    h.inject("inproc://fake/phone", victim, frame_from(phone, 0, wire.HELLO, hello), key="mobile")
    h.inject("inproc://fake/phone", victim, frame_from(phone, victim.incarnation, wire.NEWS, wire.News(members)),
             key="mobile")


def _phantom(n: int) -> wire.Member:
    """An "orders" member at an endpoint where nothing answers."""
    return wire.Member(0x7400_0000 + n, 1, wire.MEMBER_STATES.index("alive"), f"inproc://fake/phantom-{n}",
                       f"phantom-{n}", "orders", 64, 1 << 20)


def test_with_keys_a_member_a_client_introduces_gets_no_work_until_it_speaks_for_itself() -> None:
    # the introduction is allowed (a client may be a newcomer's seed), so the api node used to give
    # the phantom its share of the partitions, and pass it on: every command routed there waited
    # until the phantom was declared dead (suspect_after + dead_after)
    created: list[str] = []
    h, mobile, front, owner = keyed_shop_mesh(11, created)
    phantom = _phantom(0)

    async def scenario() -> None:
        await h.start()
        _introduce(h, front, [phantom])
        await h.advance(0.2)
        known = front.membership.peers[phantom.incarnation]
        assert known.live and not known.vouched and not known.routable, "kept, as a newcomer might be, but idle"
        assert [p.node for p in front.membership.instances("orders")] == [owner.name]
        start = h.now
        for i in range(16):  # their keys spread over the partitions: none goes to the phantom
            assert await h.run(mobile.send(PlaceOrder(f"o-{i}"))) == f"o-{i}"
        assert h.now - start < 1.0, "no command waited for the phantom's death (virtual time)"
        await h.advance(1.0)
        assert phantom.incarnation not in owner.membership.peers, "the api node passed the phantom on"
        assert phantom.incarnation not in mobile.membership.peers
        await h.advance(CONFIG.suspect_after + CONFIG.dead_after + 1.0)
        assert not front.membership.peers[phantom.incarnation].live, "probed, silent: dead"
        assert phantom.incarnation not in owner.membership.peers, "nor its death (nobody else knew it)"

    run(scenario)
    assert created == [f"o-{i}" for i in range(16)]


def test_with_keys_a_client_introduces_at_most_a_keys_share_of_members() -> None:
    h = Harness(seed=12, config=NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25, max_members_per_key=3),
                policy=POLICY)
    h.add(None, key="mobile")
    front = h.add(shop([])[0], key="api-1")

    async def scenario() -> None:
        await h.start()
        _introduce(h, front, [_phantom(n) for n in range(10)])
        await h.advance(0.2)
        introduced = [p for p in front.membership.peers.values() if not p.vouched]
        assert len(introduced) == 3, "max_members_per_key bounds the endpoints a client key makes us dial"

    run(scenario)


def test_with_keys_a_newcomer_whose_seed_is_a_client_joins_and_is_given_work() -> None:
    # the honest case the introduction exists for: a new orders node knows only the client; the
    # client's word brings it to the others, and its own frames vouch for it
    created: list[str] = []
    api, orders = shop(created)
    policy = Policy({**{k: POLICY.permissions(k) for k in ("api-1", "orders-1", "mobile")},
                     "orders-2": Permissions.of(serves=["orders"])})
    h = Harness(seed=13, config=CONFIG, policy=policy)
    mobile = h.add(None, key="mobile")
    front = h.add(api, key="api-1")
    h.add(orders, key="orders-1")

    async def scenario() -> None:
        await h.start()
        newcomer = h.join(orders, key="orders-2")  # seeded by the first node: the client
        assert h.engines[next(iter(h.engines))] is mobile

        def serving() -> bool:
            peer = front.membership.peers.get(newcomer.incarnation)
            return peer is not None and peer.routable and newcomer.calls.routing
        await h.run_until(serving, 30.0, "the newcomer is routable at the api node")
        assert front.membership.peers[newcomer.incarnation].vouched
        for i in range(16):
            assert await h.run(mobile.send(PlaceOrder(f"n-{i}"))) == f"n-{i}"
        assert newcomer.dispatcher.stats.processed > 0, "it owns a share of the partitions"

    run(scenario)
    assert sorted(created) == sorted(f"n-{i}" for i in range(16))


def test_a_frame_from_a_stranger_is_refused_by_its_kind() -> None:
    """Only a hello, a system query, a refusal and an introducing ping may come from a node that
    is not a member here; the refusal of anything else names the frame, for whoever reads the log."""
    admission = Admission(None, None)
    for frame_type in STRANGER_FRAMES:
        assert admission.speaks_for(None, frame_type, None, None) is None
    assert admission.speaks_for(None, wire.DATA, None, None) == (
        "unknown_peer", "a data frame from a node that is not a member here")
    assert admission.speaks_for(None, wire.NEWS, None, None) == (
        "unknown_peer", "a news frame from a node that is not a member here")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_client_first_data_to_an_instance_it_heard_of_from_another_is_taken(seed: int) -> None:
    """A client joins through ``a`` and learns from a's table of ``b``, which joined before it and
    has not heard of the client yet. Its first data to b went before b knew it: b refused those
    frames (``unknown_peer``, 3 to 8 here) and they came again only after the client's
    retransmission timeout (a second, on a client's first messages). A channel that opens to a
    member that never spoke to us now starts with a hello."""
    seen: list[int] = []
    sink = Service("sink")
    sink.on(Reading)(lambda ev: seen.append(ev.n))
    h = Harness(seed=seed)
    a = h.add(sink)

    async def scenario() -> None:
        await h.start()
        b = h.join(sink)
        await h.run_until(lambda: b.lifecycle.state == "joined", 30, "b joins")
        client = h.join(None)
        await h.run_until(lambda: client.lifecycle.state == "joined", 30, "the client joins")
        for n in range(40):
            await h.run(client.emit(Reading(sensor=f"s{n}", n=n)), timeout=30)
        await h.run_until(lambda: len(seen) == 40, 30, "every event handled")
        assert sorted(seen) == list(range(40))
        assert not b.counters.refused and not a.counters.refused, (b.counters.refused, a.counters.refused)
        assert client.outbox.redelivered() == 0, "nothing had to go twice"

    asyncio.run(scenario())
