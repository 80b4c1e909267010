"""The producer's half of a partition move: hold new messages until the old owner is done.

Per-key order is a per-producer promise. When a producer's view moves partition ``p`` of a
service from ``X`` to ``Y`` while it still has envelopes in flight to ``X``, sending the next
message of ``p`` straight to ``Y`` could let ``Y`` run it before ``X`` has run the earlier ones.
So the producer opens a *hold* on ``(service, p)``: its barrier is the last sequence number it
had appended to ``X``; new messages of ``p`` queue behind the hold; once ``X`` has acknowledged
everything up to the barrier (or ``X`` is gone and its unacknowledged envelopes were resent,
first), the queue goes to the partition's current owner, in order.

An ack is not always the end of a message at ``X``: one that waited there for its partition's
hand-over may be acknowledged with a copy kept here (relief of a stalled channel, see
:mod:`~choreo.runtime.relief`), and ``X`` may still pass it on to ``Y`` later. So a hold also
waits for the copies ``X`` kept of ``p`` up to the barrier and has not said it ran (ran there,
their key's order is kept; one that waits at ``X`` for a flow back through this producer must
not hold that flow). Without it, a joiner that waited four seconds for a dead member forwarded
its held messages 0.15 s after the producer's next ones of the key had run at the owner (chaos
seed 700).

The holds' view of the owners is taken at every view, and also just before the envelopes of a
gone peer are resent to their new owners: if the view moves again before the next sync (the
gone peer's successor arrives in the same frame), what was resent is in flight to the owner it
moves from, and the next messages of its partition wait for it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .. import wire

if TYPE_CHECKING:  # pragma: no cover
    from .channels import OutChannel, Outgoing
    from .membership import Membership

__all__ = ["Hold", "Holds"]


class Hold:
    __slots__ = ("channel", "partition", "barrier", "queue")

    def __init__(self, channel: OutChannel, partition: int, barrier: int) -> None:
        self.channel = channel
        self.partition = partition
        self.barrier = barrier
        self.queue: deque[Outgoing] = deque()

    def passed(self, first_own: dict[OutChannel, int], kept: dict[OutChannel, dict[int, int]]) -> bool:
        """The old owner has done every envelope of ours up to the barrier. Forwards it has of
        this node's (arrivals passed on for their senders, see ``Moves.forward``) do not count:
        the order kept here is of what this node sends itself, and a forward may wait for a flow
        that comes back to this node, behind the hold (nemesis plain seed 137: a saga's Lines
        held behind forwards whose Readings waited for those Lines' round trip, for good).
        ``first_own``: each channel's :meth:`~OutChannel.first_own_undone`, and ``kept`` its
        :meth:`~OutChannel.kept_not_ran`, looked up once."""
        channel = self.channel
        if channel.closed:
            return True
        if channel.done_upto < self.barrier:
            first = first_own.get(channel)
            if first is None:
                first = first_own[channel] = channel.first_own_undone()
            if first <= self.barrier:
                return False
        if not channel.custody:
            return True
        waiting = kept.get(channel)
        if waiting is None:
            waiting = kept[channel] = channel.kept_not_ran()
        return waiting.get(self.partition, self.barrier + 1) > self.barrier


class Holds:
    """Every open hold of one producer, by (service, partition)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, int], Hold] = {}
        self._owners: dict[str, list[int | None]] = {}
        self.opened = 0

    def on_view(self, membership: Membership, channels: dict[int, OutChannel]) -> None:
        """Open holds for partitions whose owner changed while we had envelopes in flight to it."""
        current: dict[str, list[int | None]] = {}
        for name, spec in membership.services().items():
            owners: list[int | None] = []
            for p in range(spec.partitions):
                peer = membership.owner(name, p)
                owners.append(peer.incarnation if peer is not None else None)
            current[name] = owners
            before = self._owners.get(name)
            if before is None or len(before) != len(owners):
                continue
            for p, (was, now) in enumerate(zip(before, owners)):
                if was is None or was == now or (name, p) in self.by_key:
                    continue
                ch = channels.get(was)
                if ch is None or ch.closed:
                    continue
                # (what waits in its backlog for credit gets the next sequence numbers, in order:
                # the barrier covers it too, or the next message of p could overtake it (the 100 s
                # schedules, replicas seed 14030: envelopes resent to a full window)
                last = ch.window.next_seq - 1 + len(ch.backlog)
                hold = Hold(ch, p, last)
                if last > ch.done_upto or not hold.passed({}, {}):  # (in flight, or kept there not run)
                    self.by_key[(name, p)] = hold
                    self.opened += 1
        self._owners = current

    def held(self, service: str | None, partition: int) -> Hold | None:
        if not self.by_key or service is None:
            return None
        return self.by_key.get((service, partition))

    def for_item(self, service: str | None, item: Outgoing) -> Hold | None:
        """The open hold ``item`` waits behind, if any. Only a keyed message has a partition's
        order to keep; a hand-over (a partition's state between its instances) is never held."""
        if item.flags & (wire.FLAG_UNKEYED | wire.FLAG_BROADCAST) or item.kind == wire.KIND_HANDOVER:
            return None
        return self.held(service, item.partition)

    def release(self, channel: OutChannel | None = None) -> list[tuple[str, int, Hold]]:
        """Close the holds whose barrier passed (of one channel, or all); returns them."""
        first_own: dict[OutChannel, int] = {}
        kept: dict[OutChannel, dict[int, int]] = {}
        done = [
            (key, hold)
            for key, hold in self.by_key.items()
            if (channel is None or hold.channel is channel) and hold.passed(first_own, kept)
        ]
        for key, _ in done:
            del self.by_key[key]
        return [(key[0], key[1], hold) for key, hold in done]

    def take_all(self) -> list[tuple[str, int, Hold]]:
        """Close every hold (this node re-incarnates)."""
        out = [(key[0], key[1], hold) for key, hold in self.by_key.items()]
        self.by_key.clear()
        return out

    def take_channel(self, channel: OutChannel) -> list[tuple[str, int, Hold]]:
        """Close every hold on a channel whose receiver is gone."""
        gone = [(key, hold) for key, hold in self.by_key.items() if hold.channel is channel]
        for key, _ in gone:
            del self.by_key[key]
        return [(key[0], key[1], hold) for key, hold in gone]
