"""Routing against a hand-built membership, and the outbox's batches, acks and answers.

No engine and no sockets: a :class:`Membership` filled with peers by hand, a
:class:`Router` and an :class:`Outbox` whose sender records the frames it is given.
"""

from __future__ import annotations

import msgspec
import pytest

from choreo import Command, Event, Query, Service, core, wire
from choreo.config import NodeConfig
from choreo.errors import ChoreoUsageError, MessageTooLarge, NoOwner, UndeclaredMessage
from choreo.runtime.calls import Calls
from choreo.runtime.channels import Outgoing
from choreo.runtime.holds import Holds
from choreo.runtime.lifecycle import Lifecycle
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.outbox import Outbox
from choreo.runtime.routing import Router, key_bytes
from choreo.runtime.stats import Counters


class Placed(Event, key="order"):
    order: str


class Clicked(Event):
    page: str


class Charge(Command, key="order"):
    order: str


class Lookup(Query):
    order: str


orders = Service("orders", partitions=16)
orders.on(Placed)(lambda e: None)
orders.command(Charge)(lambda c: None)
audit = Service("audit")
audit.on(Placed, broadcast=True)(lambda e: None)
stats = Service("stats")
stats.on(Clicked)(lambda e: None)
shop = Service("shop", emits=[Placed, Clicked], sends=[Charge])


class Recorder:
    endpoint = "fake://me"

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def send(self, endpoint: str, frame: bytes) -> None:
        self.frames.append((endpoint, frame))

    def of_type(self, frame_type: int) -> list[tuple[str, bytes]]:
        return [(e, f) for e, f in self.frames if wire.parse_header(f)[0] == frame_type]


class World:
    def __init__(self, *peers: tuple[int, Service], service: Service | None = shop) -> None:
        self.config = NodeConfig(window=8, max_batch=4)
        self.now = 0.0
        self.wire = Recorder()
        self.counters = Counters()
        self.membership = Membership()
        self.holds = Holds()
        self.outbox = Outbox(self.wire, self.config, clock=lambda: self.now, holds=self.holds, counters=self.counters)
        self.outbox.start(None, 1)
        self.router = Router(
            self.membership, self.outbox, self.holds,
            service=service, config=self.config, clock=lambda: self.now, ids=core.IdSource(bytes(8)),
            counters=self.counters,
        )
        self.peers = {inc: self.join(inc, svc) for inc, svc in peers}

    def move(self, p: int) -> None:
        """Instances of orders join until one wins partition ``p``; the holds take the new view."""
        for inc in range(11, 200):
            self.join(inc, orders)
            if self.membership.owner("orders", p).incarnation == inc:
                break
        self.holds.on_view(self.membership, self.outbox.out)

    def join(self, incarnation: int, service: Service) -> Peer:
        peer = Peer(incarnation, f"fake://{service.name}-{incarnation}", f"{service.name}#{incarnation}",
                    service.spec(), 8, 1 << 20, 0.0)
        self.membership.upsert(peer)
        return peer


def test_a_keyed_event_goes_to_the_owner_of_its_partition_on_every_node() -> None:
    w = World((10, orders), (20, orders), (30, orders))
    ((peer, flags, kb, partition, service),) = w.router.destinations(Placed("o-7"), "Placed", "event")
    assert service == "orders" and kb == b"o-7" and flags == 0
    assert partition == core.partition_of(b"o-7", 16)
    keys = [p.key for p in w.membership.instances("orders")]
    assert peer is w.membership.instances("orders")[core.assign_partitions(16, keys)[partition]]
    other = World((30, orders), (10, orders), (20, orders))  # the same mesh, learned in another order
    assert other.router.destinations(Placed("o-7"), "Placed", "event")[0][0].incarnation == peer.incarnation


