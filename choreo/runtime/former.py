"""What a node's last life sent and had not seen acknowledged, for the acks that come a moment late.

A node that hears it was declared dead rejoins as a new incarnation (the engine's
``declared_dead``): its channels are void, and what they held is sent again under the new life,
to the partitions' owners then. A receiver that handled one of those envelopes a moment before
may have its ack on the way, addressed to the old life. Refused as stale, that ack would leave
the envelope to go again to an owner that may lack its id, and run twice there: after a long
partition's heal every node hears it was declared dead at once, and the owners change with
everyone's new life (measured: one event per producer ran twice in 37 of 40 such schedules).

So for a moment (``rto``) the new life takes an ACK frame addressed to its last one, from the
connection and key the old receiver used, and what it covers leaves the resend queue as done.
Copies it asks to keep (``FLAG_KEEP``) stay there: only their receiver's release may let them go.

Both ends of such an ack may be rejoining at once (at a heal, every node is), so the moment is
kept on both sides:

* as a sender, the new life does not join (it routes nothing: its resends and new emits wait,
  in order) until every envelope in flight at the end of the last one is acknowledged late, or
  the moment is over (:meth:`FormerLife.unsettled`). Joined at once, it sent them again within a
  millisecond, to owners that lacked their ids, before the acks could come;
* as a receiver, the last life's inbound channels take no more envelopes, but the handlers
  running then still ack what they finish, addressed to their senders' last lives, under the
  last life's own incarnation (:attr:`acking`). Closed outright, an event handled as the heal
  came (its standby's ack, or its outputs', still due) was never acknowledged, and ran again at
  its next owner (measured: one per producer, in every schedule with standby copies or an
  emitting handler).
"""

from __future__ import annotations

from typing import Protocol

from .. import core, wire
from ..errors import ProtocolError
from .channels import InChannel, Outgoing
from .membership import Peer

__all__ = ["FormerLife"]


class _Parked(Protocol):
    def unpark(self, item: Outgoing) -> bool: ...


class FormerLife:
    """The in-flight envelopes of incarnation ``incarnation``, by receiver and seq, until ``until``.

    >>> former = FormerLife(0xA1, until=5.0)
    >>> former.acknowledged(0xB2, 2, b"", 0, None, None, now=1.0)  # nothing recorded for that sender
    []
    """

    def __init__(self, incarnation: int, until: float) -> None:
        self.incarnation = incarnation
        self.until = until
        # receiver incarnation -> (its connection, its key, seq -> envelope)
        self._sent: dict[int, tuple[bytes, str | None, dict[int, Outgoing]]] = {}
        self.acking: list[InChannel] = []  # the last life's inbound channels, still acking what finishes

    def unsettled(self, now: float) -> int:
        """How many recorded envelopes may yet be acknowledged late: 0 once every receiver's last
        life said its last word (:data:`~choreo.wire.FLAG_LAST`) or acknowledged them all, or the
        moment is over."""
        if now > self.until:
            return 0
        return sum(len(sent[2]) for sent in self._sent.values())

    def end(self) -> None:
        """The moment is over: what was not acknowledged goes again (or went); nothing acks any more."""
        self._sent.clear()
        for channel in self.acking:
            channel.late_acks = False
        self.acking.clear()

    def record(self, peer: Peer, in_flight: dict[int, Outgoing]) -> None:
        """What was in flight to ``peer`` when the life ended (only a peer bound to a connection:
        a late ack must come from that connection)."""
        if in_flight and peer.identity is not None:
            self._sent[peer.incarnation] = (peer.identity, peer.principal, in_flight)

    def take_ack(
        self, outbox: _Parked, sender: int, frame_type: int, data: bytes, flags: int, identity: bytes | None,
        principal: str | None, now: float,
    ) -> int | None:
        """Apply a late ack (see :meth:`acknowledged`): what it covers leaves ``outbox``'s waiting
        queues as done, its callbacks run. Returns how many envelopes may still be acknowledged
        late, or None if it changed nothing (stale)."""
        unsettled = self.unsettled(now)
        for item in self.acknowledged(sender, frame_type, data, flags, identity, principal, now):
            if outbox.unpark(item) and item.on_done is not None:
                item.on_done()
        left = self.unsettled(now)
        return None if left == unsettled else left

    def acknowledged(
        self, sender: int, frame_type: int, data: bytes, flags: int, identity: bytes | None, principal: str | None,
        now: float,
    ) -> list[Outgoing]:
        """The recorded envelopes that the ack in a frame from ``sender`` covers (an ACK frame, or
        one a DATA or REPLY frame carries), each returned once; none past :attr:`until`, or from
        another connection or key. ProtocolError if the ack is malformed."""
        sent = self._sent.get(sender)
        if sent is None or now > self.until or sent[0] != identity or sent[1] != principal:
            return []
        kept: list[int] = []
        if frame_type == wire.ACK:
            offset = wire.HEADER_SIZE
            if flags & wire.FLAG_KEEP:
                kept, offset = wire.split_keep(data)
        else:
            offset, length, _ = wire.split_ack(data, flags)
            if not length:
                return []
            data = data[: offset + length]
        try:
            cumulative, _, ranges = core.decode_ack(data, offset)
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"a late ack for our former life: {exc}") from None
        in_flight = sent[2]
        done = [seq for seq in in_flight
                if (seq <= cumulative or any(lo <= seq <= hi for lo, hi in ranges)) and seq not in kept]
        items = [in_flight.pop(seq) for seq in done]
        if not in_flight or (frame_type == wire.ACK and flags & wire.FLAG_LAST):
            del self._sent[sender]  # (its last word: what it did not cover was not taken, and goes again)
        return items
