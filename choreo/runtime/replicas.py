"""Standby copies of a service's partitions (``Service(..., replicas=1)``): a crash loses no state.

How this works. For each partition its *standby* is the instance that would own it if its
owner went (rendezvous without the owner: :attr:`Ownership.standbys`), so a crash of the owner
makes the standby the new owner, with the copy already in place.

The owner's half. When a partition becomes ours, or its standby changes, a ``"copy"`` stream
(:mod:`~choreo.runtime.transfer`) sends the standby the whole partition; from the moment it
starts, every handler that writes state in the partition sends the standby a :class:`Delta`
(its writes, the message's id, a command's result) on the same acknowledged channel, after
the chunks already sent. A delta leaves only once the handler's emitted messages are
acknowledged, and the deltas of one key leave in the order their handlers ran; the handler's
input is acknowledged to its sender only once its delta is. So a standby that has a message's
id has its writes and knows its emitted messages are delivered: after the owner crashes, a
message redelivered to the standby either is a duplicate (and its result is there) or runs
again on the state before it. The copy stream reads the partition as it goes; it leaves out
what is not settled that way yet (a key's value before its pending writes, the ids of messages
still in progress), which their deltas bring after.

The standby's half. It stages a copy until the stream checks out, keeping the deltas that
arrive meanwhile, then installs the copy and applies them in order; later deltas apply at
once. It keeps the copy until its owner releases it (below), or the copy becomes its own.

When the owner is gone. Each instance advertises the partitions it keeps a copy of (a bitmap
beside the partitions it holds, in its hellos and heartbeats: :meth:`Replicas.keeping`). Once the
owner a copy came from is dead, the copy becomes the keeper's own data, as a durable node's store
does after a restart (:attr:`Ownership.restored`): the keeper runs the partition if the view
gives it the partition, and otherwise drains it to its owner, a newcomer that won the partition
and waits for the copy rather than start it empty. Only one copy counts: if more than one
instance keeps one (an old standby whose copy still lingers), the rendezvous winner among them
(:meth:`Moves.keeper`). A standby that the view replaces keeps its copy until the owner *releases*
it (a ``"release"`` verdict: once the new standby's copy checked out, or the partition was handed
over): the owner may be dead without anyone knowing yet, and a newcomer can take the standby's
place at the moment the owner dies.

The fine print: until a standby's copy is complete (:attr:`Replicas.complete`), a crash of the
owner loses what the copy had not reached. An owner with no other instance has no standby.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

from ..config import NodeConfig
from .membership import Membership, Peer
from .ownership import Ownership
from .transfer import Chunk, Delta, Piece, Pump, Staged, StreamIn, StreamOut, TransferError, Verdict, encode_transfer

__all__ = ["Replicas", "ReplicaWork", "Shipment"]

log = logging.getLogger("choreo.node")


class ReplicaWork(Protocol):
    """What replicas need of the partitions' data (:class:`~choreo.runtime.partdata.PartitionData`)."""

    def export_partition(self, p: int, settled: bool = False) -> Iterator[Piece]: ...

    def install(self, staged: Staged) -> None: ...

    def apply_delta(self, delta: Delta) -> None: ...

    def forget_partition(self, p: int) -> None: ...

    def reship_owed(self, p: int) -> None: ...

    ungated: int  # writes shipped ahead of their outputs' acks (a flow that came back to its key)
    owed_sent: int  # messages whose outputs it sent for a dead owner (PartitionData.take_over)


class Shipment:
    """One delta on its way to a standby: its job's last wait. ``done`` runs once, whichever
    standby acknowledges it first (it is sent again to a new standby if the old one changes)."""

    __slots__ = ("partition", "payload", "_done", "finished")

    def __init__(self, partition: int, payload: bytes, done: Callable[[], None]) -> None:
        self.partition = partition
        self.payload = payload
        self._done = done
        self.finished = False

    def acked(self) -> None:
        if not self.finished:
            self.finished = True
            self._done()