def test_broadcast_reaches_every_instance_and_competing_reaches_one() -> None:
    w = World((10, orders), (20, orders), (40, audit), (41, audit))
    copies = w.router.destinations(Placed("o-1"), "Placed", "event")
    to_audit = [d for d in copies if d[4] == "audit"]
    to_orders = [d for d in copies if d[4] == "orders"]
    assert sorted(d[0].incarnation for d in to_audit) == [40, 41]
    assert all(d[1] & wire.FLAG_BROADCAST for d in to_audit)
    assert len(to_orders) == 1


def test_unkeyed_messages_spread_over_equally_loaded_instances() -> None:
    w = World((50, stats), (51, stats))
    chosen = {w.router.least_loaded("stats").incarnation for _ in range(4)}
    assert chosen == {50, 51}, "equally loaded instances take turns"
    plan = w.router.plan(Clicked("/"), b"i" * 16, b"t" * 16, bytes(16), None)
    w.router.commit(plan)
    busy = plan[0][0].peer.incarnation
    assert all(w.router.least_loaded("stats").incarnation != busy for _ in range(3)), "the idle one first"


def test_a_command_needs_exactly_one_owning_service() -> None:
    w = World((10, orders))
    assert w.router.routes("Charge", "command")[0].service == "orders"
    with pytest.raises(NoOwner, match="no service in the mesh declares a handler for query Lookup"):
        w.router.destinations(Lookup("o"), "Lookup", "query")
    rival = Service("billing")
    rival.command(Charge)(lambda c: None)
    w.join(60, rival)
    with pytest.raises(ChoreoUsageError, match="two owners"):
        w.router.routes("Charge", "command")


def test_a_service_whose_instances_died_keeps_its_messages_waiting() -> None:
    w = World((10, orders))
    w.membership.suspect(10)  # its probe went unanswered
    w.membership.expire(10)  # and nobody heard it refute: dead; orders has no live instance, and is not forgotten
    assert w.membership.instances("orders") == []
    plan = w.router.plan(Placed("o-1"), b"i" * 16, b"t" * 16, bytes(16), None)
    assert [(ch, service) for ch, _, service in plan] == [(None, "orders")], "a copy that waits for an instance"


@pytest.mark.parametrize("how", ["plan", "emit_now"])
def test_what_waits_for_an_instance_leaves_before_anything_new_for_its_service(how: str) -> None:
    # orders had no instance, so two events wait here; an instance is routable before anything
    # has rehomed them (a node that joins runs its handlers before it rehomes what its last life
    # left): a new event for orders sends them first, in order, then itself (chaos pipeline
    # seed 36: the next service handled the new one before the older ones)
    w = World()
    w.membership.declare(orders.spec())
    for n in range(2):
        (_, item, service), = w.router.plan(Placed(f"o-{n}"), bytes([n]) * 16, b"t" * 16, bytes(16), None)
        w.outbox.park(service, item)
    w.join(10, orders)
    w.router.invalidate()
    if how == "plan":
        (ch, item, _), = w.router.plan(Placed("o-2"), b"\x02" * 16, b"t" * 16, bytes(16), None)
        w.outbox.append(ch, item, w.now)
    else:
        w.router.emit_now(Placed("o-2"))
    assert not w.outbox.waiting.get("orders"), "nothing waits once orders is routable"
    w.outbox.flush()
    sent = [env for _, f in w.wire.of_type(wire.DATA) for env in core.parse_envelopes(f[wire.HEADER_SIZE:])]
    orders_sent = [msgspec.msgpack.decode(env.payload, type=Placed).order for env in sent]
    assert orders_sent == ["o-0", "o-1", "o-2"]


def test_emit_now_writes_into_the_owners_window_and_batches_until_flush() -> None:
    w = World((10, orders), (20, orders))
    ids = [w.router.emit_now(Placed(f"o-{n}")) for n in range(3)]
    assert all(isinstance(i, bytes) and len(i) == 16 for i in ids) and len(set(ids)) == 3
    assert w.wire.frames == [], "nothing leaves before the flush"
    w.outbox.flush()
    data = w.wire.of_type(wire.DATA)
    assert 1 <= len(data) <= 2, "one frame per receiving channel"
    sent = [env for _, f in data for env in core.parse_envelopes(f[wire.HEADER_SIZE:])]
    assert sorted(env.msg_id for env in sent) == sorted(ids)
    for endpoint, f in data:
        for env in core.parse_envelopes(f[wire.HEADER_SIZE:]):
            owner = w.membership.owner("orders", env.partition)
            assert owner is not None and owner.endpoint == endpoint


