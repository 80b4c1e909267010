"""Partition moves through a join, a death and a timeout, without an engine.

A :class:`Moves` over a hand-built membership, an outbox that records what it sends, and a stub
dispatcher (:class:`~choreo.runtime.moves.PartitionWork`) that records what it is asked to run
and export.
"""

from __future__ import annotations

from typing import Any

from choreo import Event, Service, core, wire
from choreo.config import NodeConfig
from choreo.runtime.holds import Holds
from choreo.runtime.lifecycle import Lifecycle
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.moves import Moves
from choreo.runtime.outbox import Outbox
from choreo.runtime.ownership import Ownership
from choreo.runtime.stats import Counters

PARTITIONS = 8


class Tick(Event, key="k"):
    k: str


svc = Service("meter", partitions=PARTITIONS)
svc.on(Tick)(lambda e: None)


class Work:
    def __init__(self) -> None:
        self.delivered: list[tuple[int, int]] = []  # (partition, seq)
        self.exported: list[int] = []
        self.imported: list[int] = []
        self.lag: dict[int, int] = {}

    def export_partition(self, p: int) -> bytes:
        self.exported.append(p)
        return b"state-of-%d" % p

    def import_partition(self, p: int, payload: bytes) -> None:
        self.imported.append(p)

    def deliver(self, channel: Any, env: Any, now: float) -> None:
        self.delivered.append((env.partition, env.seq))

    def untrack(self, partition: int) -> None: ...

    def pump(self) -> None: ...

    def lag_of(self, partition: int) -> int:
        return self.lag.get(partition, 0)


class Env:
    def __init__(self, partition: int, seq: int) -> None:
        self.partition, self.seq, self.kind, self.flags = partition, seq, wire.KIND_EVENT, 0


class Node:
    """One service node's moves, and a mesh it sees."""

    def __init__(self, me: int, *others: int, joined: bool = True, holding: tuple[int, ...] = ()) -> None:
        self.now = 0.0
        self.config = NodeConfig(handover_timeout=5.0)
        self.sent: list[tuple[str, bytes]] = []
        self.membership = Membership()
        self.outbox = Outbox(self, self.config, clock=lambda: self.now, holds=Holds(), counters=Counters())
        self.outbox.start(None, me)
        self.life = Lifecycle()
        if joined:
            self.life.on("joined")
        self.work = Work()
        self.moves = Moves(
            Ownership(PARTITIONS, me), self.membership, self.outbox, self.life,
            service="meter", config=self.config, clock=lambda: self.now, fresh_id=core.IdSource(bytes(8)).next,
            counters=Counters(),
        )
        self.moves.work = self.work
        for inc in (me, *others):
            peer = self.add(inc)
            peer.holding = b"\xff" * (PARTITIONS // 8) if inc in holding else b""  # it holds every partition

    endpoint = "fake://me"

    def send(self, endpoint: str, frame: bytes) -> None:
        self.sent.append((endpoint, frame))

    def add(self, inc: int) -> Peer:
        peer = Peer(inc, f"fake://{inc}", f"meter#{inc}", svc.spec(), 64, 1 << 20, self.now)
        self.membership.upsert(peer)
        return peer

    def handovers(self) -> list[tuple[str, int]]:
        self.outbox.flush()
        out = []
        for endpoint, frame in self.sent:
            for env in core.parse_envelopes(frame[wire.HEADER_SIZE:]):
                if env.kind == wire.KIND_HANDOVER:
                    out.append((endpoint, env.partition))
        return out

    def owned(self) -> set[int]:
        return {p for p, s in enumerate(self.moves.ownership.state) if s == "owned"}


def test_alone_everything_is_ours_at_once() -> None:
    n = Node(1)
    n.moves.sync()
    assert n.owned() == set(range(PARTITIONS))


def test_a_join_drains_what_moves_then_hands_it_over_after_its_last_message() -> None:
    n = Node(1)
    n.moves.sync()
    n.add(2)
    n.moves.sync()
    moving = set(n.moves.ownership.draining)
    assert moving and moving == set(range(PARTITIONS)) - n.owned(), "only what the newcomer takes drains"
    p = min(moving)
    n.work.lag = {p: 1}  # one message of p still in a handler here
    n.moves.tick(n.now)
    assert p in n.moves.ownership.draining and p not in n.work.exported, "no handover before the drain ends"
    n.work.lag = {}
    n.moves.tick(n.now)
    assert not n.moves.ownership.draining
    assert sorted(n.work.exported) == sorted(moving)
    assert sorted(p for _, p in n.handovers()) == sorted(moving)
    assert {e for e, _ in n.handovers()} == {"fake://2"}
    assert all(n.moves.ownership.state[q] == "handed_over" for q in moving)


def test_a_newcomer_buffers_until_the_handover_then_runs_in_arrival_order() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    waiting = set(n.moves.ownership.awaiting)
    assert waiting and not n.owned() & waiting
    p = min(waiting)
    for seq in (1, 2, 3):
        assert n.moves.buffer(None, Env(p, seq)) is True
    assert n.work.delivered == []
    n.moves.on_handover(type("E", (), {"partition": p, "payload": b"ids"})())
    assert n.work.imported == [p] and n.work.delivered == [(p, 1), (p, 2), (p, 3)]
    assert p in n.owned()


def test_a_previous_owner_that_dies_is_not_waited_for() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    p = min(n.moves.ownership.awaiting)
    n.moves.buffer(None, Env(p, 7))
    n.moves.previous_gone(1, "meter#1")
    assert p in n.owned() and (p, 7) in n.work.delivered


def test_a_handover_that_never_comes_is_taken_after_the_timeout() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    waiting = set(n.moves.ownership.awaiting)
    n.now = n.config.handover_timeout - 0.1
    n.moves.tick(n.now)
    assert not n.owned() & waiting
    n.now = n.config.handover_timeout + 0.1
    n.moves.tick(n.now)
    assert waiting <= n.owned() and not n.moves.ownership.awaiting


def test_before_joining_arrivals_wait_and_nothing_is_owned() -> None:
    n = Node(1, joined=False)
    n.moves.sync()
    assert not n.owned(), "no partition before the node has joined the mesh"
    assert n.moves.buffer(None, Env(3, 1)) is True
    n.life.on("joined")
    n.moves.sync()
    assert n.work.delivered == [(3, 1)], "released once ours"


def test_an_arrival_for_another_owner_is_forwarded_and_acknowledged_after_the_forward() -> None:
    n = Node(1, 2)
    n.moves.sync()
    theirs = min(set(range(PARTITIONS)) - n.owned())
    raw = core.pack_envelope(5, wire.KIND_EVENT, 0, b"Tick", b"k", theirs, b"m" * 16, b"m" * 16, bytes(16), b"\x91\xa1k")
    (env,) = core.parse_envelopes(raw)

    class Channel:
        completed: list[int] = []
        reorder = type("R", (), {"complete": lambda self, seq: Channel.completed.append(seq)})()

    assert n.moves.forward(Channel(), env) is True
    n.outbox.flush()
    (endpoint, frame), = n.sent
    assert endpoint == "fake://2"
    (fwd,) = core.parse_envelopes(frame[wire.HEADER_SIZE:])
    assert fwd.msg_id == b"m" * 16 and fwd.partition == theirs
    assert Channel.completed == [], "the original waits for the forward's ack"
    ch = n.outbox.out[2]
    ch.on_ack(core.encode_ack(1, 1, []), 0, n.now)
    assert Channel.completed == [5]
