"""Partitions changing hands: view sync, drain, forward, hand-over, and what was buffered meanwhile.

How this works (the consumer's half; the producer's half is :mod:`~choreo.runtime.holds`).
Whenever membership changes, :meth:`Moves.sync` gives :class:`~choreo.runtime.ownership.Ownership`
the new view of the service's instances. A partition this node **loses** while alive drains:
what is in a handler or waiting for its key finishes here, new arrivals wait here
unacknowledged (:attr:`Moves.held_back`), and once every message of it here has run its dedup
ids, cached command results and handler state stream to the new owner over this node's own
acknowledged channel (:meth:`Moves.hand_over`, chunks of :mod:`~choreo.runtime.transfer`),
with the messages that ran but still wait for their outputs' acks (a flow that comes back to
the partition waits for its new owner: :meth:`~choreo.runtime.partdata.PartitionData.ran`). The
partition stays ``draining`` here, its state kept, until the new owner says the stream checked
out: a stream refused (corrupt, cut) is sent again, a new owner that dies meanwhile is replaced
by the next one, and a partition that comes back to this node is simply its own again. Then
what waited is *forwarded* to the new owner on the same channel (:meth:`Moves.forward`; the
original is acknowledged only once the forward is), or runs here. A partition this
node **gains** from a live previous owner buffers its arrivals until that stream is installed
(:meth:`Moves.on_transfer`), the previous owner's death, or ``handover_timeout`` (for a
service with state: only once the previous owner no longer holds it); then they run in
arrival order (:meth:`Moves.release_buffered`).

Only service nodes have partitions: a client has no :class:`Moves`.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

from .. import core, wire
from ..config import NodeConfig
from .channels import InChannel, Outgoing
from .lifecycle import Lifecycle
from .membership import Membership, Peer
from .outbox import Outbox
from .ownership import Ownership
from .stats import Counters
from .replicas import Replicas
from .transfer import (
    Chunk, Piece, Pump, Staged, StreamIn, StreamOut, TransferError, Verdict, decode_transfer, encode_transfer,
)

__all__ = ["Moves", "PartitionWork", "PartitionKeeping"]

log = logging.getLogger("choreo.node")
ZERO_ID = bytes(16)
HANDOVER_TYPE = b"choreo.handover"
CHUNKS_IN_FLIGHT = 4  # chunks of one stream sent and not yet acknowledged


class PartitionKeeping(Protocol):
    """What moves need of a partition's data (:class:`~choreo.runtime.partdata.PartitionData`)."""

    def export_partition(self, p: int, settled: bool = False, to: int | None = None) -> Iterator[Piece]: ...

    def forget_partition(self, p: int, keep_ids: bool = False) -> None: ...

    def install(self, staged: Staged, source: int | None = None) -> None: ...

    def take_over(self, p: int) -> int: ...

    def all_ran(self, p: int, lag: int) -> bool: ...

    def drain_state(self, p: int, lag: int) -> str: ...

    def marked(self, msg_id: bytes) -> bool: ...

    def source_gone(self, incarnation: int) -> int: ...

    def handed_on(self, p: int) -> None: ...


class PartitionWork(Protocol):
    """What moves need of the dispatcher: buffered arrivals run, and how many wait per partition."""

    def deliver(self, channel: InChannel, env: Any, now: float) -> None: ...

    def untrack(self, partition: int) -> None: ...

    def pump(self) -> None: ...

    def lag_of(self, partition: int) -> int: ...

    def draining(self, partition: int) -> None: ...


