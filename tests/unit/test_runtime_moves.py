"""Partition moves through a join, a death and a timeout, without an engine.

A :class:`Moves` over a hand-built membership, an outbox that records what it sends, and a stub
dispatcher (:class:`~choreo.runtime.moves.PartitionWork`) that records what it is asked to run,
export, install and forget. Streams travel as the real chunks of :mod:`choreo.runtime.transfer`.
"""

from __future__ import annotations

from typing import Any

import pytest

from choreo import Event, Service, core, wire
from choreo.config import NodeConfig
from choreo.runtime.holds import Holds
from choreo.runtime.lifecycle import Lifecycle
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.moves import Moves
from choreo.runtime.channels import OutChannel, Outgoing
from choreo.runtime.outbox import Outbox
from choreo.runtime.ownership import Ownership
from choreo.runtime.replicas import Replicas
from choreo.runtime.stats import Counters
from choreo.runtime.transfer import Chunk, Piece, StreamOut, Verdict, decode_transfer, encode_transfer

PARTITIONS = 8


class Tick(Event, key="k"):
    k: str


svc = Service("meter", partitions=PARTITIONS)
svc.on(Tick)(lambda e: None)


class Work:
    def __init__(self) -> None:
        self.delivered: list[tuple[int, int]] = []  # (partition, seq)
        self.exported: list[int] = []
        self.imported: list[tuple[int, list[tuple[str, bytes, bytes]]]] = []
        self.forgotten: list[int] = []
        self.handed: list[int] = []  # checked out at their new owner (their ids stay here)
        self.lag: dict[int, int] = {}

    def export_partition(self, p: int, settled: bool = False, to: int | None = None) -> Any:
        self.exported.append(p)
        return iter([Piece(state=[("Tally", b"key-%d" % p, b"x" * 300)]) for _ in range(3)])

    def forget_partition(self, p: int, keep_ids: bool = False) -> None:
        (self.handed if keep_ids else self.forgotten).append(p)

    def install(self, staged: Any, source: int | None = None) -> None:
        self.imported.append((staged.partition, staged.state))

    def apply_delta(self, delta: Any) -> None: ...

    def take_over(self, p: int) -> int:
        return 0

    def all_ran(self, p: int, lag: int) -> bool:
        return lag == 0  # (nothing here waits for its outputs' acks)

    def draining(self, p: int) -> None: ...  # (no key here waits for a previous owner)

    def drain_state(self, p: int, lag: int) -> str:
        return f"{lag} messages in progress"

    def marked(self, msg_id: bytes) -> bool:
        return False

    def source_gone(self, incarnation: int) -> int:
        return 0

    def handed_on(self, p: int) -> None: ...

    def reship_owed(self, p: int) -> None: ...

    def deliver(self, channel: Any, env: Any, now: float) -> None:
        self.delivered.append((env.partition, env.seq))

    def untrack(self, partition: int) -> None: ...

    def pump(self) -> None: ...

    def lag_of(self, partition: int) -> int:
        return self.lag.get(partition, 0)


class Env:
    def __init__(self, partition: int, seq: int) -> None:
        self.partition, self.seq, self.kind, self.flags = partition, seq, wire.KIND_EVENT, 0
        self.msg_id = seq.to_bytes(16, "little")


