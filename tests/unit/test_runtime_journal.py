"""The journal on its own: what a durable node's outbox writes, when, and what a restart reads back.

An :class:`Outbox` with a journal over a :class:`MemoryStore`, a fake sender, and hand-made
peers: batches taken from a channel become rows, acknowledgements delete them (or keep them
from ever being written), envelopes waiting for an instance get rows of their own in the order
they must be sent again, a failed commit keeps everything for the next one, and a restarted
node finds what was not acknowledged, in order.
"""

from __future__ import annotations

from choreo import Event, Service, core, wire
from choreo.config import NodeConfig
from choreo.errors import StoreFull
from choreo.runtime.channels import Outgoing
from choreo.runtime.holds import Holds
from choreo.runtime.journal import Journal
from choreo.runtime.membership import Membership, Peer
from choreo.runtime.outbox import Outbox
from choreo.runtime.stats import Counters
from choreo.runtime.store import MemoryStore


class Reading(Event, key="k"):
    k: str


meter = Service("meter")
meter.on(Reading)(lambda ev: None)


class Node:
    endpoint = "fake://me"

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.now = 0.0
        self.frames: list[bytes] = []
        self.store = store or MemoryStore()
        self.store.open(service=None, name="client#1", fsync="batch")
        self.journal = Journal(self.store, clock=lambda: self.now, wall=lambda: 1e9 + self.now,
                               call_later=lambda delay, fn: None)
        self.outbox = Outbox(self, NodeConfig(window=64), clock=lambda: self.now, holds=Holds(), counters=Counters(),
                             journal=self.journal)
        self.outbox.start(None, 1)
        self.peer = Peer(9, "fake://meter", "meter#9", meter.spec(), 64, 1 << 20, 0.0)

    def send(self, endpoint: str, frame: bytes) -> None:
        self.frames.append(frame)

    def item(self, n: int, kind: int = wire.KIND_EVENT) -> Outgoing:
        return Outgoing(kind, 0, b"Reading", b"k", 0, n.to_bytes(16, "little"), bytes(16), bytes(16), b"%d" % n, None)

    def emit(self, *ns: int) -> None:
        ch = self.outbox.channel(self.peer)
        for n in ns:
            self.outbox.append(ch, self.item(n), self.now)

    def flush(self) -> None:
        self.outbox.flush()

    def ack(self, cumulative: int) -> None:
        ch = self.outbox.out[self.peer.incarnation]
        ch.on_ack(core.encode_ack(cumulative, cumulative, []), 0, self.now)

    def commit(self) -> None:
        assert self.journal.commit()
        self.journal.settle()

    def stored(self) -> list[int]:
        """The message numbers in the store's outbox, in row order."""
        return [int(env.payload) for _, _, body, acked in self.store.load().outbox
                for env in core.parse_envelopes(body) if not (acked and env.seq <= acked)]


def test_a_batch_acknowledged_before_its_commit_is_never_written() -> None:
    n = Node()
    n.emit(1, 2, 3)
    n.flush()  # sent; nothing waits on a commit yet
    n.ack(3)
    n.commit()
    assert n.store.outbox == {} and n.store.commits == 0


def test_a_written_batch_goes_when_its_receiver_acknowledges_all_of_it() -> None:
    n = Node()
    n.emit(1, 2, 3)
    n.flush()
    n.commit()
    assert n.stored() == [1, 2, 3]
    n.ack(2)
    n.commit()
    assert n.stored() == [3], "a restart would send again what was acknowledged"
    n.ack(3)
    n.commit()
    assert n.store.outbox == {}


def test_envelopes_waiting_for_an_instance_are_kept_in_the_order_they_must_leave() -> None:
    n = Node()
    n.outbox.park("meter", n.item(1))
    n.outbox.park("meter", n.item(2))
    n.commit()
    assert n.stored() == [1, 2]
    waiting = n.outbox.take_waiting("meter")  # routing found no instance again: they wait again, behind 3
    n.outbox.park("meter", n.item(3))
    for item in waiting:
        n.outbox.park("meter", item)
    n.commit()
    assert n.stored() == [3, 1, 2]
    ch = n.outbox.channel(n.peer)
    for item in n.outbox.take_waiting("meter"):  # an instance: into its window, their batch keeps them
        n.outbox.append(ch, item, n.now)
    n.flush()
    n.commit()
    assert n.stored() == [3, 1, 2] and len(n.store.outbox) == 1