class Replicas:
    """The standby copies of one service node's partitions (see the module docstring)."""

    def __init__(
        self,
        ownership: Ownership,
        membership: Membership,
        send: Callable[[Peer, int, bytes, Callable[[], None] | None], None],
        *,
        service: str,
        config: NodeConfig,
        clock: Callable[[], float],
        refused: Callable[[str, str], None],
    ) -> None:
        self.ownership = ownership
        self.membership = membership
        self.send = send  # (peer, partition, payload, on_acked): a HANDOVER envelope to that peer
        self.service = service
        self.config = config
        self.clock = clock
        self.refused = refused
        self.work: ReplicaWork | None = None
        self.name = service
        partitions = ownership.partitions
        self.standby: list[int | None] = [None] * partitions  # owned partitions: who gets our deltas
        self.copying: dict[int, Pump] = {}  # owned partitions: the copy stream to their standby
        self.complete: set[int] = set()  # owned partitions whose standby's copy checked out
        self.in_flight: dict[int, dict[int, Shipment]] = {}  # partition -> deltas not yet acknowledged
        self.held: set[int] = set()  # partitions this node keeps a standby copy of
        self.source: dict[int, Peer] = {}  # held partition -> the owner whose copy it is
        self.releasing: dict[int, set[int]] = {}  # partition -> former standbys to release (see the docstring)
        self.inbound: dict[tuple[int, int], StreamIn | None] = {}  # (owner, partition) -> copy coming in
        self.stash: dict[int, list[Delta]] = {}  # partition -> deltas that came during its copy
        self._rng = random.Random()
        # owned partitions whose standby refused our copy: (when it goes again, the delay before that)
        self.retry: dict[int, tuple[float, float]] = {}
        self.copies_sent = self.copies_received = self.deltas_sent = self.deltas_applied = 0

    def reset(self, name: str) -> None:
        for pump in self.copying.values():
            pump.stop()
        self.copying.clear()
        self.complete.clear()
        self.releasing.clear()
        self.standby[:] = [None] * self.ownership.partitions  # in place: the state views read this list
        self.retry.clear()
        self.inbound.clear()
        self.stash.clear()
        self.name = name
        for shipments in self.in_flight.values():  # their standby's channel is void: nothing to wait for
            for shipment in list(shipments.values()):
                shipment.acked()
        self.in_flight.clear()

    # -- the owner's half ------------------------------------------------------------------------

    def copies(self, p: int) -> bool:
        """Must a write in partition ``p`` reach a standby before its input is acknowledged?"""
        return self.standby[p] is not None

    def sync(self) -> None:
        """The view changed: start copies to new standbys, drop copies we no longer stand by for
        (and a refused copy goes again now: the views that crossed may agree now)."""
        ownership = self.ownership
        for p in range(ownership.partitions):
            state = ownership.state[p]
            target = ownership.standbys[p] if state == "owned" else None
            if target is not None:
                peer = self.membership.peers.get(target)
                if peer is None or not peer.live:
                    target = None
            if target != self.standby[p]:
                self._switch(p, target)
        if self.retry:
            now = self.clock()
            self.retry = {p: (now, delay) for p, (_, delay) in self.retry.items()}
            self.tick(now)

    def released(self, sender: Peer, p: int) -> None:
        """The owner of our copy of ``p`` has a newer one elsewhere (its new standby's, or its new
        owner's): ours can go."""
        if p in self.held and self.source.get(p) is sender and self.ownership.state[p] not in (
            "owned", "awaiting", "draining"
        ):
            self._drop(p)

    def release(self, p: int) -> None:
        """Tell the former standbys of ``p`` that their copies can go: the current standby's copy
        checked out, or ``p`` checked out at its new owner."""
        release = encode_transfer(Verdict("release", 0, p, True))
        for former in self.releasing.pop(p, ()):
            peer = self.membership.peers.get(former)
            if peer is not None and peer.live:
                self.send(peer, p, release, None)

    def _drop(self, p: int) -> None:
        self.forgotten(p)
        self.stash.pop(p, None)
        assert self.work is not None
        self.work.forget_partition(p)

    def forgotten(self, p: int) -> None:
        """Partition ``p``'s data here went to its new owner: no copy of it is left here."""
        self.held.discard(p)
        self.source.pop(p, None)

    def keeping(self) -> bytes:
        """The partitions this node keeps a standby copy of (not those it holds), as a bitmap."""
        # (a copy whose owner is gone counts as held once :meth:`orphans` gave it to us: restored)
        bits = bytearray((self.ownership.partitions + 7) // 8)
        state, restored = self.ownership.state, self.ownership.restored
        for p in self.held:
            if state[p] not in ("owned", "draining") and p not in restored:
                bits[p >> 3] |= 1 << (p & 7)
        return bytes(bits)

    def orphans(self, counts: Callable[[int], bool]) -> list[int]:
        """The copies whose owner is gone: this node's own data now if ``counts(p)`` (its copy is
        the one that counts), else forgotten. Returns the partitions to add to
        :attr:`Ownership.restored`."""
        state, peers = self.ownership.state, self.membership.peers
        out = []
        for p in list(self.held):
            source = self.source.get(p)
            # (live, and still in the table: a peer replaced at its endpoint leaves it as it was)
            if source is not None and source.live and peers.get(source.incarnation) is source:
                continue
            if state[p] in ("owned", "awaiting", "draining"):
                continue
            if source is not None and self._restarted(source):
                self._drop(p)  # a durable owner back on its data dir: its store has all our copy has
            elif counts(p):  # (held until it is owned here, handed on, or found stale)
                self.stash.pop(p, None)
                out.append(p)
            else:
                self._drop(p)
        return out

    def _restarted(self, source: Peer) -> bool:
        """Is a new life of ``source`` live: a durable node, under the same rendezvous key?"""
        return any(peer.live and peer.key == source.key and peer is not source for peer in self.membership.peers.values())

    def _switch(self, p: int, target: int | None) -> None:
        """Partition ``p``'s standby is now ``target`` (None: none): a fresh copy, and the deltas
        still unacknowledged sent again after it (the old standby's acks still count)."""
        old = self.copying.pop(p, None)
        if old is not None:
            old.stop()
        self.complete.discard(p)
        former = self.standby[p]
        if former is not None:  # it keeps its copy until the new one is whole (or p handed over)
            self.releasing.setdefault(p, set()).add(former)
        if target is not None and p in self.releasing:
            self.releasing[p].discard(target)
        self.standby[p] = target
        shipments = self.in_flight.get(p, {})
        if target is None:
            for shipment in list(shipments.values()):
                shipment.acked()  # no standby to wait for: the write stands on this node alone
            self.in_flight.pop(p, None)
            return
        peer = self.membership.peers[target]
        assert self.work is not None
        stream = StreamOut(
            "copy", self._rng.getrandbits(62), p, self.work.export_partition(p, settled=True),
            chunk_bytes=self.config.max_batch_bytes // 2, clock=self.clock, epoch=self.ownership.epochs[p],
        )
        pump = self.copying[p] = Pump(stream, partial(self.send, peer, p), 4)
        self.copies_sent += 1
        pump.run()
        for key, shipment in list(shipments.items()):
            self.send(peer, p, shipment.payload, partial(self._acked, p, key, shipment))
        self.work.reship_owed(p)  # ungated messages still owe their mark: their outputs, to this standby too

    def ship(self, p: int, delta: Delta, done: Callable[[], None]) -> None:
        """Send one handler's writes to the standby of ``p``; ``done`` once it acknowledged them."""
        target = self.standby[p]
        if target is None:
            done()
            return
        shipment = Shipment(p, encode_transfer(delta), done)
        key = id(shipment)
        self.in_flight.setdefault(p, {})[key] = shipment
        self.deltas_sent += 1
        self.send(self.membership.peers[target], p, shipment.payload, partial(self._acked, p, key, shipment))

    def _acked(self, p: int, key: int, shipment: Shipment) -> None:
        shipments = self.in_flight.get(p)
        if shipments is not None and shipments.pop(key, None) is not None and not shipments:
            del self.in_flight[p]
        shipment.acked()

    def verdict(self, sender: Peer, verdict: Verdict) -> None:
        """Our standby installed its copy, or refused it (then a fresh copy, at once)."""
        p = verdict.partition
        pump = self.copying.get(p)
        if pump is None or pump.stream.stream != verdict.stream or self.standby[p] != sender.incarnation:
            return
        del self.copying[p]
        if verdict.ok:
            self.retry.pop(p, None)
            self.complete.add(p)
            self.release(p)
            return
        # a fresh copy, after a pause that doubles with each refusal in a row (from one tick, so
        # that views crossed for a moment, as at a join, cost next to nothing): a standby that
        # still owns or drains the partition in its view refuses every copy until it is handed
        # over, and a copy sent at once after each refusal streamed the whole partition a thousand
        # times a second for minutes (the heal of a long partition, behind a drain that never
        # ended: see Dispatcher._abandon)
        _, delay = self.retry.get(p, (0.0, self.config.tick / 2))
        delay = min(2 * delay, self.config.rto_max)
        self.retry[p] = (self.clock() + delay, delay)
        log.error("%s: %s refused the copy of partition %d (%s): a fresh one in %.2f s", self.name, sender.node, p,
                  verdict.error, delay)

    def tick(self, now: float) -> None:
        """Copies refused a while ago go again (see :meth:`verdict`)."""
        for p, (when, _) in list(self.retry.items()):
            target = self.standby[p]
            if self.ownership.state[p] != "owned" or target is None or p in self.copying:
                del self.retry[p]  # (the view moved on: sync started what it needs)
            elif now >= when:
                self.standby[p] = None  # (not a former standby to release: the same one, again)
                self._switch(p, target)

    # -- the standby's half ----------------------------------------------------------------------

    def chunk_in(self, sender: Peer, chunk: Chunk) -> None:
        """A chunk of a copy for a partition we stand by for."""
        p = chunk.partition
        key = (sender.incarnation, p)
        inbound = self.inbound.get(key)
        if chunk.seq == 0:
            inbound = self.inbound[key] = StreamIn(chunk.stream, "copy", p, max_bytes=self.config.max_partition_bytes)
            self.stash[p] = []
        elif inbound is None or inbound.stream != chunk.stream:
            if key not in self.inbound:
                self._refuse(sender, chunk, "a chunk of a copy whose start never came")
            return
        try:
            staged = inbound.take(chunk, self.clock())
        except TransferError as exc:
            self._refuse(sender, chunk, str(exc))
            return
        if staged is None:
            return
        del self.inbound[key]
        if self.ownership.state[p] in ("owned", "draining"):  # views crossed: what we run is newer
            self._refuse(sender, chunk, f"{self.name} owns partition {p} in its view")
            return
        assert self.work is not None
        self.work.install(staged)
        self.held.add(p)
        self.source[p] = sender
        self.copies_received += 1
        for delta in self.stash.pop(p, []):
            self.work.apply_delta(delta)
            self.deltas_applied += 1
        self.send(sender, p, encode_transfer(Verdict("copy", chunk.stream, p, True)), None)

    def _refuse(self, sender: Peer, chunk: Chunk, why: str) -> None:
        self.inbound[(sender.incarnation, chunk.partition)] = None
        self.stash.pop(chunk.partition, None)
        self.refused("malformed", f"the copy of partition {chunk.partition} from {sender.node}: {why}")
        self.send(sender, chunk.partition, encode_transfer(Verdict("copy", chunk.stream, chunk.partition, False, why)),
                  None)

    def delta_in(self, sender: Peer, delta: Delta) -> None:
        """One handler's writes, from the owner of a partition we stand by for."""
        p = delta.partition
        if self.ownership.state[p] in ("owned", "draining"):
            return  # from an owner that lost it to us meanwhile: what we run is newer
        stash = self.stash.get(p)
        if stash is not None:  # its copy is still coming: after it
            stash.append(delta)
            return
        assert self.work is not None
        self.work.apply_delta(delta)
        self.held.add(p)
        self.source[p] = sender
        self.deltas_applied += 1

    def gone(self, incarnation: int) -> None:
        """An instance died or left: copies it was sending us are void."""
        for key in [k for k in self.inbound if k[0] == incarnation]:
            del self.inbound[key]
            self.stash.pop(key[1], None)

    def stats(self) -> dict[str, int]:
        owned = [p for p, s in enumerate(self.ownership.state) if s == "owned"]
        return {
            "owned": len(owned),
            "standby_complete": sum(1 for p in owned if p in self.complete),
            "standby_copying": len(self.copying),
            "held": len(self.held),
            "copies_sent": self.copies_sent,
            "copies_received": self.copies_received,
            "deltas_sent": self.deltas_sent,
            "deltas_applied": self.deltas_applied,
            "ungated": self.work.ungated if self.work is not None else 0,
            "owed_sent": self.work.owed_sent if self.work is not None else 0,
        }