def test_the_emit_table_keeps_a_lane_only_for_the_view_it_was_compiled_under() -> None:
    w = World((10, orders))
    table = w.router.emit_table
    assert table.emit(Placed("o-1")) is None, "no plan yet: the general path compiles one"
    assert w.router.emit_now(Placed("o-1")) is not None
    assert table.emit(Placed("o-2")) is not None, "the plan's lane, in one call"
    w.join(20, orders)
    assert len(table) == 0 and table.emit(Placed("o-3")) is None, "a new view: the old view's lanes are gone"
    assert w.router.emit_now(Placed("o-3")) is not None
    assert all(table.emit(Placed(f"o-{n}")) is not None for n in range(4, 7))
    w.outbox.flush()
    for endpoint, f in w.wire.of_type(wire.DATA):
        for env in core.parse_envelopes(f[wire.HEADER_SIZE:]):
            if env.key != b"o-1" and env.key != b"o-2":  # (sent before the second instance came)
                owner = w.membership.owner("orders", env.partition)
                assert owner is not None and owner.endpoint == endpoint, "routed by the new view"


def test_a_full_batch_leaves_at_once() -> None:
    w = World((10, orders))
    for n in range(4):  # max_batch=4
        w.router.emit_now(Placed(f"o-{n}"))
    assert len(w.wire.of_type(wire.DATA)) == 1


def test_no_credit_means_the_waiting_path() -> None:
    w = World((10, orders))
    assert all(w.router.emit_now(Placed(f"o-{n}")) for n in range(8))  # window=8
    assert w.router.emit_now(Placed("o-9")) is None, "no credit left: the caller waits or raises"


def test_emit_refuses_what_this_service_does_not_declare() -> None:
    w = World((10, orders), service=orders)
    with pytest.raises(UndeclaredMessage, match="emits Placed outside a handler without declaring it"):
        w.router.emit_now(Placed("o"))


def test_a_message_above_the_limit_is_refused_before_it_leaves() -> None:
    w = World((10, orders))
    w.router.config = NodeConfig(max_message_bytes=64)
    with pytest.raises(MessageTooLarge, match="above max_message_bytes=64"):
        w.router.plan(Placed("x" * 100), b"i" * 16, b"t" * 16, bytes(16), None)


def test_acks_free_credit_call_back_and_wake_the_backlog() -> None:
    w = World((10, orders))
    done: list[int] = []
    plan_ids = []
    for n in range(10):  # 8 fit the window, 2 wait in the backlog
        plan = w.router.plan(Placed("o-1"), bytes([n]) * 16, bytes(16), bytes(16), lambda n=n: done.append(n))
        w.router.commit(plan)
        plan_ids.append(plan[0][1].msg_id)
    ch = w.outbox.out[10]
    assert ch.window.in_flight == 8 and len(ch.backlog) == 2
    ack = core.encode_ack(6, 6, [])
    ch.on_ack(ack, 0, w.now)
    assert done == list(range(6)), "each envelope's callback runs once it is acknowledged, in order"
    assert ch.window.in_flight == 4 and not ch.backlog, "the backlog moved into the freed credit"


