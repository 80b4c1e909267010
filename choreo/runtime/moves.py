"""Partitions changing hands: view sync, drain, forward, hand-over, and what was buffered meanwhile.

How this works (the consumer's half; the producer's half is :mod:`~choreo.runtime.holds`).
Whenever membership changes, :meth:`Moves.sync` gives :class:`~choreo.runtime.ownership.Ownership`
the new view of the service's instances. A partition this node **loses** while alive drains:
what is in a handler or waiting for its key finishes here, new arrivals are *forwarded* to the
new owner over this node's own acknowledged channel (:meth:`Moves.forward`; the original is
acknowledged only once the forward is), and once nothing of it is left in progress its dedup
ids and cached command results travel to the new owner in a HANDOVER envelope, after every
forward (:meth:`Moves.hand_over`). A partition this node **gains** from a live previous owner
buffers its arrivals until that handover (:meth:`Moves.on_handover`), the previous owner's
death, or ``handover_timeout``; then they run in arrival order (:meth:`Moves.release_buffered`).

Only service nodes have partitions: a client has no :class:`Moves`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .. import wire
from ..config import NodeConfig
from .channels import InChannel, Outgoing
from .lifecycle import Lifecycle
from .membership import Membership
from .outbox import Outbox
from .ownership import Ownership
from .stats import Counters

__all__ = ["Moves", "PartitionWork"]

log = logging.getLogger("choreo.node")
ZERO_ID = bytes(16)
HANDOVER_TYPE = b"choreo.handover"


class PartitionWork(Protocol):
    """What moves need of the dispatcher: a partition's state, and its buffered arrivals run."""

    def export_partition(self, p: int) -> bytes: ...

    def import_partition(self, p: int, payload: bytes) -> None: ...

    def deliver(self, channel: InChannel, env: Any, now: float) -> None: ...

    def untrack(self, partition: int) -> None: ...

    def pump(self) -> None: ...

    def lag_of(self, partition: int) -> int: ...


