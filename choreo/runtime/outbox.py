"""Everything this node sends its peers: channels, batches, acks, replies, and what waits for an instance.

How this works. There is one :class:`~choreo.runtime.channels.OutChannel` per receiver
incarnation and one :class:`~choreo.runtime.channels.InChannel` per sender incarnation.
Envelopes appended to a channel collect into its pending batch; :meth:`Outbox.flush` (run
when the event loop has nothing else to do, or when a batch fills) turns each pending batch
into one DATA frame: adaptive batching, throughput without added latency at low load. Acks
owed to senders are sent at the same moment, riding on a DATA or REPLY frame to the same peer
when there is one (``FLAG_ACK``), as a frame of their own otherwise. Answers to commands and
queries queue per peer and always leave before the ack that completes their command.

Envelopes whose service is declared but has no live instance right now wait here
(:meth:`Outbox.park`), in order, until routing finds them one. The application's own messages
wait only while there is room (:meth:`Outbox.has_room`: a window's worth per service, in
envelopes and bytes); beyond that the caller waits, then gets ``Backpressure``.

A durable node (with a :class:`~choreo.runtime.journal.Journal`) flushes differently: batches
leave as they fill, but answers and acknowledgements wait for the commit that covers them. Its
flush takes every pending batch (the journal keeps each body until it is acknowledged) and a
snapshot of every ack due, commits, and sends the answers, then the acks, once that commit is
durable (at once under ``fsync="interval"``/``"off"``; after its sync under ``"batch"``); no ack
rides on a data frame. A commit that fails holds them until one succeeds.

>>> from choreo.config import NodeConfig
>>> from choreo.runtime.holds import Holds
>>> from choreo.runtime.stats import Counters
>>> class Wire:
...     endpoint = "fake://me"
...     def __init__(self): self.frames = []
...     def send(self, endpoint, frame): self.frames.append(endpoint)
>>> outbox = Outbox(Wire(), NodeConfig(), clock=lambda: 0.0, holds=Holds(), counters=Counters())
>>> outbox.idle
True
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .. import wire
from ..config import NodeConfig
from .channels import InChannel, OutChannel, Outgoing, SafeOnceStored
from .former import FormerLife
from .holds import Holds
from .journal import Journal
from .membership import Peer
from .stats import Counters

__all__ = ["Outbox", "Sender"]

_REQUEST_KINDS = (wire.KIND_COMMAND, wire.KIND_QUERY)


class Sender(Protocol):
    """What the outbox needs of the network: send one frame to an endpoint; dial one afresh."""

    def send(self, endpoint: str, frame: bytes) -> None: ...

    def redial(self, endpoint: str) -> None: ...


def _split(entries: list[bytes], limit: int) -> list[bytes]:
    """Answer entries as REPLY bodies of at most ``limit`` bytes each (one entry may be alone above it)."""
    bodies: list[bytes] = []
    part: list[bytes] = []
    size = 0
    for entry in entries:
        if part and size + len(entry) > limit:
            bodies.append(b"".join(part))
            part, size = [], 0
        part.append(entry)
        size += len(entry)
    if part:
        bodies.append(b"".join(part))
    return bodies


class _Answers:
    """Answers waiting for one peer, and their size (one REPLY frame stays within a batch)."""

    __slots__ = ("peer", "entries", "size")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.entries: list[bytes] = []
        self.size = 0


class Outbox:
    """The sending side of one node incarnation (see the module docstring)."""

    def __init__(
        self,
        sender: Sender,
        config: NodeConfig,
        *,
        clock: Callable[[], float],
        holds: Holds,
        counters: Counters,
        journal: Journal | None = None,
    ) -> None:
        self.sender = sender
        self.config = config
        self.clock = clock
        self.holds = holds
        self.counters = counters
        self.incarnation = 0
        self.out: dict[int, OutChannel] = {}  # receiver incarnation -> channel
        self.inbound: dict[int, InChannel] = {}  # sender incarnation -> channel (what we owe acks on)
        # channels with a pending batch (shared with the emit lane) and with an ack due: dicts, not
        # sets, so that frames leave in the same order on every run (the harness replays by seed)
        self.dirty_out: dict[OutChannel, None] = {}
        self.dirty_in: dict[InChannel, None] = {}
        self.replies: dict[int, _Answers] = {}  # peer incarnation -> answers to send
        self.waiting: dict[str, deque[Outgoing]] = {}  # service -> envelopes waiting for an instance
        # a durable node that leaves: what its handlers emit for a service with no instance counts
        # as safe once stored, as in a window (see park): it takes no new work that could pile up
        self.parked_is_stored = False
        # service -> its last instances, leaving (by incarnation), and the flows each still works on (wire.Flows)
        self.flows: dict[str, dict[int, tuple[Peer, frozenset[bytes]]]] = {}
        self.waiting_bytes: dict[str, int] = {}
        self.flush_scheduled = False
        self.hold_acks = False  # received envelopes wait for their handlers: their acks wait too
        self._loop: asyncio.AbstractEventLoop | None = None
        self.journal = journal
        self.on_open: Callable[[Peer], None] | None = None  # a channel to ``peer`` opens (see Contacts.introduce)
        self.held_acks: dict[InChannel, bytes] = {}  # durable nodes: acks taken, waiting for their commit
        # and, committed, waiting for their commit to be durable: (generation, answers, acks)
        self._unreleased: deque[tuple[int, dict[int, tuple[Peer, list[bytes]]], dict[InChannel, bytes]]] = deque()
        if journal is not None:
            self.flush = self._flush_durable  # type: ignore[method-assign]
            journal.wake = self.schedule_flush
            journal.on_durable = self._release

    def start(self, loop: asyncio.AbstractEventLoop | None, incarnation: int) -> None:
        self._loop = loop
        self.incarnation = incarnation

    # -- frames out ------------------------------------------------------------------------------

    def redial(self, endpoint: str) -> None:
        """Dial ``endpoint`` afresh (counted; see :meth:`~choreo.runtime.contacts.Contacts.redial`)."""
        self.counters.redials += 1
        self.sender.redial(endpoint)

    def send(self, endpoint: str, frame: bytes) -> None:
        """One frame to one endpoint (counted)."""
        self.counters.frames_out += 1
        self.sender.send(endpoint, frame)

    def keep(self, channel: InChannel, seq: int, ran: bool = False) -> None:
        """Envelope ``seq`` of ``channel`` will be acknowledged before it is done (it went running
        with a hand-over, or relieves a stalled channel): every ACK frame of the channel asks its
        sender to keep a copy, until :meth:`release` (see :data:`~choreo.wire.FLAG_KEEP`).
        ``ran``: it ran here, or its id did (:data:`~choreo.wire.KEEP_RAN`)."""
        if channel.peer.incarnation == self.incarnation:
            return  # (a copy at ourselves would die with us)
        if seq not in channel.keep:
            channel.keep.append(seq)
        if ran:
            channel.ran.add(seq)

    def kept_ran(self, kept: Iterable[tuple[InChannel, int]]) -> None:
        """Envelopes acknowledged before they ran, their senders keeping copies (relief.py), ran
        now (here, or at the owner they were passed on to) and wait for their outputs: the next
        ACK frame of each channel says so (:data:`~choreo.wire.KEEP_RAN`). A hold of such a
        sender's waits for a copy until then (see Holds), and what it keeps back may be the very
        flow the message waits for."""
        for channel, seq in kept:
            if seq in channel.keep and seq not in channel.ran and not channel.closed:
                channel.ran.add(seq)
                self.ack_later(channel)

    def release(self, channel: InChannel, seq: int, msg_id: bytes) -> None:
        """Kept envelope ``seq`` (id ``msg_id``) is done: its sender's copy may go."""
        if seq not in channel.keep:
            return
        channel.keep.remove(seq)
        channel.ran.discard(seq)
        channel.released = True
        self.ack_later(channel)  # (its ACK frame no longer lists seq: should the RELEASE be lost)
        peer = channel.peer
        if peer.live and not channel.closed:
            body = wire.Release([msg_id])
            self.send(peer.endpoint, wire.encode_control(wire.RELEASE, self.incarnation, peer.incarnation, body))

    def schedule_flush(self) -> None:
        """Flush once the event loop gets control back (many appends, one frame per channel)."""
        if not self.flush_scheduled and self._loop is not None:
            self.flush_scheduled = True
            self._loop.call_soon(self.flush)

    def ack_later(self, channel: InChannel) -> None:
        self.dirty_in[channel] = None
        if not self.flush_scheduled:  # (usually is: a read flushes after its frames)
            self.schedule_flush()

    def send_replies(self) -> None:
        """The answers queued so far leave now (a durable node's wait for their commit)."""
        if self.replies and self.journal is None:
            replies, self.replies = self.replies, {}
            for inc, answers in replies.items():
                if answers.peer.live:
                    self.send(answers.peer.endpoint, self.frame_to(wire.REPLY, inc, b"".join(answers.entries)))

    def flush(self) -> None:
        """Send every pending batch, answer and ack: called when the loop has nothing else to do."""
        self.flush_scheduled = False
        if self.replies:
            self.send_replies()  # before any ack that covers the commands they answer
        dirty = self.dirty_out
        if dirty:
            channels = list(dirty)
            dirty.clear()  # (the emit lane holds this set: it is cleared, never replaced)
            for ch in channels:
                body = ch.take_body()
                if body is not None and ch.peer.live:
                    self.send_data(ch, body, ch.take_urgent())
        if self.dirty_in and not self.hold_acks:
            # (while received envelopes wait to be handled, their acks wait too: one ack after the
            # handlers says more, and costs the sender one wake-up instead of two)
            self.send_acks()
        elif self.dirty_in:
            # ... unless a quarter of a window is done and unacknowledged on a channel: its sender
            # gets that credit back now, so it need not stop while this node works through its queue
            quarter = self.config.window // 4
            for ich in [ich for ich in self.dirty_in if ich.unacked_done >= quarter]:
                del self.dirty_in[ich]
                if ich.peer.live and not ich.closed:
                    self.send_ack(ich)

    def send_acks(self) -> None:
        """Every ack due, now (:meth:`flush`'s, once nothing holds them back; and a life's last,
        before its channels close: answers first, :meth:`send_replies`)."""
        dirty_in, self.dirty_in = self.dirty_in, {}
        for ich in dirty_in:
            if (ich.reorder.ack_pending or ich.released) and ich.peer.live and not ich.closed:
                self.send_ack(ich)

    def _flush_durable(self) -> None:
        """The flush of a durable node (see the module docstring)."""
        self.flush_scheduled = False
        journal = self.journal
        assert journal is not None
        dirty = self.dirty_out
        if dirty:
            channels = list(dirty)
            dirty.clear()
            for ch in channels:
                urgent = ch.take_urgent()
                body = ch.take_body()  # the journal keeps it until it is acknowledged
                if body is not None and ch.peer.live:
                    flags = wire.FLAG_URGENT if urgent else 0
                    self.send(ch.peer.endpoint, wire.frame(wire.DATA, self.incarnation, ch.peer.incarnation, body, flags))
        if self.dirty_in and not self.hold_acks:
            dirty_in, self.dirty_in = self.dirty_in, {}
            held = self.held_acks
            for ich in dirty_in:
                if (ich.reorder.ack_pending or ich.released) and ich.peer.live and not ich.closed:
                    held[ich] = ich.reorder.ack_frame()  # what is done now: its ids commit below
        if journal.should_commit(bool(self.held_acks or self.replies)) and journal.commit():
            if self.replies or self.held_acks:
                self._unreleased.append((journal.written, self.replies, self.held_acks))
                self.replies, self.held_acks = {}, {}
            journal.settle()  # releases them (_release) once their commit is durable

    def _release(self, durable: int) -> None:
        """Commits up to ``durable`` are safe: send the answers, then the acks, that waited for them."""
        queue = self._unreleased
        while queue and queue[0][0] <= durable:
            _, replies, acks = queue.popleft()
            for inc, answers in replies.items():  # answers first: acks complete their commands
                peer = answers.peer
                if peer.live:
                    for body in _split(answers.entries, self.config.max_batch_bytes):
                        self.send(peer.endpoint, wire.frame(wire.REPLY, self.incarnation, inc, body))
            for ich, ack in acks.items():
                ich.last_ack = ack
                if ich.peer.live and not ich.closed:
                    self.send(ich.peer.endpoint, ich.framed(ack))

    def frame_to(self, frame_type: int, incarnation: int, body: bytes, flags: int = 0) -> bytes:
        """A DATA or REPLY frame for a peer, carrying our ack of its data when one is due."""
        ich = self.inbound.get(incarnation)
        ack = ich.take_ack() if ich is not None else None
        if ack is None:
            return wire.frame(frame_type, self.incarnation, incarnation, body, flags)
        head = wire.HEADER.pack(wire.MAGIC, wire.VERSION, frame_type, flags | wire.FLAG_ACK, self.incarnation, incarnation)
        return b"".join((head, wire.PIGGY.pack(len(ack)), ack, body))

    def send_ack(self, ich: InChannel) -> None:
        """A standalone ack; replies still queued for that peer go first (they carry it)."""
        if self.journal is not None:  # the last committed ack; replies wait for their commit
            self.send(ich.peer.endpoint, ich.ack_frame())
            return
        inc = ich.peer.incarnation
        queued = self.replies.pop(inc, None) if self.replies else None
        if queued:
            self.send(ich.peer.endpoint, self.frame_to(wire.REPLY, inc, b"".join(queued.entries)))
            if not ich.keep and not ich.released:
                return  # (the ack rode on the answers)
        self.send(ich.peer.endpoint, ich.ack_frame())

    def send_data(self, ch: OutChannel, body: bytes, urgent: bool = False) -> None:
        """One DATA frame; ``urgent``: its body holds commands or queries (the receiver takes them first)."""
        inc = ch.peer.incarnation
        if self.journal is not None:  # no piggybacked ack, no answer before its commit
            self.send(ch.peer.endpoint, wire.frame(wire.DATA, self.incarnation, inc, body, wire.FLAG_URGENT if urgent else 0))
            return
        queued = self.replies.pop(inc, None) if self.replies else None
        if queued:  # answers first: a piggybacked ack may cover their commands
            self.send(ch.peer.endpoint, self.frame_to(wire.REPLY, inc, b"".join(queued.entries)))
        self.send(ch.peer.endpoint, self.frame_to(wire.DATA, inc, body, wire.FLAG_URGENT if urgent else 0))

    def send_full(self, ch: OutChannel) -> None:
        """A channel's pending batch is full: it leaves now."""
        body = ch.take_body()
        if body is not None:
            self.send_data(ch, body, ch.take_urgent())

    def queue_reply(self, peer: Peer, entry: bytes) -> None:
        """An answer for ``peer``; it leaves with the next flush, ahead of any ack (at once when the
        answers waiting for that peer fill a batch: one REPLY frame stays within the frame limit)."""
        queued = self.replies.get(peer.incarnation)
        if queued is not None and queued.size + len(entry) > self.config.max_batch_bytes and self.journal is None:
            del self.replies[peer.incarnation]
            if peer.live:
                self.send(peer.endpoint, self.frame_to(wire.REPLY, peer.incarnation, b"".join(queued.entries)))
            queued = None
        if queued is None:
            queued = self.replies[peer.incarnation] = _Answers(peer)
        queued.entries.append(entry)
        queued.size += len(entry)
        if not self.flush_scheduled:
            self.schedule_flush()

    # -- channels --------------------------------------------------------------------------------

    def channel(self, peer: Peer) -> OutChannel:
        """The channel to ``peer`` (opened on first use)."""
        ch = self.out.get(peer.incarnation)
        if ch is None or ch.closed:
            c = self.config
            ch = OutChannel(self.incarnation, peer, c.window, c.window_bytes, c.rto, c.rto_max, c.max_batch, c.max_batch_bytes)
            if self.journal is not None:
                ch.journal = self.journal
                ch.records = deque()
            self.out[peer.incarnation] = ch
            if self.on_open is not None:
                self.on_open(peer)
        return ch

    def inbound_from(self, peer: Peer) -> InChannel:
        """The channel from ``peer`` (opened on its first data)."""
        ich = self.inbound.get(peer.incarnation)
        if ich is None:
            ich = self.inbound[peer.incarnation] = InChannel(
                self.incarnation, peer, self.config.window, durable=self.journal is not None
            )
        return ich

    def append(self, ch: OutChannel, item: Outgoing, now: float, *, forward: bool = False) -> None:
        """Put one envelope on a channel (or behind a hold, or in its backlog) and get it on its way.

        ``forward``: one this node passes on for its sender (:meth:`Moves.forward
        <choreo.runtime.moves.Moves.forward>`), never behind this node's own holds: they order
        what it sends itself after what it has in flight, and the forward is one of those it
        has in flight when it sent it to itself (held, it would wait for its own ack)."""
        if self.holds.by_key and not forward and self._behind_hold(ch.peer.service_name, item):
            return
        ch.push(item, now)
        self.dirty_out[ch] = None
        if ch.batch_full:
            body = ch.take_body()
            if body is not None:
                self.send_data(ch, body, ch.take_urgent())
        self.schedule_flush()

    def retransmit(self, now: float) -> None:
        """Resend what waited too long for its ack (the windows say what and when)."""
        for ch in list(self.out.values()):
            if ch.window.in_flight and ch.peer.live:
                body = ch.window.due(now)
                if body is not None:  # it may hold commands: the receiver looks (retransmissions are rare)
                    self.send_data(ch, body, True)

    def next_retransmission(self) -> float:
        """The earliest time :meth:`retransmit` may have something to resend (inf: nothing)."""
        due = math.inf
        for ch in self.out.values():
            if ch.window.in_flight and ch.peer.live:
                due = min(due, ch.window.next_deadline())
        return due

    def close(self, incarnation: int, keep_ran: Callable[[InChannel], None] | None = None) -> OutChannel | None:
        """The peer is gone: close both channels with it; returns the outbound one to evacuate.

        ``keep_ran``: what ran from it is acknowledged first, with a copy kept of what waits for
        its outputs or its standby (``PartitionData.keep_all_ran``). A peer the mesh declared
        dead may live on: it takes the ack as it is, or, rejoined at the same endpoint, as its
        former life's (former.py), and sends the kept copies back here, where their ids are.
        Left without an ack, what ran here went again by partition, and ran twice should this
        node rejoin too before it was done (at the heal of a long partition every node rejoins,
        each in the order it hears of it)."""
        gone_in = self.inbound.pop(incarnation, None)
        if gone_in is not None:
            if keep_ran is not None and self.journal is None:  # (a durable node acks what it committed)
                keep_ran(gone_in)
                if gone_in.reorder.ack_pending or gone_in.released or gone_in.keep:  # (something to say)
                    self.send_ack(gone_in)
            gone_in.closed = True
        ch = self.out.pop(incarnation, None)
        if ch is not None:
            self.counters.redelivered_closed += ch.window.stats().retransmitted
        return ch

    def evacuate_all(self, incarnation: int, former: FormerLife | None = None) -> list[tuple[str | None, Outgoing]]:
        """This node re-incarnates: every channel is void. Returns what was not yet done, by
        service; ``former`` records what was in flight, for acks that come late (see former.py)."""
        leftovers: list[tuple[str | None, Outgoing]] = []
        for ch in list(self.out.values()):
            self.counters.redelivered_closed += ch.window.stats().retransmitted
            in_flight: dict[int, Outgoing] = {}
            items = ch.evacuate(in_flight if former is not None else None)
            if former is not None:
                former.record(ch.peer, in_flight)
            leftovers.extend((ch.peer.service_name, item) for item in items)
        for ich in self.inbound.values():
            ich.closed = True
        self.out.clear()
        self.inbound.clear()
        self.dirty_out.clear()
        self.dirty_in.clear()
        self.incarnation = incarnation
        return leftovers

    # -- waiting for an instance -------------------------------------------------------------------

    def _behind_hold(self, service: str | None, item: Outgoing) -> bool:
        """Queue ``item`` behind the hold on its partition, if one is open (see :mod:`.holds`):
        behind what the partition's old owner still holds. True if it was."""
        hold = self.holds.for_item(service, item)
        if hold is None:
            return False
        hold.queue.append(item)
        if self.journal is not None:
            self.journal.limbo(item, service)
        return True

    def park(self, service: str, item: Outgoing, *, new: bool = False) -> None:
        """``item`` is for ``service``, which has no live instance now: it waits, in order (or,
        part of a flow its last instance finishes as it leaves, goes to that instance).

        A ``new`` message (just emitted or sent, not one resent or put back) of a partition a
        hold keeps waits behind the hold instead, as it would with an owner: the hold's messages
        are older, and join this queue only when it passes (chaos pipeline seed 214: the next
        service's newcomer handled a key's newest event before the 20 the hold had kept)."""
        if self.flows:
            leaver = self._flow_home(service, item)
            if leaver is not None:
                self.append(self.channel(leaver), item, self.clock())
                return
        if new and self.holds.by_key and self._behind_hold(service, item):
            return
        queue = self.waiting.get(service)
        if queue is None:
            queue = self.waiting[service] = deque()
        queue.append(item)
        self.waiting_bytes[service] = self.waiting_bytes.get(service, 0) + item.size
        if self.journal is not None:
            self.journal.limbo(item, service)
            if self.parked_is_stored:
                self._stored(item)

    def store_parked(self) -> None:
        """A durable node leaves: the handlers' outputs that wait for an instance count as safe
        once stored from now on (their inputs are acknowledged once the store has them), as they
        would in a window. Until then they wait for the receiver, which bounds what the store
        keeps for an absent service by its producers' windows; a leaving node takes no new work.
        Without this its partitions could not be handed over while such a service has no
        instance (their messages would stay in progress), and its drain would time out."""
        self.parked_is_stored = True
        for queue in self.waiting.values():
            for item in queue:
                self._stored(item)

    @staticmethod
    def _stored(item: Outgoing) -> None:
        done = item.on_done
        if type(done) is SafeOnceStored:
            item.on_done = None
            done()

    def unpark(self, item: Outgoing) -> bool:
        """Take ``item`` out of the queue it waits in (it is done after all); False if it waits in none."""
        for service, queue in self.waiting.items():
            if item in queue:
                self._leave_waiting(service, [item])
                return True
        return False

    def _leave_waiting(self, service: str, items: list[Outgoing]) -> None:
        """``items`` leave ``service``'s waiting queue unsent."""
        queue = self.waiting[service]
        for item in items:
            queue.remove(item)
            self.waiting_bytes[service] -= item.size
            if item.row and self.journal is not None:
                self.journal.unlimbo(item)
        if not queue:
            self.take_waiting(service)

    def withdraw(self, msg_id: bytes) -> int:
        """Copies of a command or query waiting for an instance whose answer came meanwhile (to
        another copy of the same id): they leave unsent. Sent later to a new instance, which has
        no record of the first, they would run it again. Returns how many left."""
        gone = 0
        for service, queue in list(self.waiting.items()):
            stale = [item for item in queue if item.msg_id == msg_id and item.kind in _REQUEST_KINDS]
            if stale:
                self._leave_waiting(service, stale)
                gone += len(stale)
        return gone

    def has_room(self, service: str, nbytes: int) -> bool:
        """Whether one more envelope of the application's may wait for ``service`` (a window's worth)."""
        queue = self.waiting.get(service)
        if not queue:
            return True
        return len(queue) < self.config.window and self.waiting_bytes[service] + nbytes <= self.config.window_bytes

    def flows_of(self, service: str, leaver: Peer, traces: frozenset[bytes]) -> None:
        """``leaver``, a last instance of ``service``, leaves and still works on ``traces``
        (wire.Flows): what of them waits here goes to it now, the rest waits on, in order."""
        leavers = self.flows.setdefault(service, {})
        if traces:
            leavers[leaver.incarnation] = (leaver, traces)
        else:
            leavers.pop(leaver.incarnation, None)
            if not leavers:
                del self.flows[service]
            return
        queue = self.waiting.get(service)
        if not queue or not any(item.trace_id in traces for item in queue):
            return
        now = self.clock()
        stay: deque[Outgoing] = deque()
        ch = self.channel(leaver)
        for item in queue:
            if item.trace_id in traces:
                self.waiting_bytes[service] -= item.size
                self.append(ch, item, now)
            else:
                stay.append(item)
        if stay:
            self.waiting[service] = stay
        else:
            self.waiting.pop(service, None)
            self.waiting_bytes.pop(service, None)

    def _flow_home(self, service: str, item: Outgoing) -> Peer | None:
        """The leaving last instance of ``service`` that works on ``item``'s flow, if one does."""
        leavers = self.flows.get(service)
        if not leavers:
            return None
        for incarnation, (leaver, traces) in list(leavers.items()):
            if not leaver.live:
                del leavers[incarnation]
            elif item.trace_id in traces:
                return leaver
        if not leavers:
            del self.flows[service]
        return None

    def take_waiting(self, service: str) -> deque[Outgoing] | None:
        """Everything waiting for ``service``, in order (to route it again)."""
        self.waiting_bytes.pop(service, None)
        return self.waiting.pop(service, None)

    def waiting_count(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    # -- reading ---------------------------------------------------------------------------------

    def live_channels(self) -> Iterator[OutChannel]:
        return (ch for ch in self.out.values() if ch.peer.live and not ch.closed)

    @property
    def idle(self) -> bool:
        """Everything sent is done and nothing waits for an instance: acknowledged, and released
        where a receiver acknowledged it early (its copy kept here is the message's only other
        home: a flush or a drain that ended before would leave it with the receiver alone)."""
        return all(ch.idle for ch in self.live_channels()) and not self.waiting

    @property
    def kept(self) -> int:
        """Copies kept beyond their ack for receivers that acknowledged them early (see
        :meth:`OutChannel.keep <choreo.runtime.channels.OutChannel.keep>`)."""
        return sum(len(ch.custody) for ch in self.out.values())

    @property
    def acks_owed(self) -> bool:
        """Some live sender still waits for us to finish (and acknowledge) what it sent."""
        return any(not ich.idle for ich in self.inbound.values() if ich.peer.live)

    def live_rows(self) -> set[int]:
        """Durable nodes: the outbox rows that envelopes still refer to (the journal's sweep)."""
        rows: set[int] = set()
        for ch in self.out.values():
            rows.update(r.row for r in ch.records or () if r.written)
            rows.update(r.row for r in ch.kept_records.values() if r.written)
            rows.update(item.row for item in ch.backlog if item.row)
        for queue in self.waiting.values():
            rows.update(item.row for item in queue if item.row)
        for hold in self.holds.by_key.values():
            rows.update(item.row for item in hold.queue if item.row)
        return rows

    def in_flight(self) -> int:
        """Envelopes sent and not yet acknowledged, or waiting for credit or for an instance."""
        return sum(ch.window.in_flight + len(ch.backlog) for ch in self.out.values()) + self.waiting_count()

    def redelivered(self) -> int:
        return self.counters.redelivered_closed + sum(ch.window.stats().retransmitted for ch in self.out.values())

    def load(self, peer: Peer) -> int:
        """How much waits on the channel to ``peer`` (for spreading unkeyed messages)."""
        ch = self.out.get(peer.incarnation)
        return 0 if ch is None else ch.window.in_flight + len(ch.backlog)