def test_a_hold_waits_for_what_waited_in_the_old_owners_backlog_too() -> None:
    """The partition moves while its old owner's window is full and more of it waits in the
    channel's backlog: the hold lasts until the old owner acknowledged those too. Its barrier
    was the window's last sequence number: acknowledged up to there, the hold let the next
    message go to the new owner while earlier ones still waited for credit to the old one,
    and the new owner could run it first (replicas seed 14030 of the 100 s schedules)."""
    w = World((10, orders))
    key = "o-1"
    p = core.partition_of(key.encode(), 16)
    w.holds.on_view(w.membership, w.outbox.out)  # the view they go out under
    for n in range(10):  # 8 fit the window, 2 wait in the backlog
        w.router.commit(w.router.plan(Placed(key), bytes([n]) * 16, bytes(16), bytes(16), None))
    old = w.outbox.out[10]
    assert old.window.in_flight == 8 and len(old.backlog) == 2
    w.move(p)
    assert w.holds.held("orders", p) is not None, "the next message of p waits"
    old.on_ack(core.encode_ack(8, 8, []), 0, w.now)  # the window's eight: the backlog's two go out
    assert not w.holds.release(old), "two of p still unacknowledged at the old owner"
    old.on_ack(core.encode_ack(10, 10, []), 0, w.now)
    assert p in [q for _, q, _ in w.holds.release(old)], "(with every other partition that moved)"


class PassedOn:
    """The callback of a forward (``Moves.forward``): an arrival this node passes on for its sender."""

    forward = True

    def __init__(self) -> None:
        self.done = False

    def __call__(self) -> None:
        self.done = True


def test_a_hold_does_not_wait_for_forwards_of_other_senders_messages() -> None:
    """The order a hold keeps is of what this node sends itself: a forward it carries for another
    sender (an arrival for a partition it no longer owned) is that sender's, ordered by that
    sender's own hold. Waiting for it too made a cycle: the forward ran at the partition's owner
    and waited for its flow's round trip, which came back to this node, whose next message of
    the partition waited behind the hold (nemesis plain seed 137 of the saga workload, for good)."""
    w = World((10, orders))
    key = "o-1"
    p = core.partition_of(key.encode(), 16)
    w.holds.on_view(w.membership, w.outbox.out)
    old = w.outbox.channel(w.peers[10])
    passed_on = PassedOn()
    w.outbox.append(old, Outgoing(core.KIND_EVENT, 0, b"Placed", key.encode(), p, bytes([9]) * 16, bytes(16),
                                  bytes(16), b"\x91\xa3o-1", passed_on), w.now, forward=True)  # seq 1
    w.router.commit(w.router.plan(Placed(key), bytes([1]) * 16, bytes(16), bytes(16), None))  # ours: seq 2
    w.move(p)
    assert w.holds.held("orders", p) is not None, "our next message of p waits for our last one"
    assert not w.holds.release(old), "ours is not acknowledged yet"
    old.on_ack(core.encode_ack(0, 2, [(2, 2)]), 0, w.now)  # ours done; the forward still out
    assert p in [q for _, q, _ in w.holds.release(old)], "what is left before the barrier is a forward"
    assert not passed_on.done, "and the forward still waits for its own ack"


def test_answers_leave_before_the_ack_that_covers_their_command() -> None:
    w = World((10, orders))
    peer = w.peers[10]
    ich = w.outbox.inbound_from(peer)
    frame = wire.frame(wire.DATA, 10, 1, core.pack_envelope(1, wire.KIND_COMMAND, 0, b"Charge", b"o", 0,
                                                            b"c" * 16, b"c" * 16, bytes(16), b"\x91\xa1o"))
    (env,) = ich.reorder.feed(frame, wire.HEADER_SIZE)
    ich.reorder.complete(env.seq)
    w.outbox.queue_reply(peer, wire.reply_entry(b"c" * 16, b"Charge", b"\x01\xc0"))
    w.outbox.ack_later(ich)
    w.outbox.flush()
    (endpoint, f), = w.wire.frames
    frame_type, flags, _, _ = wire.parse_header(f)
    assert frame_type == wire.REPLY and flags & wire.FLAG_ACK, "one frame: the answer, with the ack riding on it"
    ack_at, ack_len, body_at = wire.split_ack(f, flags)
    assert core.decode_ack(f[: ack_at + ack_len], ack_at)[0] == 1
    assert wire.parse_replies(f, body_at) == [(b"c" * 16, "Charge", b"\x01\xc0")]


