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


def test_a_last_word_settles_its_receiver_what_it_did_not_cover_goes_again() -> None:
    outbox, former, items, inbound = died_with_three_in_flight()
    assert former.unsettled(now=0.5) == 3, "the new life waits for acks to all three (it does not join)"
    (last,) = inbound.last_word()
    _, flags, _, _ = wire.parse_header(last)
    assert flags & wire.FLAG_LAST
    assert former.take_ack(outbox, RECEIVER, wire.ACK, last, flags, CONNECTION, None, now=0.5) == 0, \
        "its last word: nothing more may be acknowledged late, the new life may join"
    assert list(outbox.waiting["orders"]) == [items[2]], "1 and 2 were handled there; 3 was not taken, and goes again"
    assert former.take_ack(outbox, RECEIVER, wire.ACK, last, flags, CONNECTION, None, now=0.6) is None, \
        "a repeated last word changes nothing: stale"


def test_nothing_is_unsettled_once_the_moment_is_over() -> None:
    _, former, _, _ = died_with_three_in_flight()
    assert former.unsettled(now=0.9) == 3
    assert former.unsettled(now=1.1) == 0, "no ack came: after rto the three go again (the new life joins)"


class Sent:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def send(self, endpoint: str, frame: bytes) -> None:
        self.frames.append((endpoint, frame))

    def acks(self) -> list[tuple[int, int, int, int]]:
        """(flags, sender, receiver, cumulative ack) of every ACK frame sent so far, then forgets them."""
        out = []
        for _, data in self.frames:
            frame_type, flags, sender, receiver = wire.parse_header(data)
            if frame_type == wire.ACK:
                offset = wire.split_keep(data)[1] if flags & wire.FLAG_KEEP else wire.HEADER_SIZE
                out.append((flags, sender, receiver, core.decode_ack(data, offset)[0]))
        self.frames.clear()
        return out


def receiving_three_as_it_rejoins() -> tuple[Outbox, Sent, InChannel, FormerLife]:
    """RECEIVER's life got envelopes 1..3 from a sender's life OLD; it runs 1 and 2, then is
    declared dead and rejoins (3 was released to its handler but not started)."""
    sent = Sent()
    outbox = Outbox(sent, NodeConfig(window=64), clock=lambda: 0.0, holds=Holds(), counters=Counters())
    outbox.incarnation = RECEIVER
    peer = Peer(OLD, "inproc://n11", "p#11", None, 64, 1 << 20, 0.0)
    inbound = outbox.inbound[OLD] = InChannel(RECEIVER, peer, window=64)
    body = b"".join(core.pack_envelope(n, core.KIND_EVENT, 0, b"Tick", b"k", 0, n.to_bytes(16, "big"), b"t" * 16,
                                       b"c" * 16, b"x") for n in (1, 2, 3))
    assert len(inbound.reorder.feed(wire.frame(wire.DATA, OLD, RECEIVER, body), wire.HEADER_SIZE)) == 3
    former = FormerLife(RECEIVER, until=1.0)
    outbox.evacuate_all(NEW, former)
    return outbox, sent, inbound, former


def test_a_handler_running_as_its_node_rejoins_is_acknowledged_to_its_senders_last_life_then_the_last_word() -> None:
    outbox, sent, inbound, _ = receiving_three_as_it_rejoins()
    assert inbound.closed, "nothing more is delivered on the last life's channel"
    outbox.flush()
    assert all(cumulative == 0 and not flags for flags, _, _, cumulative in sent.acks()), "1 and 2 run: nothing done yet"
    inbound.reorder.complete(1)
    outbox.ack_later(inbound)
    outbox.flush()
    assert sent.acks() == [(0, RECEIVER, OLD, 1)], "what finished is acknowledged, from the last life to the sender's"
    inbound.reorder.complete(2)
    inbound.given_up += 1  # 3 is dropped unrun (its sender sends it again)
    outbox.flush()
    assert sent.acks() == [(wire.FLAG_LAST, RECEIVER, OLD, 2)], "nothing runs any more: the last word, without 3"
    outbox.flush()
    assert sent.acks() == [], "said once"


def test_once_the_moment_is_over_the_last_life_acknowledges_nothing() -> None:
    outbox, sent, inbound, former = receiving_three_as_it_rejoins()
    former.end()
    inbound.reorder.complete(1)
    outbox.ack_later(inbound)
    outbox.flush()
    assert sent.acks() == [], "too late: its sender sends it again (its window for late acks is over too)"


def test_a_last_word_covers_every_done_range_however_many() -> None:
    # every other envelope of 100 done: 50 ranges, more than one ack carries (32); the last word
    # takes a turn through all of them from the bottom, whatever turn the acks before were on
    inbound = InChannel(RECEIVER, Peer(OLD, "inproc://n11", "p#11", None, 256, 1 << 20, 0.0), window=256)
    body = b"".join(core.pack_envelope(n, core.KIND_EVENT, 0, b"Tick", b"k", 0, n.to_bytes(16, "big"), b"t" * 16,
                                       b"c" * 16, b"x") for n in range(1, 101))
    inbound.reorder.feed(wire.frame(wire.DATA, OLD, RECEIVER, body), wire.HEADER_SIZE)
    for n in range(2, 101, 2):
        inbound.reorder.complete(n)
    inbound.ack_frame()  # (an ack of the first 32 ranges went before: the next turn would start above them)
    frames = inbound.last_word()
    flags = [wire.parse_header(frame)[1] for frame in frames]
    assert len(frames) == 2 and flags == [0, wire.FLAG_LAST], "two acks, the second its last word"
    covered = set()
    for frame in frames:
        cumulative, _, ranges = core.decode_ack(frame, wire.HEADER_SIZE)
        covered |= {seq for lo, hi in ranges for seq in range(lo, hi + 1)} | set(range(1, cumulative + 1))
    assert covered == set(range(2, 101, 2)), "each done envelope, and none other"