class _Forwarded:
    """What a forward calls once its target has it: the arrival it carries is done here. It
    keeps that arrival, for a forward whose target is gone (:meth:`Moves.take_back`)."""

    __slots__ = ("channel", "env", "outbox", "moves")
    forward = True  # (what a hold on its channel does not wait for: Hold.passed)

    def __init__(self, channel: InChannel, env: Any, outbox: Outbox, moves: Moves) -> None:
        self.channel = channel
        self.env = env
        self.outbox = outbox
        self.moves = moves

    def ran_at_target(self) -> None:
        """Its target ran it and keeps it until its outputs are acknowledged (``KEEP_RAN``): the
        partition need not stay closed for it (its key's order is kept: it ran). Closed until the
        copy's release instead, a flow of that message that came back to the partition waited for
        itself (saga plain 174, once the copy kept its home across its sender's rejoin).

        One its sender keeps a copy of (acknowledged while it waited here, relief.py) is marked
        as run for that sender too: a hold of the sender's waits for such a copy until it ran
        (see Holds), and what that hold keeps back may be the very flow the message waits for."""
        self.moves.forward_done(self.env)
        self.outbox.kept_ran([(self.channel, self.env.seq)])

    def __call__(self) -> None:
        self.moves.forward_done(self.env)
        channel, env = self.channel, self.env
        if channel.keep and env.seq in channel.keep:  # acknowledged while it waited here (relief.py)
            self.outbox.release(channel, env.seq, env.msg_id)
        channel.reorder.complete(env.seq)
        self.outbox.ack_later(channel)


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
        refused: Callable[[str, str], None] = lambda reason, detail: None,
        stateful: bool = False,
        durable: bool = False,
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
        self.refused = refused  # count and log what a peer sent that cannot be used
        self.stateful = stateful  # the service keeps handler state: never start a partition without it
        self.durable = durable  # this node keeps a store: its next life has what it held (see reset)
        self.work: PartitionWork | None = None  # the dispatcher, set once both exist
        self.data: PartitionKeeping | None = None  # and its partitions' data
        self.name = service  # this node's name, for the log
        self.sending: dict[int, _Sending] = {}  # partition -> the stream that hands it over
        # partition -> (sender, stream, since): a stream that came before our view gave us the partition
        self.early: dict[int, tuple[int, Staged, float]] = {}
        self.inbound: dict[tuple[int, int], StreamIn | None] = {}  # (sender, partition) -> stream (None: refused)
        self.transfers = TransferStats()
        self.replicas: Replicas | None = None  # standby copies (a service with replicas=1)
        self._rng = random.Random()
        # arrivals for partitions not ours are numbered as they come (buffered or forwarded), so
        # that one forwarded on a stale view and sent back here keeps its place (see buffer)
        self.arrivals = 0
        self.forwarded: dict[bytes, int] = {}  # msg_id -> its number, until the forward is acknowledged
        # partition -> arrivals for a partition we drain, kept here (unacknowledged) until its
        # hand-over is in: forwarded at once, they would wait unacknowledged at the new owner,
        # and a window of them would keep the hand-over itself (behind them) from leaving
        self.held_back: dict[int, deque[tuple[InChannel, Any]]] = {}
        # partition -> arrivals for a partition no instance owns (every one leaves) that this node
        # cannot run (see forward): unacknowledged, they wait for an owner, or go again from their senders
        self.orphans: dict[int, deque[tuple[InChannel, Any]]] = {}
        self.last_held: set[int] = set()  # partitions this node drained with nobody to take them
        self._draining_since: dict[int, float | None] = {}  # partition -> when its drain began (None: said so)

    @property
    def me(self) -> int:
        return self.ownership.me

    def reset(self, incarnation: int, name: str) -> None:
        """This node re-incarnates: it owns nothing until the new view says so (what it knows of
        its partitions stays: a partition nobody else took is still right here)."""
        if self.work is not None:  # arrivals it buffered go: their senders resend them (our channels closed)
            for p, queue in self.ownership.buffered.items():
                for _ in queue:
                    self.work.untrack(p)
        # a durable node's next life is under the same rendezvous key, with the same store: what it
        # held counts as read back, as after a restart (else it waited handover_timeout for a copy
        # that another life of its own, or a keeper that dropped its copy for it, was to hand over:
        # after a long partition's heal, every durable instance stalled 15 s)
        held = [p for p, s in enumerate(self.ownership.state) if s in ("owned", "draining")] if self.durable else []
        self.ownership.reset(incarnation)
        self.ownership.restored.update(held)
        self.name = name
        for sending in self.sending.values():
            sending.pump.stop()
        self.sending.clear()
        self.inbound.clear()
        self.early.clear()
        self.forwarded.clear()
        self.held_back.clear()  # (our channels closed: their senders send them again)
        self.orphans.clear()
        self.last_held.clear()
        self._draining_since.clear()
        if self.replicas is not None:
            self.replicas.reset(name)

    # -- the view ----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Membership changed: update which partitions are ours (once the node has joined)."""
        if not self.life.joined:
            return
        instances = self.membership.instances(self.service)
        view = [p.incarnation for p in instances]
        peers = self.membership.peers
        ownership = self.ownership
        me = ownership.me
        holders = [p for p in peers.values() if p.live and p.incarnation != me and p.service_name == self.service]

        restored, epochs = ownership.restored, ownership.epochs

        def holder(partition: int) -> int | None:
            """The instance whose copy of ``partition`` counts: one that runs it (owns or drains
            it), else the newest copy read back, unless ours, read back too, is newer still."""
            newest, newest_epoch = None, -1
            for peer in holders:
                if peer.holds(partition):
                    epoch = peer.restored.get(partition)
                    if epoch is None:
                        return peer.incarnation
                    if epoch > newest_epoch:
                        newest, newest_epoch = peer.incarnation, epoch
            if newest is not None and partition in restored and epochs[partition] > newest_epoch:
                return None
            return newest

        if self.replicas is not None:  # standby copies whose owner is gone: ours now, as if restored
            ownership.restored.update(self.replicas.orphans(
                lambda p: holder(p) is None and self.keeper(p, me_too=True) == me
            ))
        changed = ownership.update(
            view, lambda inc: inc in peers and peers[inc].live, self.clock(), holder, [p.key for p in instances],
            self.keeper, self._returns,
        )
        if ownership.stale:  # restored (from our store, or a copy), but another instance holds them now
            assert self.data is not None
            for p in ownership.stale:
                self.data.forget_partition(p)
                if self.replicas is not None:
                    self.replicas.forgotten(p)
            ownership.stale.clear()
        if self.early:
            self._settle_early()
        if self.replicas is not None:
            self.replicas.sync()
        # arrivals buffered before this node joined, for partitions it does not wait for: forward them
        waited = [p for p in ownership.buffered if ownership.state[p] != "awaiting" and p not in changed
                  and not (ownership.state[p] == "owned" and p in ownership.paused)]
        if changed or waited:
            self.release_buffered(changed + waited)
        if self.held_back:
            self.release_held_back()
        self.last_held = {p for p in self.last_held if ownership.owners[p] is None}
        if self.orphans:
            self.release_orphans()

    def keeper(self, p: int, me_too: bool = False) -> int | None:
        """The live instance whose standby copy of ``p`` counts (None: nobody keeps one): the
        rendezvous winner among those that say they keep one (this node too, with ``me_too``), so
        that every node picks the same one, and an old standby whose copy lingers loses to the
        current one (it won the partition's standby place from it)."""
        if self.replicas is None:
            return None
        me = self.me
        keepers = [peer for peer in self.membership.peers.values()
                   if peer.keeps(p) and peer.live and peer.incarnation != me and peer.service_name == self.service]
        if me_too and (mine := self.membership.peers.get(me)) is not None:
            keepers.append(mine)
        if not keepers:
            return None
        return keepers[core.rendezvous_owner(p, [peer.key for peer in keepers])].incarnation

    def tick(self, now: float) -> None:
        """Stop waiting for late handovers; send refused standby copies again; hand over
        partitions that finished draining (and say which drains take long)."""
        ownership = self.ownership
        if ownership.awaiting:
            late = ownership.expire(now, self.config.handover_timeout, self._still_held if self.stateful else None)
            if late:
                log.warning("%s: no handover for partitions %s within %.0f s: taking them", self.name, late,
                            self.config.handover_timeout)
                self.release_buffered(late)
        if self.early:
            self._settle_early()
        if self.replicas is not None and self.replicas.retry:
            self.replicas.tick(now)
        if ownership.buffered:  # partitions ours whose forwards are all done since: what waited runs
            ready = [p for p in ownership.buffered if ownership.state[p] == "owned" and p not in ownership.paused]
            if ready:
                self.release_buffered(ready)
        if ownership.draining and self.work is not None and self.data is not None:
            lag_of, all_ran = self.work.lag_of, self.data.all_ran
            for p, target in list(ownership.draining.items()):
                self.work.draining(p)
                sending = self.sending.get(p)
                if all_ran(p, lag_of(p)) and (sending is None or sending.target != target) or (
                    sending is not None and sending.retry_at is not None and now >= sending.retry_at
                ):
                    self.hand_over(p, target)
            self._watch_drains(now)
        elif self._draining_since:
            self._draining_since.clear()

    def _watch_drains(self, now: float) -> None:
        """Say once when a partition has drained for longer than ``handover_timeout``: its new
        owner waits for it, and arrivals of its keys wait here unacknowledged, until it is done;
        what holds it is worth an operator's look."""
        assert self.data is not None and self.work is not None
        since = self._draining_since
        draining = self.ownership.draining
        for p in [p for p in since if p not in draining]:
            del since[p]
        for p, target in draining.items():
            started = since.setdefault(p, now)
            if started is None or now - started <= self.config.handover_timeout:
                continue
            since[p] = None  # (said once per drain)
            peer = self.membership.peers.get(target)
            sending = self.sending.get(p)
            holding = (f"its hand-over is out ({sending.refusals} refused so far)" if sending is not None
                       else self.data.drain_state(p, self.work.lag_of(p)))
            log.warning("%s: partition %d has drained for %.0f s, towards %s; %s", self.name, p, now - started,
                        peer.node if peer is not None else f"{target:016x}", holding)

    def _returns(self, incarnation: int) -> bool:
        """A durable instance of this service the mesh took for dead: its store holds the dedup
        ids, results and state of what it owned, and its next life owns the same partitions (its
        key is its name's). Its partitions wait for it (up to ``handover_timeout``): started
        here without them, its state would restart empty, and the messages it had handled but
        not yet acknowledged would run again (a false death, durable seed 2103: a node suspected
        just before a short partition, found dead just after it)."""
        peer = self.membership.peers.get(incarnation)
        return peer is not None and peer.state == "dead" and peer.durable and peer.service_name == self.service

    def _still_held(self, p: int, previous: int) -> bool:
        """Does a live instance still say it holds ``p``, or keeps its copy (its state is there: wait for it)?"""
        return any(
            peer.live and peer.service_name == self.service and peer.incarnation != self.me and (
                peer.holds(p) or peer.keeps(p))
            for peer in self.membership.peers.values()
        )

    def previous_gone(self, incarnation: int, name: str) -> None:
        """A peer died or left: partitions we waited for it to hand over are ours now; streams
        to it or from it are void (a partition it was getting goes to its next owner)."""
        for p in [p for p, s in self.sending.items() if s.target == incarnation]:
            self.sending.pop(p).pump.stop()
        for key in [k for k in self.inbound if k[0] == incarnation]:
            del self.inbound[key]
        if self.replicas is not None:
            self.replicas.gone(incarnation)
        if self.data is not None:
            self.data.source_gone(incarnation)  # the outputs of messages it handed over running, unmarked
        owned = self.ownership.previous_gone(incarnation, self.keeper, self._returns)
        if owned:
            log.info("%s: took over %d partitions %s was handing over", self.name, len(owned), name)
            self.release_buffered(owned)

    # -- handing over ----------------------------------------------------------------------------

    def hand_over(self, p: int, target: int) -> None:
        """Partition ``p`` is drained: stream what this node knows of it to its new owner, after
        every forward. It stays draining here until the new owner says the stream checked out."""
        assert self.data is not None
        peer = self.membership.peers.get(target)
        if peer is None or not peer.live:
            peer = self.membership.owner(self.service, p)
        if peer is None or peer.incarnation == self.me:  # nobody to give it to (the last instance leaves)
            gone = self.sending.pop(p, None)
            if gone is not None:
                gone.pump.stop()
            self.ownership.drained(p)
            self.last_held.add(p)
            if self.held_back:
                self.release_held_back()
            return
        stream = StreamOut(
            "handover", self._rng.getrandbits(62), p, self.data.export_partition(p, to=peer.incarnation),
            chunk_bytes=self.config.max_batch_bytes // 2, clock=self.clock, epoch=self.ownership.epochs[p],
        )
        pump = Pump(stream, partial(self.send_transfer, peer, p), CHUNKS_IN_FLIGHT)
        sending = self.sending.get(p)
        if sending is None:
            sending = self.sending[p] = _Sending(pump, peer.incarnation)
        else:  # its receiver changed, or refused it: a fresh stream
            sending.pump.stop()
            sending.pump, sending.target, sending.retry_at = pump, peer.incarnation, None
        sending.ids.add(stream.stream)
        if not self.transfers.streams_sent:
            self.transfers.first_sent_at = self.clock()
        self.transfers.streams_sent += 1
        pump.run()

    def send_transfer(self, peer: Peer, p: int, payload: bytes, on_done: Callable[[], None] | None = None) -> None:
        """Put a transfer message for partition ``p`` on the acknowledged channel to ``peer``."""
        item = Outgoing(wire.KIND_HANDOVER, 0, HANDOVER_TYPE, b"", p, self.fresh_id(), ZERO_ID, ZERO_ID, payload, on_done)
        self.outbox.append(self.outbox.channel(peer), item, self.clock())
        self.outbox.schedule_flush()

    def send_mark(self, to: int, p: int, payload: bytes) -> None:
        """Tell the new owner of ``p`` that a message handed over running is done here (see
        :meth:`PartitionData.ran <choreo.runtime.partdata.PartitionData.ran>`)."""
        peer = self.membership.peers.get(to)
        if peer is not None and peer.live:
            self.send_transfer(peer, p, payload)

    def _verdict_on(self, sender: Peer, verdict: Verdict) -> None:
        """The receiver of one of our streams installed it, or refused it."""
        p = verdict.partition
        sending = self.sending.get(p)
        if sending is None or verdict.stream not in sending.ids:
            return
        if verdict.ok:  # the receiver owns it now (even one we since redirected: it passes it on)
            del self.sending[p]
            sending.pump.stop()
            self.transfers.streams_done += 1
            self.transfers.last_done_at = self.clock()
            self.transfers.entries_sent += sending.pump.stream.items
            self.transfers.bytes_sent += sending.pump.stream.bytes
            if self.ownership.state[p] == "draining":
                self.ownership.drained(p)
                assert self.data is not None
                # its dedup ids and results stay: should the new owner die before anything else
                # changes, rendezvous hashing gives p back here, where what ran is still a duplicate
                # (they age out of the windows as any others; an id only ever stands for a message that ran)
                self.data.forget_partition(p, keep_ids=True)
                self.data.handed_on(p)
                if self.replicas is not None:
                    self.replicas.forgotten(p)
                    self.replicas.release(p)
                    self.replicas.sync()
                if self.held_back:
                    self.release_held_back()
            return
        if verdict.stream != sending.pump.stream.stream:
            return  # a refusal of a stream we already replaced
        self.transfers.streams_refused += 1
        delay = min(self.config.rto * 2 ** min(sending.refusals, 6), self.config.rto_max)
        sending.refusals += 1
        sending.retry_at = self.clock() + delay
        log.error(
            "%s: %s refused the hand-over of partition %d (%s): keeping it, sending it again in %.1f s",
            self.name, sender.node, p, verdict.error, delay,
        )

    def on_transfer(self, channel: InChannel, env: Any) -> None:
        """A HANDOVER envelope: a chunk of a stream, a verdict on ours, or a delta, from another
        instance of this service (refused, counted, if it is not one, or names no partition of ours)."""
        assert self.work is not None
        sender = channel.peer
        if sender.service_name != self.service:
            self.refused("not_allowed", f"a hand-over from {sender.node}, which is not an instance of {self.service}")
            return
        if env.partition >= self.ownership.partitions:
            self.refused("malformed", f"a hand-over of partition {env.partition} from {sender.node}: "
                                      f"{self.service} has {self.ownership.partitions}")
            return
        try:
            message = decode_transfer(env.payload)
            if message.partition != env.partition:
                raise TransferError(f"it names partition {message.partition} in an envelope of partition {env.partition}")
        except TransferError as exc:
            self.refused("malformed", f"a hand-over message from {sender.node}: {exc}")
            return
        replicas = self.replicas
        if isinstance(message, Chunk):
            if message.purpose == "copy" and replicas is not None:
                replicas.chunk_in(sender, message)
            elif message.purpose == "handover":
                self._chunk_in(sender, message)
            else:
                self.refused("malformed", f"a {message.purpose!r} stream from {sender.node}: {self.service} keeps no copies")
        elif isinstance(message, Verdict):
            if message.purpose == "copy" and replicas is not None:
                replicas.verdict(sender, message)
            elif message.purpose == "release" and replicas is not None:
                replicas.released(sender, message.partition)
            else:
                self._verdict_on(sender, message)
        elif message.handed:  # a message it handed over running is done there (see PartitionData.ran)
            if self.data is not None:
                self.data.marked(message.msg_id)  # (unknown here: a stream refused, or the partition moved on)
        elif replicas is not None:
            replicas.delta_in(sender, message)
        else:
            self.refused("malformed", f"a state delta from {sender.node}: {self.service} keeps no copies")

    def _chunk_in(self, sender: Peer, chunk: Chunk) -> None:
        assert self.work is not None
        p = chunk.partition
        key = (sender.incarnation, p)
        inbound = self.inbound.get(key)
        if chunk.seq == 0:
            inbound = self.inbound[key] = StreamIn(
                chunk.stream, chunk.purpose, p, max_bytes=self.config.max_partition_bytes
            )
        elif inbound is None or inbound.stream != chunk.stream:
            if key in self.inbound and inbound is None:
                return  # the rest of a stream already refused
            self._refuse_stream(sender, chunk, "a chunk of a stream whose start never came")
            return
        try:
            staged = inbound.take(chunk, self.clock())
        except TransferError as exc:
            self._refuse_stream(sender, chunk, str(exc))
            return
        if staged is None:
            return
        for other in [k for k in self.inbound if k[1] == p]:  # streams of p cut short elsewhere: void
            del self.inbound[other]
        self.transfers.streams_received += 1
        self.transfers.entries_received += staged.items
        self.transfers.bytes_received += staged.bytes
        state = self.ownership.state[p]
        if state == "awaiting" or state == "owned":
            self._take(sender, staged)
        else:  # our view does not give us the partition yet: it waits for the view (or is refused)
            self.early[p] = (sender.incarnation, staged, self.clock())
            self.ownership.handed_over(p, self.clock())  # remembered as early

    def _take(self, sender: Peer, staged: Staged) -> None:
        """Install a handed-over partition and tell its sender: from now on it is ours."""
        assert self.data is not None
        p = staged.partition
        self.data.install(staged, sender.incarnation)
        self.send_transfer(sender, p, encode_transfer(Verdict(staged.purpose, staged.stream, p, True)))
        if self.ownership.handed_over(p, self.clock()):
            self.release_buffered([p])
        self.outbox.schedule_flush()

    def _settle_early(self) -> None:
        """Streams that came before our view gave us their partition: take them, or send them back."""
        now = self.clock()
        for p, (sender_inc, staged, since) in list(self.early.items()):
            state = self.ownership.state[p]
            sender = self.membership.peers.get(sender_inc)
            if state == "awaiting" or state == "owned":
                del self.early[p]
                if sender is not None and sender.live:
                    self._take(sender, staged)
                else:
                    assert self.data is not None
                    self.data.install(staged)
            elif self.ownership.owners[p] not in (None, self.me) or now - since >= self.ownership.early_ttl:
                del self.early[p]  # someone else owns it in our view (or it waited too long)
                # and it no longer counts as handed over: a view that gives us the partition later
                # must wait for the stream sent again, not take the partition without its state
                self.ownership.early.pop(p, None)
                if sender is not None and sender.live:
                    self.send_transfer(sender, p, encode_transfer(
                        Verdict(staged.purpose, staged.stream, p, False, f"{self.name} does not own partition {p} in its view")
                    ))

    def _refuse_stream(self, sender: Peer, chunk: Chunk, why: str) -> None:
        """A stream that cannot be installed: nothing of it is used, and its sender hears why."""
        self.inbound[(sender.incarnation, chunk.partition)] = None
        self.transfers.streams_refused += 1
        self.refused("malformed", f"the {chunk.purpose} of partition {chunk.partition} from {sender.node}: {why}")
        self.send_transfer(sender, chunk.partition, encode_transfer(
            Verdict(chunk.purpose, chunk.stream, chunk.partition, False, why)
        ))

    # -- arrivals for partitions that are not (yet) ours -------------------------------------------

    def buffer(self, channel: InChannel, env: Any) -> bool:
        """Keep an arrival for a partition we wait for (its handover, or our own join), or whose
        owner we suspect (its sender may have found it dead already and sent it here: it runs
        here, in order, once we do too; or goes on to the owner once it refutes); False if not."""
        p = env.partition
        state = self.ownership.state[p]
        # (ours yet closed: a forward of it is out, or arrivals wait in its queue; see Ownership.regate)
        if state != "awaiting" and self.life.joined and not (state == "owned" and not self.ownership.gate[p]):
            owner = self.membership.owner(self.service, p)
            if owner is None or owner.state != "suspect":
                return False
        queue = self.ownership.buffered.setdefault(p, deque())
        number = self.forwarded.get(env.msg_id)
        if number is None:
            self.arrivals += 1
            queue.append((channel, env, self.arrivals))
            return True
        # one we forwarded on a view older than its sender's, sent back by the node we sent it to:
        # ahead of what came after it (nemesis durable seed 2155: at the end of the queue, a
        # later arrival of its key, buffered directly meanwhile, ran first)
        at = len(queue)
        while at and queue[at - 1][2] > number:
            at -= 1
        queue.insert(at, (channel, env, number))
        self.forward_done(env)  # (back here: the partition opens once its other forwards are done too)
        return True

    def release_buffered(self, partitions: list[int]) -> None:
        """Arrivals buffered for partitions that became ours (run them) or someone else's (forward)."""
        assert self.work is not None
        work = self.work
        if self.replicas is not None:  # a partition now ours has its standby before its first write
            self.replicas.sync()
        now = self.clock()
        for p in partitions:
            if self.data is not None and self.ownership.state[p] == "owned":
                self.data.take_over(p)  # what its last owner owed, before anything newer runs here
            queue = self.ownership.buffered.pop(p, None)
            self.ownership.regate(p)
            while queue:
                ch, env, _ = queue.popleft()
                work.untrack(p)
                work.deliver(ch, env, now)
        work.pump()
        self.outbox.schedule_flush()

    def release_held_back(self) -> None:
        """Arrivals kept while their partition drained, once it no longer does: on to the new
        owner (the hand-over is in), or run here (the partition came back, or nobody took it)."""
        state = self.ownership.state
        self._deliver_again(self.held_back, [p for p in self.held_back if state[p] != "draining"])

    def release_orphans(self) -> None:
        """Arrivals kept for partitions no instance owned, now that one does: on to it."""
        owners = self.ownership.owners
        self._deliver_again(self.orphans, [p for p in self.orphans if owners[p] is not None])

    def _deliver_again(self, kept: dict[int, deque[tuple[InChannel, Any]]], partitions: list[int]) -> None:
        """The arrivals ``kept`` for ``partitions`` go through the dispatcher again, in order."""
        if not partitions:
            return  # (a view changed, not for them)
        assert self.work is not None
        now = self.clock()
        for p in partitions:
            for ch, env in kept.pop(p):
                self.work.deliver(ch, env, now)  # (one whose sender is gone is dropped there)
        self.work.pump()
        self.outbox.schedule_flush()

    def forward(self, channel: InChannel, env: Any) -> bool:
        """Send an arrival for a partition we do not own to its owner; ack the original after.

        One for a partition we drain waits here until its hand-over is in (see :attr:`held_back`):
        the new owner runs nothing of the partition before, and the two nodes' channel would fill
        with forwards it cannot acknowledge, the hand-over stuck behind them (durable seed 11122
        of the 100 s schedules: the partition stalled, and its state was lost when the old owner
        left at last)."""
        if self.ownership.state[env.partition] == "draining":
            self.held_back.setdefault(env.partition, deque()).append((channel, env))
            return True
        target = self.membership.owner(self.service, env.partition)
        if target is None and env.partition not in self.last_held:
            # every instance leaves, and the partition's dedup ids are not here: it waits, unacknowledged,
            # rather than run twice (chaos pipeline seed 7 on hosts: at the end, a newcomer that never had it)
            self.orphans.setdefault(env.partition, deque()).append((channel, env))
            return True
        if target is None or target.incarnation == self.me:
            return False
        outbox = self.outbox
        self.counters.forwarded += 1
        if env.msg_id not in self.forwarded:  # (forwarded again: it keeps the place of its first arrival)
            self.arrivals += 1
            self.forwarded[env.msg_id] = self.arrivals
            self.ownership.pause(env.partition)
        item = Outgoing(
            env.kind, env.flags, env.type.encode(), env.key, env.partition, env.msg_id, env.trace_id, env.cause_id,
            env.payload, _Forwarded(channel, env, outbox, self), raw=env.raw,
        )
        outbox.append(outbox.channel(target), item, self.clock(), forward=True)
        return True

    def forward_done(self, env: Any) -> None:
        """A forward of ours is done: acknowledged by its target, taken back, or sent back to us.

        While any forward of a partition is out, the partition stays closed to new arrivals even
        once it is ours (they wait, numbered, in its queue): a forward made on a view older than
        its sender's may come back, and must run before what came after it (nemesis durable
        seeds 2155 and, the partition ours at once through an early hand-over, 5098)."""
        if self.forwarded.pop(env.msg_id, None) is not None:
            self.ownership.resume(env.partition)  # (what waits in its queue runs at the next tick, first)

    def take_back(self, items: list[Outgoing]) -> list[Outgoing]:
        """Envelopes of a channel whose receiver is gone, less our forwards of partitions that are
        ours again in this view: those run here, now and in their arrival order.

        Sent round to this node's own endpoint instead, they would come back a round trip (or a
        retransmission) later, behind arrivals of their keys that came after them and ran here
        meanwhile: per-key order lost (nemesis seed 586)."""
        work = self.work
        if work is None:
            return items
        kept: list[Outgoing] = []
        now = self.clock()
        for item in items:
            forwarded = item.on_done
            if isinstance(forwarded, _Forwarded) and item.home is None:  # (a kept copy ran there: see Router.send_again)
                owner = self.membership.owner(self.service, item.partition)
                if owner is not None and owner.incarnation == self.me:
                    work.deliver(forwarded.channel, forwarded.env, now)
                    self.forward_done(forwarded.env)  # (a no-op if the delivery queued it in its place)
                    continue
            kept.append(item)
        if len(kept) < len(items):
            log.info("%s: %d forwarded messages run here after all: their target is gone, their partitions ours",
                     self.name, len(items) - len(kept))
            work.pump()
        return kept

    @property
    def busy(self) -> bool:
        """Partitions still draining, or arrivals still buffered or held back."""
        return bool(self.ownership.draining or self.ownership.buffered or self.held_back)


class _Sending:
    """One partition's hand-over stream, to one receiver."""

    __slots__ = ("pump", "target", "refusals", "retry_at", "ids")

    def __init__(self, pump: Pump, target: int) -> None:
        self.pump = pump
        self.target = target
        self.ids: set[int] = set()  # every stream sent for this move: a verdict on any of them counts
        self.refusals = 0
        self.retry_at: float | None = None  # refused: send a fresh stream then


class TransferStats:
    """What this node streamed and received (partitions moving, their keys and bytes)."""

    __slots__ = ("streams_sent", "streams_done", "streams_received", "streams_refused", "entries_sent", "entries_received",
                 "bytes_sent", "bytes_received", "first_sent_at", "last_done_at")

    def __init__(self) -> None:
        self.streams_sent = self.streams_done = self.streams_received = self.streams_refused = 0
        self.entries_sent = self.entries_received = self.bytes_sent = self.bytes_received = 0
        self.first_sent_at = self.last_done_at = 0.0  # the node's clock: how long moves took

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}
