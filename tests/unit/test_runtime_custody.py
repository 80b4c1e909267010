"""A copy kept beyond its ack: what a receiver that hands a message over running asks of its
sender (``FLAG_KEEP`` in its acks, ``RELEASE`` once the outputs are acknowledged), and what the
sender does with the copy (channels.py; the end to end case is in tests/sim/test_state.py)."""

from __future__ import annotations

import pytest

from choreo import core, wire
from choreo.config import NodeConfig
from choreo.errors import ProtocolError
from choreo.runtime.channels import InChannel, OutChannel, Outgoing
from choreo.runtime.holds import Hold, Holds
from choreo.runtime.membership import Peer
from choreo.runtime.outbox import Outbox
from choreo.runtime.stats import Counters

SENDER, RECEIVER = 11, 22


class _NoWire:
    def send(self, endpoint: str, frame: bytes) -> None: ...


def peer(incarnation: int) -> Peer:
    return Peer(incarnation=incarnation, endpoint=f"inproc://n{incarnation}", node=f"n{incarnation}", service=None,
                window=64, max_message_bytes=1 << 20, last_heard=0.0)


def event(n: int) -> Outgoing:
    return Outgoing(core.KIND_EVENT, 0, b"Tick", b"k", 0, n.to_bytes(16, "big"), b"t" * 16, b"c" * 16, b"payload", None)


def channel(receiver: int = RECEIVER) -> OutChannel:
    return OutChannel(SENDER, peer(receiver), window=64, window_bytes=1 << 20, rto=0.2, rto_max=2.0,
                      max_batch=256, max_batch_bytes=1 << 20)


def handled(out: OutChannel) -> InChannel:
    """The receiver's channel, which has handled everything ``out`` sends it now."""
    body = out.take_body()
    assert body is not None
    receiver = out.peer.incarnation
    inbound = InChannel(receiver, peer(SENDER), window=64)
    for env in inbound.reorder.feed(wire.frame(wire.DATA, SENDER, receiver, body), wire.HEADER_SIZE):
        inbound.reorder.complete(env.seq)
    return inbound


def connected(n: int) -> tuple[OutChannel, InChannel]:
    """A sender's channel with envelopes 1..n sent, and the receiver's, which has handled them all."""
    out = channel()
    for i in range(1, n + 1):
        out.append(event(i), now=0.0)
    return out, handled(out)


def deliver_ack(out: OutChannel, frame: bytes) -> None:
    """An ACK frame to its sender's channel, as ``Returns.on_ack_frame`` gives it."""
    _, flags, _, _ = wire.parse_header(frame)
    out.on_ack(frame, wire.HEADER_SIZE, now=0.1, listed=bool(flags & wire.FLAG_KEEP))


def test_the_ack_that_frees_a_handed_over_message_asks_its_sender_to_keep_a_copy() -> None:
    out, inbound = connected(3)
    inbound.keep.append(2)  # message 2 went running with its partition: acknowledged before its outputs
    assert inbound.take_ack() is None, "while it asks for a copy, the ack rides on no other frame"
    deliver_ack(out, inbound.ack_frame())
    assert out.window.in_flight == 0, "every message is acknowledged: the window is free"
    assert list(out.custody) == [(2).to_bytes(16, "big")], "and message 2 alone is kept"
    assert not out.idle, "not done (a flush or a drain waits) until message 2 is released"
    deliver_ack(out, inbound.ack_frame())  # every later ack asks again: nothing more to copy
    assert len(out.custody) == 1


def test_a_receiver_that_goes_has_the_copies_sent_on_first_and_one_that_releases_them_does_not() -> None:
    out, inbound = connected(3)
    inbound.keep.extend([1, 3])
    deliver_ack(out, inbound.ack_frame())
    out.append(event(4), now=0.2)  # sent since, not acknowledged yet
    out.take_body()
    out.release([(3).to_bytes(16, "big")])  # message 3's outputs are acknowledged at the receiver
    resent = out.evacuate()  # the receiver died, or left
    assert [item.msg_id for item in resent] == [(1).to_bytes(16, "big"), (4).to_bytes(16, "big")], \
        "the kept copy of 1 goes first, then what was in flight; 3 was released"
    assert resent[0].raw is not None and resent[0].on_done is None
    assert not out.custody


def test_a_kept_message_is_done_for_its_sender_when_released_not_at_the_ack_that_asks_for_the_copy() -> None:
    # its sender acknowledges its own input once this message is done: done at the ack, the input
    # was acknowledged on the strength of a copy that dies with the sender (saga replicas 70)
    out = channel()
    done: list[int] = []
    for n in (1, 2, 3):
        item = event(n)
        item.on_done = lambda n=n: done.append(n)
        out.append(item, now=0.0)
    inbound = handled(out)
    inbound.keep.extend([2, 3])  # relieved, or handed over running: acknowledged before they are done
    deliver_ack(out, inbound.ack_frame())
    assert done == [1], "2 and 3 are not done yet: only their copies are kept"
    out.release([(2).to_bytes(16, "big")])
    assert done == [1, 2], "done once released"
    (copy,) = out.evacuate()  # the receiver went before it released 3
    assert copy.msg_id == (3).to_bytes(16, "big") and done == [1, 2]
    assert copy.on_done is not None, "the copy sent on to the next owner is done when that owner acknowledges it"
    copy.on_done()
    assert done == [1, 2, 3]


