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
"""

from __future__ import annotations

from .. import core, wire
from ..errors import ProtocolError
from .channels import Outgoing
from .membership import Peer

__all__ = ["FormerLife"]


class FormerLife:
    """The in-flight envelopes of incarnation ``incarnation``, by receiver and seq, until ``until``.

    >>> former = FormerLife(0xA1, until=5.0)
    >>> former.acknowledged(0xB2, 2, b"", 0, None, None, now=1.0)  # nothing recorded for that sender
    []
    """

    def __init__(self, incarnation: int, until: float) -> None:
        self.incarnation = incarnation
        self.until = until
        # receiver incarnation -> (its connection, its key, its endpoint, seq -> envelope)
        self._sent: dict[int, tuple[bytes, str | None, str, dict[int, Outgoing]]] = {}

    def record(self, peer: Peer, in_flight: dict[int, Outgoing]) -> None:
        """What was in flight to ``peer`` when the life ended (only a peer bound to a connection:
        a late ack must come from that connection)."""
        if in_flight and peer.identity is not None:
            self._sent[peer.incarnation] = (peer.identity, peer.principal, peer.endpoint, in_flight)

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
        ran: list[int] = []
        if frame_type == wire.ACK:
            offset = wire.HEADER_SIZE
            if flags & wire.FLAG_KEEP:
                kept, ran, offset = wire.split_keep(data)
        else:
            offset, length, _ = wire.split_ack(data, flags)
            if not length:
                return []
            data = data[: offset + length]
        try:
            cumulative, _, ranges = core.decode_ack(data, offset)
        except core.MalformedFrame as exc:
            raise ProtocolError("malformed", f"a late ack for our former life: {exc}") from None
        endpoint, in_flight = sent[2], sent[3]
        for seq in ran:  # it ran there: its copy goes to whoever is at that endpoint now (it has the id)
            item = in_flight.get(seq)
            if item is not None:
                item.home = endpoint
        done = [seq for seq in in_flight
                if (seq <= cumulative or any(lo <= seq <= hi for lo, hi in ranges)) and seq not in kept]
        return [in_flight.pop(seq) for seq in done]