class Node:
    """One service node's moves, and a mesh it sees."""

    def __init__(
        self, me: int, *others: int, joined: bool = True, holding: tuple[int, ...] = (), stateful: bool = True
    ) -> None:
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
        self.refusals: list[tuple[str, str]] = []
        self.moves = Moves(
            Ownership(PARTITIONS, me), self.membership, self.outbox, self.life,
            service="meter", config=self.config, clock=lambda: self.now, fresh_id=core.IdSource(bytes(8)).next,
            counters=Counters(), refused=lambda reason, detail: self.refusals.append((reason, detail)),
            stateful=stateful,
        )
        self.moves.work = self.moves.data = self.work
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
        return [(endpoint, m.partition) for endpoint, m in self.transfers() if isinstance(m, Chunk) and m.seq == 0]

    def transfers(self) -> list[tuple[str, Any]]:
        """Every transfer message sent so far, decoded, with where it went."""
        self.outbox.flush()
        out = []
        for endpoint, frame in self.sent:
            for env in core.parse_envelopes(frame[wire.HEADER_SIZE:]):
                if env.kind == wire.KIND_HANDOVER:
                    out.append((endpoint, decode_transfer(env.payload)))
        return out

    def receive(self, sender: int, message: Any) -> None:
        """A transfer message from instance ``sender`` arrives."""
        channel = type("In", (), {"peer": self.membership.peers[sender]})()
        env = type("E", (), {"partition": message.partition, "payload": encode_transfer(message)})()
        self.moves.on_transfer(channel, env)

    def ack_all(self, inc: int) -> None:
        """The instance ``inc`` acknowledges everything sent to it so far."""
        ch = self.outbox.out[inc]
        self.outbox.flush()
        ch.on_ack(core.encode_ack(ch.window.next_seq - 1, ch.window.next_seq - 1, []), 0, self.now)

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
    assert sorted(n.work.exported) == sorted(moving)
    assert sorted(p for _, p in n.handovers()) == sorted(moving)
    assert {e for e, _ in n.handovers()} == {"fake://2"}
    assert set(n.moves.ownership.draining) == moving, "kept here until the newcomer says it has them"
    assert n.work.handed == []
    for endpoint, m in n.transfers():
        if m.last:
            n.receive(2, Verdict("handover", m.stream, m.partition, True))
    assert not n.moves.ownership.draining
    assert all(n.moves.ownership.state[q] == "handed_over" for q in moving)
    assert sorted(n.work.handed) == sorted(moving) and n.work.forgotten == []


def test_a_newcomer_buffers_until_the_handover_then_runs_in_arrival_order() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    waiting = set(n.moves.ownership.awaiting)
    assert waiting and not n.owned() & waiting
    p = min(waiting)
    for seq in (1, 2, 3):
        assert n.moves.buffer(None, Env(p, seq)) is True
    assert n.work.delivered == []
    for chunk in stream_of(p, 77):
        n.receive(1, chunk)
    assert [q for q, _ in n.work.imported] == [p] and n.work.delivered == [(p, 1), (p, 2), (p, 3)]
    assert len(n.work.imported[0][1]) == 20, "every entry of every chunk"
    assert p in n.owned()
    (verdict,) = [m for _, m in n.transfers() if isinstance(m, Verdict)]
    assert verdict.ok and verdict.stream == 77 and verdict.partition == p


def stream_of(p: int, stream: int, entries: int = 20) -> list[Chunk]:
    """A real stream of partition ``p``: ``entries`` state values, several chunks."""
    pieces = iter([Piece(state=[("Tally", b"k%d" % i, b"v" * 100)]) for i in range(entries)])
    out = StreamOut("handover", stream, p, pieces, chunk_bytes=500, clock=lambda: 0.0)
    chunks = []
    while (raw := out.next_chunk()) is not None:
        chunks.append(decode_transfer(raw))
    assert len(chunks) > 2
    return chunks


def test_a_corrupt_or_cut_stream_is_refused_and_the_partition_still_waits() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    p = min(n.moves.ownership.awaiting)
    n.moves.buffer(None, Env(p, 1))
    chunks = stream_of(p, 5)
    i = chunks[1].body.index(b"v" * 100) + 50
    chunks[1].body = chunks[1].body[:i] + bytes([chunks[1].body[i] ^ 1]) + chunks[1].body[i + 1 :]  # a bit flipped in transit
    for chunk in chunks:
        n.receive(1, chunk)
    assert n.work.imported == [] and n.work.delivered == [], "nothing of it used, nothing run"
    assert p in n.moves.ownership.awaiting
    (verdict,) = [m for _, m in n.transfers() if isinstance(m, Verdict)]
    assert not verdict.ok and "digest" in verdict.error
    assert n.refusals and n.refusals[0][0] == "malformed"
    cut = stream_of(p, 6)
    for chunk in cut[:1] + cut[2:]:  # a chunk missing
        n.receive(1, chunk)
    verdicts = [m for _, m in n.transfers() if isinstance(m, Verdict)]
    assert len(verdicts) == 2 and "missing" in verdicts[1].error, "refused once, the rest of it ignored"
    for chunk in stream_of(p, 7):  # the sender tries again: taken
        n.receive(1, chunk)
    assert [q for q, _ in n.work.imported] == [p] and n.work.delivered == [(p, 1)]