def test_an_ack_that_no_longer_lists_a_copy_releases_it_whatever_order_acks_arrive_in() -> None:
    out, inbound = connected(3)
    inbound.keep.extend([1, 2])
    asking = inbound.ack_frame()
    deliver_ack(out, asking)
    assert len(out.custody) == 2
    inbound.keep.remove(1)  # message 1's outputs are acknowledged: its RELEASE frame was lost
    deliver_ack(out, inbound.ack_frame())
    assert list(out.custody) == [(2).to_bytes(16, "big")], "the next ack, without 1, releases it"
    deliver_ack(out, asking)  # the first ack again, late (reordered or duplicated)
    assert list(out.custody) == [(2).to_bytes(16, "big")], "a late ack brings no copy back"
    inbound.keep.clear()  # and message 2's: an ack with no list at all (as one riding on a DATA frame)
    out.on_ack(inbound.ack_frame(), wire.HEADER_SIZE, now=0.2)
    assert not out.custody and out.custody_bytes == 0 and out.idle


def test_keep_requests_and_releases_are_bounded_and_refused_when_malformed() -> None:
    frame = wire.frame(wire.ACK, RECEIVER, SENDER, wire.keep_prefix([5, 7]) + b"ack", flags=wire.FLAG_KEEP)
    assert wire.split_keep(frame) == ([5, 7], [], len(frame) - 3)
    ran = wire.frame(wire.ACK, RECEIVER, SENDER, wire.keep_prefix([5, 7], {7}) + b"ack", flags=wire.FLAG_KEEP)
    assert wire.split_keep(ran) == ([5, 7], [7], len(ran) - 3), "7 ran there: marked, the seq itself unchanged"
    short = wire.frame(wire.ACK, RECEIVER, SENDER, wire.KEEP_COUNT.pack(3) + wire.KEEP_SEQ.pack(1), flags=wire.FLAG_KEEP)
    with pytest.raises(ProtocolError, match="overrun"):
        wire.split_keep(short)
    with pytest.raises(ProtocolError, match="no room"):
        wire.split_keep(wire.frame(wire.ACK, RECEIVER, SENDER, b"", flags=wire.FLAG_KEEP))
    release = wire.encode_control(wire.RELEASE, RECEIVER, SENDER, wire.Release([b"x" * 16]))
    assert wire.decode_control(wire.RELEASE, release).ids == [b"x" * 16]
    with pytest.raises(ProtocolError, match="malformed"):
        wire.decode_control(wire.RELEASE, wire.encode_control(wire.RELEASE, RECEIVER, SENDER, wire.Release([b"short"])))
    oversized = wire.frame(wire.RELEASE, RECEIVER, SENDER, b"\x00" * (wire.MAX_CONTROL_BYTES[wire.RELEASE] + 1))
    with pytest.raises(ProtocolError, match="oversized"):
        wire.decode_control(wire.RELEASE, oversized)


def test_a_receiver_that_never_releases_holds_at_most_the_windows_bytes_of_copies() -> None:
    out = OutChannel(SENDER, peer(RECEIVER), window=64, window_bytes=1000, rto=0.2, rto_max=2.0,
                     max_batch=256, max_batch_bytes=1 << 20)
    inbound = InChannel(RECEIVER, peer(SENDER), window=64)
    for round_ in range(5):  # a hostile receiver asks to keep everything, round after round
        first = round_ * 5 + 1
        for i in range(first, first + 5):
            out.append(event(i), now=0.0)
        body = out.take_body()
        assert body is not None
        for env in inbound.reorder.feed(wire.frame(wire.DATA, SENDER, RECEIVER, body), wire.HEADER_SIZE):
            inbound.reorder.complete(env.seq)
        inbound.keep[:] = list(range(first, first + 5))
        deliver_ack(out, inbound.ack_frame())
    assert 0 < out.custody_bytes <= 1000
    assert out.custody_bytes == sum(len(item.raw) for item in out.custody.values())
    assert (25).to_bytes(16, "big") in out.custody, "the newest copies stay, the oldest went"