class Moves:
    """Partition moves of one service node (see the module docstring)."""

    def __init__(
        self,
        ownership: Ownership,
        membership: Membership,
        outbox: Outbox,
        lifecycle: Lifecycle,
        *,
        service: str,
        config: NodeConfig,
        clock: Callable[[], float],
        fresh_id: Callable[[], bytes],
        counters: Counters,
    ) -> None:
        self.ownership = ownership
        self.membership = membership
        self.outbox = outbox
        self.life = lifecycle
        self.service = service
        self.config = config
        self.clock = clock
        self.fresh_id = fresh_id
        self.counters = counters
        self.work: PartitionWork | None = None  # the dispatcher, set once both exist
        self.name = service  # this node's name, for the log

    @property
    def me(self) -> int:
        return self.ownership.me

    def reset(self, incarnation: int, name: str) -> None:
        """This node re-incarnates: it owns nothing until the new view says so."""
        self.ownership.reset(incarnation)
        self.name = name

    # -- the view ----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Membership changed: update which partitions are ours (once the node has joined)."""
        if not self.life.joined:
            return
        view = [p.incarnation for p in self.membership.instances(self.service)]
        peers = self.membership.peers
        ownership = self.ownership
        me = ownership.me
        holders = [p for p in peers.values() if p.live and p.incarnation != me and p.service_name == self.service]

        def holder(partition: int) -> int | None:
            for peer in holders:
                if peer.holds(partition):
                    return peer.incarnation
            return None

        changed = ownership.update(view, lambda inc: inc in peers and peers[inc].live, self.clock(), holder)
        # arrivals buffered before this node joined, for partitions it does not wait for: forward them
        waited = [p for p in ownership.buffered if ownership.state[p] != "awaiting" and p not in changed]
        if changed or waited:
            self.release_buffered(changed + waited)

    def tick(self, now: float) -> None:
        """Stop waiting for late handovers; hand over partitions that finished draining."""
        ownership = self.ownership
        if ownership.awaiting:
            late = ownership.expire(now, self.config.handover_timeout)
            if late:
                log.warning("%s: no handover for partitions %s within %.0f s: taking them", self.name, late,
                            self.config.handover_timeout)
                self.release_buffered(late)
        if ownership.draining and self.work is not None:
            lag_of = self.work.lag_of
            for p, target in list(ownership.draining.items()):
                if lag_of(p) == 0:
                    self.hand_over(p, target)

    def previous_gone(self, incarnation: int, name: str) -> None:
        """A peer died or left: partitions we waited for it to hand over are ours now."""
        owned = self.ownership.previous_gone(incarnation)
        if owned:
            log.info("%s: took over %d partitions %s was handing over", self.name, len(owned), name)
            self.release_buffered(owned)

    # -- handing over ----------------------------------------------------------------------------

    def hand_over(self, p: int, target: int) -> None:
        """Partition ``p`` is drained: send its dedup ids to its new owner, after every forward."""
        assert self.work is not None
        self.ownership.drained(p)
        payload = self.work.export_partition(p)
        peer = self.membership.peers.get(target)
        if peer is None or not peer.live:
            peer = self.membership.owner(self.service, p)
        if peer is None or peer.incarnation == self.me:
            return
        item = Outgoing(wire.KIND_HANDOVER, 0, HANDOVER_TYPE, b"", p, self.fresh_id(), ZERO_ID, ZERO_ID, payload, None)
        self.outbox.append(self.outbox.channel(peer), item, self.clock())

    def on_handover(self, env: Any) -> None:
        """The previous owner of a partition finished draining it."""
        assert self.work is not None
        p = env.partition
        self.work.import_partition(p, env.payload)
        if self.ownership.handed_over(p, self.clock()):
            self.release_buffered([p])

    # -- arrivals for partitions that are not (yet) ours -------------------------------------------

    def buffer(self, channel: InChannel, env: Any) -> bool:
        """Keep an arrival for a partition we wait for (its handover, or our own join), or whose
        owner we suspect (its sender may have found it dead already and sent it here: it runs
        here, in order, once we do too; or goes on to the owner once it refutes); False if not."""
        p = env.partition
        if self.ownership.state[p] == "awaiting" or not self.life.joined:
            self.ownership.buffered.setdefault(p, deque()).append((channel, env))
            return True
        owner = self.membership.owner(self.service, p)
        if owner is not None and owner.state == "suspect":
            self.ownership.buffered.setdefault(p, deque()).append((channel, env))
            return True
        return False

    def release_buffered(self, partitions: list[int]) -> None:
        """Arrivals buffered for partitions that became ours (run them) or someone else's (forward)."""
        assert self.work is not None
        work = self.work
        now = self.clock()
        for p in partitions:
            queue = self.ownership.buffered.pop(p, None)
            while queue:
                ch, env = queue.popleft()
                work.untrack(p)
                work.deliver(ch, env, now)
        work.pump()
        self.outbox.schedule_flush()

    def forward(self, channel: InChannel, env: Any) -> bool:
        """Send an arrival for a partition we do not own to its owner; ack the original after."""
        target = self.membership.owner(self.service, env.partition)
        if target is None or target.incarnation == self.me:
            return False
        outbox = self.outbox

        def done(channel: InChannel = channel, seq: int = env.seq) -> None:
            channel.reorder.complete(seq)
            outbox.ack_later(channel)

        self.counters.forwarded += 1
        item = Outgoing(
            env.kind, env.flags, env.type.encode(), env.key, env.partition, env.msg_id, env.trace_id, env.cause_id,
            env.payload, done, raw=env.raw,
        )
        outbox.append(outbox.channel(target), item, self.clock())
        return True

    @property
    def busy(self) -> bool:
        """Partitions still draining, or arrivals still buffered."""
        return bool(self.ownership.draining or self.ownership.buffered)