def test_a_failed_commit_keeps_everything_for_the_next_one() -> None:
    store = MemoryStore(capacity=10)
    n = Node(store)
    n.emit(1, 2)
    n.flush()
    assert not n.journal.commit()
    assert isinstance(n.journal.failing, StoreFull) and store.outbox == {}
    n.emit(3)
    n.flush()
    store.capacity = None
    n.commit()
    assert n.stored() == [1, 2, 3] and n.journal.failing is None


def test_rows_nothing_refers_to_any_more_are_swept() -> None:
    n = Node()
    n.outbox.park("meter", n.item(1))
    n.outbox.park("retired", n.item(2))
    n.commit()
    n.outbox.take_waiting("retired")  # dropped some other way (an operator retired the service)
    n.journal._outbox = n.outbox
    n.journal._sweep()
    n.commit()
    assert n.stored() == [1]


def test_a_restarted_node_finds_what_was_not_acknowledged_in_order_and_nothing_else() -> None:
    n = Node()
    n.emit(1, 2, 3)
    n.flush()
    n.commit()
    n.ack(1)
    n.outbox.park("meter", n.item(4))
    n.outbox.park("meter", n.item(5, kind=wire.KIND_QUERY))  # a question nobody waits for after a restart
    n.commit()
    n.store.close()
    again = Node(n.store)
    membership = Membership()
    assert again.journal.restore(again.outbox, None, membership) == 3
    assert [int(item.payload) for item in again.outbox.waiting["meter"]] == [2, 3, 4]
    again.commit()  # rewritten as waiting envelopes, in that order
    assert again.stored() == [2, 3, 4]


def ack_keeping(n: Node, cumulative: int, *kept: int) -> None:
    """An ACK frame that asks for copies of ``kept`` (FLAG_KEEP: they are not done at the receiver)."""
    ch = n.outbox.out[n.peer.incarnation]
    frame = bytes(wire.HEADER_SIZE) + wire.keep_prefix(list(kept)) + core.encode_ack(cumulative, cumulative, [])
    ch.on_ack(frame, 0, n.now, listed=True)


def test_a_copy_kept_beyond_its_ack_stays_in_the_store_until_it_is_released() -> None:
    n = Node()
    n.emit(1, 2, 3, 4)
    n.flush()
    n.commit()
    ack_keeping(n, 4, 2, 3)  # acknowledged, 2 and 3 before they were done there (relief, a hand-over)
    n.commit()
    assert n.stored() == [2, 3], "a durable sender that restarts now would have lost the copies"
    ack_keeping(n, 4, 3)  # 2 released
    n.commit()
    assert n.stored() == [3]
    n.ack(4)  # 3 released: an ack that covers it no longer lists it
    n.commit()
    assert n.store.outbox == {} and not n.outbox.out[n.peer.incarnation].kept_records


def test_a_copy_kept_before_its_batch_was_committed_is_written_alone() -> None:
    n = Node()
    n.emit(1, 2, 3)
    n.flush()
    ack_keeping(n, 3, 2)
    n.commit()
    assert n.stored() == [2]
    n.ack(3)
    n.commit()
    assert n.store.outbox == {}


def test_a_partial_ack_does_not_mark_a_kept_copy_acknowledged() -> None:
    n = Node()
    n.emit(1, 2, 3, 4)
    n.flush()
    n.commit()
    ack_keeping(n, 3, 2)
    n.commit()
    assert n.stored() == [2, 3, 4], "restored, the batch must still send 2 (and what follows, for its order)"
    ack_keeping(n, 4, 2)
    n.commit()
    assert n.stored() == [2]


def test_a_restarted_sender_sends_a_kept_copy_again_in_its_place() -> None:
    n = Node()
    n.emit(1, 2)
    n.flush()
    n.commit()
    n.emit(3)
    n.flush()
    n.commit()
    ack_keeping(n, 2, 2)  # 2 kept; 3 (a later batch, its key's next event) not acknowledged yet
    n.commit()
    n.store.close()
    again = Node(n.store)
    assert again.journal.restore(again.outbox, None, Membership()) == 2
    assert [int(item.payload) for item in again.outbox.waiting["meter"]] == [2, 3]


def test_kept_copies_leave_the_store_when_their_receiver_is_gone() -> None:
    n = Node()
    n.emit(1, 2)
    n.flush()
    n.commit()
    ack_keeping(n, 2, 1)
    n.commit()
    assert n.stored() == [1], "the store keeps the copy while the receiver lives"
    resent = n.outbox.out[n.peer.incarnation].evacuate()  # sent elsewhere: new rows keep it from there
    n.commit()
    assert [int(item.payload) for item in resent] == [1] and n.store.outbox == {}
