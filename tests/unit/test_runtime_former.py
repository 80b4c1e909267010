"""Acks that reach a node's new life, addressed to its last one (runtime/former.py): what they
cover leaves the resend queue as done, from the old receiver's connection only, for a moment only
(the end-to-end case, a long partition's heal, is in tests/sim/test_partition.py)."""

from __future__ import annotations

import pytest

from choreo import core, wire
from choreo.config import NodeConfig
from choreo.errors import ProtocolError
from choreo.runtime.channels import InChannel, Outgoing
from choreo.runtime.former import FormerLife
from choreo.runtime.holds import Holds
from choreo.runtime.membership import Peer
from choreo.runtime.outbox import Outbox
from choreo.runtime.stats import Counters

OLD, NEW, RECEIVER = 11, 13, 22
CONNECTION = b"conn-22"


class Wire:
    def send(self, endpoint: str, frame: bytes) -> None: ...


def receiver() -> Peer:
    peer = Peer(incarnation=RECEIVER, endpoint="inproc://n22", node="orders#22", service=None, window=64,
                max_message_bytes=1 << 20, last_heard=0.0)
    peer.identity = CONNECTION
    return peer


def died_with_three_in_flight() -> tuple[Outbox, FormerLife, list[Outgoing], InChannel]:
    """A node whose life OLD sent events 1..3 to RECEIVER, which handled 1 and 2 (its ack not
    out yet), and then rejoined as NEW: the three wait to go again, parked for their service."""
    outbox = Outbox(Wire(), NodeConfig(window=64), clock=lambda: 0.0, holds=Holds(), counters=Counters())
    outbox.incarnation = OLD
    done: list[int] = []
    ch = outbox.channel(receiver())
    for n in (1, 2, 3):
        item = Outgoing(core.KIND_EVENT, 0, b"Tick", b"k", 0, n.to_bytes(16, "big"), b"t" * 16, b"c" * 16, b"x",
                        lambda n=n: done.append(n))
        outbox.append(ch, item, 0.0)
    body = ch.take_body()
    assert body is not None
    inbound = InChannel(RECEIVER, Peer(OLD, "inproc://n11", "p#11", None, 64, 1 << 20, 0.0), window=64)
    for env in inbound.reorder.feed(wire.frame(wire.DATA, OLD, RECEIVER, body), wire.HEADER_SIZE)[:2]:
        inbound.reorder.complete(env.seq)
    former = FormerLife(OLD, until=1.0)
    leftovers = outbox.evacuate_all(NEW, former)
    for service, item in leftovers:
        outbox.park(service or "orders", item)
    return outbox, former, [item for _, item in leftovers], inbound


def test_a_late_ack_takes_what_it_covers_out_of_the_resend_queue() -> None:
    outbox, former, items, inbound = died_with_three_in_flight()
    done = former.acknowledged(RECEIVER, wire.ACK, inbound.ack_frame(), 0, CONNECTION, None, now=0.5)
    assert [item.msg_id for item in done] == [n.to_bytes(16, "big") for n in (1, 2)], "handled there: done"
    assert all(outbox.unpark(item) for item in done)
    assert list(outbox.waiting["orders"]) == [items[2]], "the one it did not handle goes again"
    assert former.acknowledged(RECEIVER, wire.ACK, inbound.ack_frame(), 0, CONNECTION, None, now=0.6) == [], \
        "each once"


def test_a_late_ack_counts_only_from_the_old_receivers_connection_and_only_for_a_moment() -> None:
    _, former, _, inbound = died_with_three_in_flight()
    ack = inbound.ack_frame()
    assert former.acknowledged(RECEIVER, wire.ACK, ack, 0, b"someone else", None, now=0.5) == []
    assert former.acknowledged(RECEIVER, wire.ACK, ack, 0, CONNECTION, "another key", now=0.5) == []
    assert former.acknowledged(99, wire.ACK, ack, 0, CONNECTION, None, now=0.5) == []
    assert former.acknowledged(RECEIVER, wire.ACK, ack, 0, CONNECTION, None, now=1.5) == [], "too late"


def test_a_copy_the_late_ack_asks_to_keep_goes_again_and_a_malformed_one_is_refused() -> None:
    _, former, _, inbound = died_with_three_in_flight()
    inbound.keep.append(2)  # acknowledged before it was done (handed over running): its copy stays
    ack = inbound.ack_frame()
    _, flags, _, _ = wire.parse_header(ack)
    done = former.acknowledged(RECEIVER, wire.ACK, ack, flags, CONNECTION, None, now=0.5)
    assert [item.msg_id for item in done] == [(1).to_bytes(16, "big")]
    with pytest.raises(ProtocolError, match="malformed"):
        former.acknowledged(RECEIVER, wire.ACK, ack[: wire.HEADER_SIZE + 3], 0, CONNECTION, None, now=0.5)


def test_an_envelope_moved_from_another_channel_is_not_taken_for_the_one_in_flight_under_its_old_seq() -> None:
    # an envelope moved here from another channel (its receiver went) waits in the backlog still
    # encoded, under the seq it had there: a late ack for that seq here is not about it
    outbox = Outbox(Wire(), NodeConfig(window=1), clock=lambda: 0.0, holds=Holds(), counters=Counters())
    outbox.incarnation = OLD
    ch = outbox.channel(receiver())
    sent = Outgoing(core.KIND_EVENT, 0, b"Tick", b"k", 0, (1).to_bytes(16, "big"), b"t" * 16, b"c" * 16, b"x", None)
    outbox.append(ch, sent, 0.0)
    moved_id = (9).to_bytes(16, "big")
    raw = core.pack_envelope(1, core.KIND_EVENT, 0, b"Tick", b"k", 0, moved_id, b"t" * 16, b"c" * 16, b"y")
    moved = Outgoing(core.KIND_EVENT, 0, b"Tick", b"k", 0, moved_id, b"t" * 16, b"c" * 16, b"y", None, raw=raw)
    outbox.append(ch, moved, 0.0)  # (the window is full: it waits in the backlog)
    body = ch.take_body()
    assert body is not None
    inbound = InChannel(RECEIVER, Peer(OLD, "inproc://n11", "p#11", None, 1, 1 << 20, 0.0), window=1)
    for env in inbound.reorder.feed(wire.frame(wire.DATA, OLD, RECEIVER, body), wire.HEADER_SIZE):
        inbound.reorder.complete(env.seq)
    former = FormerLife(OLD, until=1.0)
    for service, item in outbox.evacuate_all(NEW, former):
        outbox.park(service or "orders", item)
    done = former.acknowledged(RECEIVER, wire.ACK, inbound.ack_frame(), 0, CONNECTION, None, now=0.5)
    assert [item.msg_id for item in done] == [(1).to_bytes(16, "big")]
    assert all(outbox.unpark(item) for item in done)
    assert [item.msg_id for item in outbox.waiting["orders"]] == [moved_id], "the moved one goes again"