def test_a_copy_on_its_way_to_its_receivers_next_life_keeps_that_home_if_its_sender_rejoins_first() -> None:
    # the two-host heal, traced: the receiver ran message 2 and rejoined; its sender sent the copy
    # to the receiver's next life (which has its id), then rejoined as well before the ack. The
    # copy came back from the window without its home, went by partition and ran again there.
    out, inbound = connected(3)
    inbound.keep.append(2)
    inbound.ran.add(2)
    deliver_ack(out, inbound.ack_frame())
    (copy,) = out.evacuate()  # the receiver's last life is gone
    assert copy.home == out.peer.endpoint, "it ran there: its copy goes to the next life at that endpoint"
    next_life = channel(RECEIVER + 1)
    next_life.append(copy, now=0.3)
    next_life.append(event(4), now=0.3)
    assert next_life.take_body() is not None
    back = next_life.evacuate()  # the sender rejoins before either is acknowledged
    assert [(item.msg_id, item.home) for item in back] == [((2).to_bytes(16, "big"), out.peer.endpoint),
                                                          ((4).to_bytes(16, "big"), None)], \
        "the copy goes home again from the sender's new life; the rest goes by partition"

    again = channel(RECEIVER + 1)
    again.append(back[0], now=0.4)
    deliver_ack(again, handled(again).ack_frame())  # (a duplicate there: done)
    assert not again.homes, "acknowledged: its home is forgotten at the ack"
    assert again.evacuate() == [], "and nothing comes back"


def test_a_forward_that_ran_at_its_target_reopens_its_partition_before_the_copy_is_released() -> None:
    # a forward keeps its partition closed until done; kept as one that ran there (KEEP_RAN), it
    # is done only at the release, which may wait for a flow that comes back to that partition
    class Forward:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def ran_at_target(self) -> None:
            self.calls.append("ran")

        def __call__(self) -> None:
            self.calls.append("done")

    out = channel()
    forward = Forward()
    item = event(1)
    item.on_done = forward
    out.append(item, now=0.0)
    inbound = handled(out)
    inbound.keep.append(1)
    inbound.ran.add(1)
    deliver_ack(out, inbound.ack_frame())
    deliver_ack(out, inbound.ack_frame())  # (every ack lists it again until the release)
    assert forward.calls == ["ran"], "its partition reopens once; the forward is not done yet"
    out.release([(1).to_bytes(16, "big")])
    assert forward.calls == ["ran", "done"]


def test_a_hold_waits_for_the_copies_its_old_owner_kept_without_running_them() -> None:
    # chaos seed 700: a joiner held the producer's messages of a partition while it waited for a
    # dead member, relieved its channel (acknowledged them, the producer keeping copies), and
    # forwarded them to the partition's owner 4 s later, 0.15 s after the producer's next messages
    # of the same keys had run there: the hold had passed at the ack
    out = channel()
    for n, partition in ((1, 5), (2, 5), (3, 7)):
        item = event(n)
        item.partition = partition
        out.append(item, now=0.0)
    inbound = handled(out)
    inbound.keep.extend([2, 3])  # relieved: acknowledged, not run
    deliver_ack(out, inbound.ack_frame())
    assert out.done_upto == 3
    holds = Holds()
    holds.by_key[("svc", 5)] = Hold(out, 5, 3)
    holds.by_key[("svc", 7)] = Hold(out, 7, 3)
    holds.by_key[("svc", 9)] = Hold(out, 9, 3)
    assert sorted(p for _, p, _ in holds.release(out)) == [9], "5 and 7 each have a copy not run there"
    inbound.ran.add(2)  # message 2 ran there: its key's order is kept
    deliver_ack(out, inbound.ack_frame())
    assert [p for _, p, _ in holds.release(out)] == [5]
    out.release([(3).to_bytes(16, "big")])  # message 3 is done there (ran, or passed on and acknowledged)
    assert [p for _, p, _ in holds.release(out)] == [7]


def test_a_receiver_says_a_kept_message_ran_once_it_did_and_only_for_copies_still_kept() -> None:
    out, inbound = connected(3)
    receiver = Outbox(_NoWire(), NodeConfig(window=64), clock=lambda: 0.0, holds=Holds(), counters=Counters())
    receiver.incarnation = RECEIVER
    receiver.keep(inbound, 2)  # relieved while they waited for their partition: not run yet
    receiver.keep(inbound, 3)
    deliver_ack(out, inbound.ack_frame())
    assert out.kept_not_ran() == {0: 2}, "the sender keeps both, neither run there"
    receiver.kept_ran([(inbound, 2), (inbound, 1)])  # 2 ran now; 1 was never kept
    assert inbound.ran == {2} and inbound.keep == [2, 3], "1 is not kept on the strength of having run"
    deliver_ack(out, inbound.ack_frame())
    assert out.kept_not_ran() == {0: 3}, "the ack says 2 ran: a hold no longer waits for it"
    inbound.closed = True  # its sender is gone: nothing more to say on this channel
    receiver.kept_ran([(inbound, 3)])
    assert inbound.ran == {2}