def test_a_refused_stream_is_sent_again_and_the_partition_kept_meanwhile() -> None:
    n = Node(1)
    n.moves.sync()
    n.add(2)
    n.moves.sync()
    p = min(n.moves.ownership.draining)
    n.moves.tick(n.now)
    first = [m for _, m in n.transfers() if isinstance(m, Chunk) and m.partition == p]
    n.receive(2, Verdict("handover", first[0].stream, p, False, "digest does not match"))
    assert p in n.moves.ownership.draining and p not in n.work.handed
    n.now += n.config.rto + 0.01
    n.ack_all(2)
    n.moves.tick(n.now)
    again = [m for _, m in n.transfers() if isinstance(m, Chunk) and m.partition == p and m.seq == 0]
    assert len(again) == 2 and again[1].stream != again[0].stream, "a fresh stream"
    n.receive(2, Verdict("handover", again[1].stream, p, True))
    assert p in n.work.handed and p not in n.moves.ownership.draining


def test_a_stream_refused_for_coming_early_does_not_count_as_handed_over() -> None:
    """A handover that reached this node before its view gave it the partition, and was sent back
    because the view still had another owner, is not the partition's state here: when the view
    then gives it the partition (its holder leaving), it waits for the stream sent again instead
    of starting without the state (nemesis seeds 612, 657, 659: counts lost)."""
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    theirs = [p for p in range(PARTITIONS) if n.moves.ownership.owners[p] == 1]
    p = theirs[0]
    for chunk in stream_of(p, 41):  # 1 leaves, and its view already gives p to 2: its stream comes
        n.receive(1, chunk)
    n.moves.tick(n.now)  # ours does not yet: sent back
    (verdict,) = [m for _, m in n.transfers() if isinstance(m, Verdict)]
    assert not verdict.ok and "does not own" in verdict.error and n.work.imported == []
    n.membership.leaving(1)  # now our view has it leave too: p is ours, from a live holder
    n.moves.sync()
    assert p in n.moves.ownership.awaiting and p not in n.owned(), "wait for the state, do not start without it"
    n.moves.buffer(None, Env(p, 1))
    assert n.work.delivered == []
    for chunk in stream_of(p, 42):  # sent again
        n.receive(1, chunk)
    assert [q for q, _ in n.work.imported] == [p] and n.work.delivered == [(p, 1)] and p in n.owned()


def test_a_receiver_that_dies_mid_stream_is_replaced_by_the_next_owner() -> None:
    n = Node(1, 2)
    n.moves.sync()
    n.add(3)
    n.moves.sync()
    going = {p: t for p, t in n.moves.ownership.draining.items() if t == 3}
    assert going
    n.moves.tick(n.now)
    n.membership.left(3)
    n.moves.previous_gone(3, "meter#3")
    n.moves.sync()  # 3 is gone from the view: what it was getting goes back to its owner
    for p in going:
        assert p in n.owned() or n.moves.ownership.draining.get(p) == 2
    assert not set(going) & set(n.work.forgotten + n.work.handed), "nothing let go: 3 never said it had them"


def test_a_previous_owner_that_dies_is_not_waited_for() -> None:
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    p = min(n.moves.ownership.awaiting)
    n.moves.buffer(None, Env(p, 7))
    n.moves.previous_gone(1, "meter#1")
    assert p in n.owned() and (p, 7) in n.work.delivered