def test_blocked_names_what_stops_a_plan() -> None:
    w = World((10, orders))
    life = Lifecycle()
    life.on("joined")
    calls = Calls(w.router, w.outbox, w.holds, w.membership, lifecycle=life, service=shop, config=w.config,
                  clock=lambda: w.now, call_later=lambda d, cb: None, counters=w.counters)
    for n in range(8):
        w.router.commit(w.router.plan(Placed("o"), bytes([n]) * 16, bytes(16), bytes(16), None))
    plan = w.router.plan(Placed("o"), b"z" * 16, bytes(16), bytes(16), None)
    assert calls.blocked(plan) is w.outbox.out[10], "the full channel"
    with pytest.raises(Exception, match="window 8/8 in flight to orders#10"):
        calls.try_emit(Placed("o"))
    assert key_bytes(7) == b"7"


class Ran:
    """What ``Calls.send_outputs`` reads of a finished handler's job."""

    def __init__(self) -> None:
        self.env = Outgoing(core.KIND_EVENT, 0, b"Placed", b"x", 0, b"\x07" * 16, bytes(16), bytes(16), b"", None)
        self.handler = type("Handler", (), {"name": "relay"})()


@pytest.mark.parametrize("how", ["commit", "send_outputs"])
def test_a_message_for_a_held_partition_with_no_owner_waits_behind_the_hold(how: str) -> None:
    """Partition p's owner leaves while a message of ours is on its way to it (a hold opens), and
    its successor dies before the hold passed: p has no owner. The next message of p must wait
    behind the hold, not in the queue for an instance, which the hold's messages join only when
    it passes: behind it (chaos pipeline seed 214: a sink newcomer handled 35204 before 31204 to
    35004, which the forward's hold had kept while the last sink instance drained)."""
    w = World((10, orders))
    key = "o-1"
    p = core.partition_of(key.encode(), 16)
    w.holds.on_view(w.membership, w.outbox.out)
    w.router.commit(w.router.plan(Placed(key), b"\x01" * 16, bytes(16), bytes(16), None))  # seq 1, to 10
    old = w.outbox.out[10]
    w.membership.leaving(10)
    w.move(p)  # another instance takes p: ours to 10 is still unacknowledged
    hold = w.holds.held("orders", p)
    assert hold is not None
    w.router.commit(w.router.plan(Placed(key), b"\x02" * 16, bytes(16), bytes(16), None))
    assert [item.msg_id for item in hold.queue] == [b"\x02" * 16], "the next one waits behind the hold"
    for peer in w.membership.instances("orders"):  # the successor dies: nobody owns p now
        w.membership.suspect(peer.incarnation)
        w.membership.expire(peer.incarnation)
    w.router.invalidate()
    w.holds.on_view(w.membership, w.outbox.out)
    assert w.membership.owner("orders", p) is None and w.holds.held("orders", p) is hold
    if how == "commit":  # an event from outside a handler
        plan = w.router.plan(Placed(key), b"\x03" * 16, bytes(16), bytes(16), None)
        assert [ch for ch, _, _ in plan] == [None], "planned to wait for an instance"
        w.router.commit(plan)
    else:  # what a handler emitted
        life = Lifecycle()
        life.on("joined")
        calls = Calls(w.router, w.outbox, w.holds, w.membership, lifecycle=life, service=shop, config=w.config,
                      clock=lambda: w.now, call_later=lambda d, cb: None, counters=w.counters)
        assert calls.send_outputs(Ran(), [Placed(key)], lambda: None) == 1
    assert len(hold.queue) == 2 and not w.outbox.waiting.get("orders"), "nothing of p waits ahead of the hold"
    old.on_ack(core.encode_ack(1, 1, []), 0, w.now)
    w.router.release_holds(w.holds.release(old))
    waiting = list(w.outbox.waiting["orders"])
    assert len(waiting) == 2 and waiting[0].msg_id == b"\x02" * 16, "the hold's first, then the newer one"