def test_a_handover_that_never_comes_is_taken_after_the_timeout() -> None:
    n = Node(2, 1, holding=(1,), stateful=False)
    n.moves.sync()
    waiting = set(n.moves.ownership.awaiting)
    n.now = n.config.handover_timeout - 0.1
    n.moves.tick(n.now)
    assert not n.owned() & waiting
    n.now = n.config.handover_timeout + 0.1
    n.moves.tick(n.now)
    assert waiting <= n.owned() and not n.moves.ownership.awaiting


def test_with_state_a_partition_is_not_taken_while_a_live_instance_still_holds_it() -> None:
    n = Node(2, 1, holding=(1,), stateful=True)
    n.moves.sync()
    waiting = set(n.moves.ownership.awaiting)
    n.now = n.config.handover_timeout + 0.1
    n.moves.tick(n.now)
    assert not n.owned() & waiting, "its state is there: starting without it would lose it"
    n.membership.peers[1].holding = b""  # it handed them on (to someone else) meanwhile
    n.now += n.config.handover_timeout
    n.moves.tick(n.now)
    assert waiting <= n.owned()


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
        keep: list[int] = []  # (nothing acknowledged early here)
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


def envelope(seq: int, partition: int, msg_id: bytes) -> Any:
    raw = core.pack_envelope(seq, wire.KIND_EVENT, 0, b"Tick", b"k", partition, msg_id, msg_id, bytes(16), b"\x91\xa1k")
    (env,) = core.parse_envelopes(raw)
    return env


class Original:
    """The channel an arrival came on (what a forward completes once acknowledged)."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self.reorder = self
        self.closed = False

    def complete(self, seq: int) -> None:
        self.completed.append(seq)


def test_an_arrival_forwarded_on_a_stale_view_and_sent_back_keeps_its_place() -> None:
    """A producer whose view is newer sends here while ours still gives the partition to its old
    owner: we forward it there, and that owner, draining the partition to us, sends it back. The
    producer's next message of the key came straight here after our view caught up, and waits in
    the same queue: the first still runs first (nemesis durable seed 2155 ran them the other way)."""
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    theirs = min(p for p in range(PARTITIONS) if n.moves.ownership.state[p] == "unowned")
    first = envelope(1, theirs, b"1" * 16)
    assert n.moves.forward(Original(), first) is True, "our view: instance 1 owns it"
    n.membership.leaving(1)  # our view catches up: 1 drains the partition to us
    n.moves.sync()
    assert n.moves.ownership.state[theirs] == "awaiting"
    assert n.moves.buffer(Original(), envelope(2, theirs, b"2" * 16)) is True, "the next one, straight here"
    assert n.moves.buffer(Original(), envelope(9, theirs, b"1" * 16)) is True, "the first, sent back by 1"
    for chunk in stream_of(theirs, 5):
        n.receive(1, chunk)
    assert n.work.delivered == [(theirs, 9), (theirs, 2)], "in the order they reached this node first"


def test_a_partition_ours_at_once_stays_closed_while_a_forward_of_it_is_out() -> None:
    """The same, but the old owner's hand-over came before our view caught up: the partition is
    ours at once, with nothing to wait for. While our forward of it is out, new arrivals still
    wait in its queue, and the forward sent back takes its place ahead of them (nemesis durable
    seed 5098 ran the later one first)."""
    n = Node(2, 1, holding=(1,))
    n.moves.sync()
    theirs = min(p for p in range(PARTITIONS) if n.moves.ownership.state[p] == "unowned")
    assert n.moves.forward(Original(), envelope(1, theirs, b"1" * 16)) is True, "our view: instance 1 owns it"
    for chunk in stream_of(theirs, 5):  # 1 drains it to us before we hear that it leaves
        n.receive(1, chunk)
    n.membership.leaving(1)
    n.moves.sync()
    assert n.moves.ownership.state[theirs] == "owned" and not n.moves.ownership.gate[theirs], "ours, closed"
    assert n.moves.buffer(Original(), envelope(2, theirs, b"2" * 16)) is True, "the next one waits"
    n.moves.tick(n.now)
    assert n.work.delivered == [], "still waiting for the forward"
    assert n.moves.buffer(Original(), envelope(9, theirs, b"1" * 16)) is True, "the first, sent back by 1"
    # no forward of it out, but what waits has not run yet: a new arrival still queues behind it
    # (found open, it ran first: nemesis seed 31674 of the 100 s schedules)
    assert not n.moves.ownership.gate[theirs]
    assert n.moves.buffer(Original(), envelope(3, theirs, b"3" * 16)) is True, "a new one waits behind them"
    n.moves.tick(n.now)
    assert n.work.delivered == [(theirs, 9), (theirs, 2), (theirs, 3)], "in the order they reached this node first"
    assert n.moves.ownership.gate[theirs], "open again: nothing waits, no forward of it out"


def test_a_durable_instance_owns_the_same_partitions_in_its_next_life() -> None:
    """Its rendezvous key comes from its persisted name, not its incarnation: a restarted instance
    takes back the partitions whose dedup ids it kept on disk, and every node agrees."""
    from choreo.runtime.membership import durable_key

    def ours(me: int, name: str | None, other: int = 7) -> set[int]:
        n = Node(me)
        if name is not None:
            n.membership.peers.pop(me)
            n.membership.upsert(Peer(me, f"fake://{me}", name, svc.spec(), 64, 1 << 20, 0.0, key=durable_key(name)))
        n.add(other)
        n.moves.sync()
        assert {p for p in range(PARTITIONS) if n.membership.owner("meter", p).incarnation == me} == n.owned()
        return n.owned()

    first, second = ours(101, "meter#east"), ours(202, "meter#east")  # two lives, two incarnations
    assert first == second and first
    lives = [ours(inc, None) for inc in (101, 202, 303, 404)]  # memory nodes: their incarnations decide
    assert len({frozenset(x) for x in lives}) > 1


def test_a_stream_carries_owed_outputs_that_a_node_before_them_ignores() -> None:
    import msgspec

    from choreo.runtime.transfer import Delta, StreamIn

    class OldPiece(msgspec.Struct, array_like=True, omit_defaults=True):  # a node from before owed outputs
        dedup: list[tuple[str, bytes]] = []
        results: list[tuple[bytes, float, float, bytes]] = []
        state: list[tuple[str, bytes, bytes]] = []

    owed = Delta(3, b"k", [], "Start", b"m" * 16, 1.0, b"\x01\x01", False, [("Notice", b"\x81\xa1k\xa1k")], b"t" * 16)
    pieces = iter([Piece(state=[("Tally", b"k", b"v")]), Piece(owed=[owed])])
    out = StreamOut("handover", 7, 3, pieces, chunk_bytes=64, clock=lambda: 5.0)
    inbound = None
    staged = None
    old_state = []
    while (raw := out.next_chunk()) is not None:
        chunk = decode_transfer(raw)
        assert isinstance(chunk, Chunk)
        inbound = inbound or StreamIn(chunk.stream, "handover", 3, max_bytes=1 << 20)
        staged = inbound.take(chunk, 5.0) or staged
        old_state += msgspec.msgpack.decode(chunk.body, type=OldPiece).state  # the owed outputs ignored
    assert old_state == [("Tally", b"k", b"v")]
    assert staged is not None and staged.owed == [owed] and staged.state == [("Tally", b"k", b"v")]
    assert staged.items == 1, "the item count (which an older receiver checks) leaves owed outputs out"


def test_arrivals_for_a_partition_that_drains_wait_here_so_its_hand_over_is_never_stuck_behind_them() -> None:
    """While a partition drains (a message of it still runs here), more than a window of arrivals
    for it come. Forwarded at once, they would fill the channel to the new owner, which keeps
    them unacknowledged until the hand-over; the hand-over, behind them, would never leave
    (durable seed 11122 of the 100 s schedules). They wait here, unacknowledged, and go on once
    the new owner has the partition, in their order, after its hand-over."""
    n = Node(1)
    n.moves.sync()
    n.add(2)
    n.moves.sync()
    p = min(n.moves.ownership.draining)
    n.work.lag = {p: 1}  # the drain waits for a message of p still in a handler here
    window = n.outbox.channel(n.membership.peers[2]).window.max_messages
    original = Original()
    arrivals = [envelope(seq, p, seq.to_bytes(16, "little")) for seq in range(1, 2 * window + 1)]
    for env in arrivals:
        assert n.moves.forward(original, env) is True
    n.work.lag = {}
    n.moves.tick(n.now)  # the drain ends: the hand-over leaves, with all the window's credit
    chunks = [m for _, m in n.transfers() if isinstance(m, Chunk) and m.partition == p and m.last]
    assert len(chunks) == 1, "the hand-over left (not stuck behind a window of forwards)"
    streamed = [m for _, m in n.transfers() if isinstance(m, Chunk)]  # (of every partition that moves)
    assert n.work.delivered == [] and n.outbox.out[2].window.in_flight == len(streamed), "only hand-overs are out"
    chunk = chunks[0]
    n.receive(2, Verdict("handover", chunk.stream, p, True))
    assert n.moves.ownership.state[p] == "handed_over"
    assert n.work.delivered == [(p, env.seq) for env in arrivals], "on their way, in their order"
    assert original.completed == [], "none acknowledged before the new owner has it"


def with_standby_copies(n: Node) -> Replicas:
    """``n`` keeps a standby copy of each partition it owns (``replicas=1``)."""
    replicas = n.moves.replicas = Replicas(
        n.moves.ownership, n.membership, n.moves.send_transfer, service="meter", config=n.config,
        clock=lambda: n.now, refused=lambda reason, detail: n.refusals.append((reason, detail)),
    )
    replicas.work = n.work  # type: ignore[assignment]
    return replicas


def test_a_standby_that_refuses_our_copy_gets_a_fresh_one_after_a_pause_that_doubles() -> None:
    """A standby that owns the partition in its own view refuses every copy until the views agree:
    each fresh copy waits longer (at the heal of a long partition, one sent at once after each
    refusal streamed the whole partition a thousand times a second for minutes), and a new view
    sends it at once."""
    n = Node(1, 2)
    with_standby_copies(n)
    n.moves.sync()
    p = min(n.owned())

    def copies() -> list[Chunk]:
        return [m for _, m in n.transfers() if isinstance(m, Chunk) and m.purpose == "copy" and m.partition == p
                and m.seq == 0]

    def refuse() -> None:
        n.receive(2, Verdict("copy", copies()[-1].stream, p, False, f"meter#2 owns partition {p} in its view"))

    assert len(copies()) == 1, "the standby gets a copy of what this node owns"
    refuse()
    n.moves.tick(n.now)
    assert len(copies()) == 1, "not at once"
    pauses = []
    tick = n.config.tick
    for _ in range(13):
        sent = len(copies())
        started = n.now
        while len(copies()) == sent:
            assert n.now - started < 30, "a refused copy goes again"
            n.now += tick
            n.ack_all(2)
            n.moves.tick(n.now)
        pauses.append(n.now - started)
        refuse()
    most = n.config.rto_max
    wanted = [min(tick * 2**i, most) for i in range(13)]  # (from one tick: a crossing of a moment costs little)
    assert pauses == pytest.approx(wanted, abs=tick * 1.5), f"doubling, up to rto_max: {pauses}"
    assert sum(pauses[:-3]) < 2 * most, "ten copies in the first 16 s, not ten thousand"
    sent = len(copies())
    n.membership.upsert(Peer(3, "fake://3", "relay#3", Service("relay").spec(), 64, 1 << 20, n.now))
    n.moves.sync()  # a new view, which the standby's may agree with now
    assert len(copies()) == sent + 1, "a new view: the copy goes again at once"
    n.receive(2, Verdict("copy", copies()[-1].stream, p, True))
    assert p in n.moves.replicas.complete and not n.moves.replicas.retry, "checked out: the pauses start over"


def test_a_drain_that_takes_longer_than_the_handover_timeout_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    n = Node(1)
    n.moves.sync()
    n.add(2)
    n.moves.sync()
    p = min(n.moves.ownership.draining)
    n.work.lag = {p: 3}  # three of its messages never finish here
    for _ in range(4):
        n.moves.tick(n.now)
        n.now += n.config.handover_timeout / 2
    said = [r.getMessage() for r in caplog.records if "has drained for" in r.getMessage()]
    assert said[0] == f"meter: partition {p} has drained for 8 s, towards meter#2; 3 messages in progress", said
    others = set(n.moves.ownership.draining) - {p}
    assert sorted(said[1:]) == sorted(f"meter: partition {q} has drained for 8 s, towards meter#2; its hand-over is out "
                                      "(0 refused so far)" for q in others), "the others wait for their verdicts"
    n.work.lag = {}
    n.moves.tick(n.now)
    assert p in n.moves.sending, "the drain is over: its hand-over goes"


def test_a_channel_that_closes_acknowledges_first_what_ran_on_it() -> None:
    """A sender the mesh declared dead may live on (or rejoin at the same endpoint and take the ack
    as its former life's): what ran here goes back acknowledged as its channel closes, with the
    copies of what still waits kept (``keep_ran``). Unacknowledged, it went again by partition
    and ran twice should this node rejoin too (the two-host heal)."""
    n = Node(1, 2)
    peer = n.membership.peers[2]
    out = OutChannel(2, n.membership.peers[1], window=64, window_bytes=1 << 20, rto=1.0, rto_max=8.0, max_batch=256,
                     max_batch_bytes=1 << 20)
    for i in range(3):
        out.append(Outgoing(wire.KIND_EVENT, 0, b"Tick", b"k", 0, bytes([i]) * 16, bytes(16), bytes(16), b"x", None), 0.0)
    body = out.take_body()
    assert body is not None
    ich = n.outbox.inbound_from(peer)
    for env in ich.reorder.feed(wire.frame(wire.DATA, 2, 1, body), wire.HEADER_SIZE):
        if env.seq < 3:
            ich.reorder.complete(env.seq)  # two ran; the third waits for its turn (it will not run here)
    kept: list[Any] = []
    n.sent.clear()
    n.outbox.close(2, lambda channel: (kept.append(channel), n.outbox.keep(channel, 2, True)))  # (as keep_all_ran does)
    assert kept == [ich] and ich.closed
    (ack,) = [frame for endpoint, frame in n.sent if endpoint == peer.endpoint and wire.parse_header(frame)[0] == wire.ACK]
    out.on_ack(ack, wire.HEADER_SIZE, 0.1, listed=bool(wire.parse_header(ack)[1] & wire.FLAG_KEEP))
    assert out.window.in_flight == 1, "the two that ran are acknowledged, the third is not"
    assert [item.home for item in out.custody.values()] == [out.peer.endpoint], (
        "the one that still waits for its outputs is kept, to come back here, where its id is")
    n.sent.clear()
    n.outbox.close(2, lambda channel: kept.append(channel))
    assert not n.sent and len(kept) == 1, "once"


def test_an_arrival_no_instance_owns_waits_unless_this_node_held_its_partition_last() -> None:
    # the whole service stops: every instance leaves, so no partition has an owner. An arrival
    # (from a sender that has not heard yet) for a partition this node never had must not run
    # here, without its dedup ids (chaos pipeline seed 7 on hosts: a newcomer ran events the
    # other instance had run); one this node drained with nobody to take it runs here, its ids here
    n = Node(1, 2)
    n.moves.sync()
    mine = min(n.owned())
    theirs = min(set(range(PARTITIONS)) - n.owned())
    n.membership.leaving(1)
    n.membership.leaving(2)
    n.moves.sync()
    n.moves.tick(n.now)
    assert n.moves.ownership.state[mine] == "handed_over", "drained, with nobody to take it"
    channel = type("In", (), {"closed": False, "peer": n.membership.peers[2]})()
    assert n.moves.forward(channel, Env(theirs, 1)), "kept: it does not run here"
    assert not n.moves.forward(channel, Env(mine, 2)), "it runs here"
    assert not n.moves.busy, "what waits for an owner does not hold up the leave"
    n.add(3)  # an instance comes after all: what waited goes on to it
    n.moves.sync()
    assert n.work.delivered == [(theirs, 1)]
