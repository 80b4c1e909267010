"""Delivery sessions: one outbound and one inbound channel per pair of node incarnations.

An :class:`OutChannel` wraps the core's ``OutboundWindow`` for one receiver: it appends
envelopes (or parks them in a backlog while credit is exhausted), turns pending envelopes into
one DATA frame per flush, applies the receiver's acks, and calls back whoever waits for a
particular sequence number to be done (an input message whose outputs must be safe before it
is acknowledged itself).

An :class:`InChannel` wraps the core's ``InboundReorder`` for one sender: DATA frames go in,
envelopes come out strictly in order, and the ack to send back is read from it.

A receiver that acknowledges a message before it is done (its partition was handed over with
it running, the new owner answering for its outputs; or it held the credit of a channel that
stalled: :mod:`~choreo.runtime.relief`) asks the sender, in every ACK frame of the channel until
then (:attr:`InChannel.keep`, ``FLAG_KEEP``), to keep a copy of it beyond the ack
(:meth:`OutChannel.keep`), and says when it is done (a ``RELEASE`` frame, and the next ACK frames
no longer list it). Should that receiver die or leave first, the copies go to the partition's
owner with what was in flight (:meth:`OutChannel.evacuate`): one nobody alive knew of runs again
instead of being lost.

Both are thin: the decisions are the core's; these classes hold the Python-side bookkeeping
(callbacks, frames, the backlog) that the core deliberately knows nothing about.

On a durable node (one with a :class:`~choreo.runtime.journal.Journal`) an out-channel also
tells the journal what it sends and what its receiver acknowledged, and an in-channel sends
only acknowledgements the node has committed (:attr:`InChannel.last_ack`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .. import core, wire

if TYPE_CHECKING:  # pragma: no cover
    from .membership import Peer

__all__ = ["Outgoing", "OutChannel", "InChannel", "SafeOnceStored", "ChannelJournal"]

Callback = Callable[[], None]
_KIND_COMMAND, _KIND_QUERY = wire.KIND_COMMAND, wire.KIND_QUERY

EMPTY_ACK = core.encode_ack(0, 0, [])
# copies a channel keeps for its receiver at most (it asks for one per message it hands over
# running, and says when each is done), and at most the window's bytes: beyond that the oldest
# go, so that a receiver that never releases them holds a bounded share of the sender's memory
CUSTODY_MAX = 4096


class SafeOnceStored(partial):  # type: ignore[type-arg]
    """The ``on_done`` of what a handler emitted, on a durable node: the output is safe once it is
    in a window (its batch commits before the handler's input is acknowledged), so it is called
    then, instead of when the receiver acknowledges it. While the output waits outside a window
    (no credit, no instance) it keeps waiting for the receiver, as on a node without a store:
    that bounds what a node stores for a slow or absent receiver by its producers' windows."""

    __slots__ = ()


class ChannelJournal(Protocol):
    """What a durable node's out-channels tell its journal (:class:`~choreo.runtime.journal.Journal`)."""

    def body(self, ch: OutChannel, body: bytes) -> None: ...

    def acked(self, ch: OutChannel) -> None: ...

    def closed(self, ch: OutChannel) -> None: ...

    def released(self, ch: OutChannel, msg_id: bytes) -> None: ...

    def limbo(self, item: Outgoing, service: str | None) -> None: ...

    def unlimbo(self, item: Outgoing) -> None: ...


class Outgoing:
    """One envelope waiting for credit, with what to call once it is done downstream."""

    __slots__ = (
        "kind", "flags", "type", "key", "partition", "msg_id", "trace_id", "cause_id", "payload", "on_done", "raw",
        "row", "home",
    )

    def __init__(
        self,
        kind: int,
        flags: int,
        type: bytes,
        key: bytes,
        partition: int,
        msg_id: bytes,
        trace_id: bytes,
        cause_id: bytes,
        payload: bytes,
        on_done: Callback | None,
        raw: bytes | None = None,
    ) -> None:
        self.kind = kind
        self.flags = flags
        self.type = type
        self.key = key
        self.partition = partition
        self.msg_id = msg_id
        self.trace_id = trace_id
        self.cause_id = cause_id
        self.payload = payload
        self.on_done = on_done
        # a copy its receiver asked us to keep (FLAG_KEEP) as one that ran there (KEEP_RAN): that
        # receiver's endpoint, where its next life has its id, should it go (see Router.send_again)
        self.home: str | None = None
        self.raw = raw  # an already encoded envelope being moved from another channel
        self.row = 0  # durable nodes: its outbox row while it waits outside a window (0: none)

    @property
    def size(self) -> int:
        if self.raw is not None:
            return len(self.raw)
        return core.HEADER_SIZE + len(self.type) + len(self.key) + len(self.payload)


class OutChannel:
    """The sender side towards one receiver incarnation."""

    def __init__(
        self,
        me: int,
        peer: Peer,
        window: int,
        window_bytes: int,
        rto: float,
        rto_max: float,
        max_batch: int,
        max_batch_bytes: int,
    ) -> None:
        self.peer = peer
        self.window = core.OutboundWindow(
            max_messages=max(1, min(window, peer.window)), max_bytes=window_bytes, rto=rto, rto_max=rto_max
        )
        self.backlog: deque[Outgoing] = deque()
        self.watch: dict[int, Callback] = {}  # seq -> called when that seq is done (insertion = seq order)
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.me = me
        self.credit_waiters: list[Callback] = []
        self.urgent_waiters: list[Callback] = []  # callers of commands and queries: woken first
        self.closed = False
        self.done_upto = 0  # every seq up to here is done (the receiver's cumulative ack)
        # durable nodes: the journal, and the batch bodies sent here that are not all acknowledged
        self.journal: ChannelJournal | None = None
        self.records: deque[Any] | None = None  # the journal's Records
        self.kept_records: dict[bytes, Any] = {}  # msg id of a copy kept -> the Record that keeps it
        self.urgent = False  # the pending batch holds a command or query (its frame says so)
        self.custody: dict[bytes, Outgoing] = {}  # msg id -> a copy kept beyond its ack (see keep)
        self.custody_bytes = 0
        self._asked: set[int] = set()  # unacknowledged seqs a copy was taken of (later acks ask again)
        # seq -> the home of a kept copy on its way back there (Outgoing.home): it keeps that home
        # should the channel close before the ack (its sender rejoins too: see evacuate)
        self.homes: dict[int, str] = {}

    # -- sending -------------------------------------------------------------------------------

    def can_accept(self, nbytes: int) -> bool:
        """Whether an envelope from the application may go in now (the backlog goes first)."""
        return not self.backlog and self.window.has_credit(nbytes)

    def append(self, item: Outgoing, now: float) -> int:
        """Put an envelope in the window (credit must be available); returns its seq."""
        if item.raw is not None:
            seq = self.window.append_raw(item.raw, now)
            if item.home is not None:
                self.homes[seq] = item.home
                item.home = None
        else:
            seq = self.window.append(
                item.kind,
                item.flags,
                item.type,
                item.key,
                item.partition,
                item.msg_id,
                item.trace_id,
                item.cause_id,
                item.payload,
                now,
            )
        done = item.on_done
        if done is not None:
            if self.records is not None and type(done) is SafeOnceStored:
                item.on_done = None
                done()  # a handler's output on a durable node: safe once this body commits
            else:
                self.watch[seq] = done
        if item.row:
            self.journal.unlimbo(item)  # type: ignore[union-attr]
        if item.kind == _KIND_COMMAND or item.kind == _KIND_QUERY:
            self.urgent = True  # the next batch holds a command or query
        return seq

    def push(self, item: Outgoing, now: float) -> None:
        """Append now if credit allows and nothing waits before it, else park it in the backlog."""
        if not self.backlog and self.window.has_credit(item.size):
            self.append(item, now)
        else:
            self.backlog.append(item)
            self.window.held = True  # the emit lanes stay out while anything waits here
            if self.journal is not None:
                self.journal.limbo(item, self.peer.service_name)

    @property
    def batch_full(self) -> bool:
        return self.window.pending >= self.max_batch or self.window.pending_bytes >= self.max_batch_bytes

    def take_body(self) -> bytes | None:
        """The batch body of everything appended since the last call, or None (see :attr:`urgent`)."""
        body = self.window.flush()
        if body is not None and self.journal is not None:
            self.journal.body(self, body)
        return body

    def take_urgent(self) -> bool:
        """Whether the body just taken holds a command or query (and forget it)."""
        urgent, self.urgent = self.urgent, False
        return urgent

    # -- acks ----------------------------------------------------------------------------------

    def on_ack(self, data: bytes, offset: int, now: float, listed: bool = False) -> int:
        """Apply an ack (MalformedFrame if invalid), run the callbacks of finished seqs, refill.

        ``listed``: ``data`` is an ACK frame flagged :data:`~choreo.wire.FLAG_KEEP`, whose seqs to
        keep copies of (:meth:`keep`) come before the ack (ProtocolError if they overrun it). A
        copy whose seq an ack covers and does not list was released."""
        kept: list[int] = []
        if listed:
            kept, ran, offset = wire.split_keep(data)
            self.keep(kept)  # (taken before the ack frees them)
            if ran:
                self._ran(ran)
        cumulative, received, ranges = core.decode_ack(data, offset)
        if self.custody:
            self._drop_released(cumulative, kept)
        freed = self.window.on_ack(cumulative, received, ranges, now)
        if self.homes:
            for seq in [seq for seq in self.homes if seq <= cumulative]:
                del self.homes[seq]
        if cumulative > self.done_upto:
            self.done_upto = min(cumulative, self.window.next_seq - 1)
            if self.records:
                self.journal.acked(self)  # type: ignore[union-attr]
        if freed and self.watch:
            self._notify(cumulative, ranges)
        if freed and (self.backlog or self.window.held or self.credit_waiters or self.urgent_waiters):
            self.pump(now)  # (else it has nothing to move, release or wake)
        return freed

    def _notify(self, cumulative: int, ranges: list[tuple[int, int]]) -> None:
        watch = self.watch
        done: list[Callback] = []
        while watch:
            seq = next(iter(watch))
            if seq > cumulative:
                break
            done.append(watch.pop(seq))
        for lo, hi in ranges:
            if hi - lo < len(watch):
                for seq in range(lo, hi + 1):
                    cb = watch.pop(seq, None)
                    if cb is not None:
                        done.append(cb)
            else:
                for seq in [s for s in watch if lo <= s <= hi]:
                    done.append(watch.pop(seq))
        for cb in done:
            cb()

    def first_own_undone(self) -> int:
        """The seq of the first envelope not done that is not a forward (whose callback says
        ``forward``): one past the backlog if none is."""
        watch = self.watch
        if not any(getattr(done, "forward", False) for done in watch.values()):
            return self.done_upto + 1  # (no forward out, the usual case: the first not done is ours)
        for raw in self.window.unacked():
            seq = int.from_bytes(raw[:8], "little")
            if not getattr(watch.get(seq), "forward", False):
                return seq
        seq = self.window.next_seq  # the backlog takes the next seqs, in order
        for item in self.backlog:
            if not getattr(item.on_done, "forward", False):
                return seq
            seq += 1
        return seq

    def pump(self, now: float) -> None:
        """Move parked envelopes into the window while credit allows, then wake waiting emitters."""
        backlog = self.backlog
        while backlog and self.window.has_credit(backlog[0].size):
            self.append(backlog.popleft(), now)
        if not backlog:
            self.window.held = False
        if not backlog and (self.credit_waiters or self.urgent_waiters) and self.window.has_credit(0):
            self.wake_waiters()

    def wake_waiters(self) -> None:
        """Resume every caller waiting for credit here (each looks again), commands and queries
        first: their callers resume before the emitters that waited."""
        waiters = self.urgent_waiters + self.credit_waiters
        self.urgent_waiters, self.credit_waiters = [], []
        for wake in waiters:
            wake()

    # -- custody -------------------------------------------------------------------------------

    def keep(self, seqs: list[int]) -> int:
        """The receiver will acknowledge the envelopes ``seqs`` before they are done (it handed them
        over running with their partition, or relieved a channel they held): keep a copy of each
        beyond that ack, to send again should the receiver go before it releases them
        (:meth:`release`). Returns how many were still here to copy (asked again by a later ack, a
        copy is already kept).
        """
        done = self.done_upto
        wanted = {s for s in seqs if s > done and s not in self._asked}
        if not wanted:
            return 0  # (each ack until the release asks again: no scan of the window for those)
        self._asked = {s for s in self._asked if s > done} | wanted  # (acknowledged ones cannot be asked for)
        custody = self.custody
        kept = 0
        for raw in self.window.unacked():
            seq = int.from_bytes(raw[:8], "little")
            if seq in wanted:
                # its callback goes with the copy: the message is done when released (or acked by
                # whoever gets the copy next), not at this ack. Else its producer's own input was
                # acknowledged on the strength of a copy that dies with the producer (saga
                # replicas 70: a Check kept for a relay that died, parked at a meter that died next)
                item = _from_raw(raw, None)
                if item.msg_id not in custody:
                    item.on_done = self.watch.pop(seq, None)
                    custody[item.msg_id] = item
                    self.custody_bytes += len(raw)
                    kept += 1
        while len(custody) > CUSTODY_MAX or self.custody_bytes > self.window.max_bytes:
            self.release([next(iter(custody))])  # (no room for its copy: it counts done, as at an ack)
        return kept

    def kept_not_ran(self) -> dict[int, int]:
        """Partition -> the lowest seq of the copies kept here that the receiver has not said
        ran (:meth:`_ran`) and that are this node's own (not forwards: see :class:`Hold.passed
        <choreo.runtime.holds.Hold.passed>`)."""
        out: dict[int, int] = {}
        for item in self.custody.values():
            if item.home is None and not getattr(item.on_done, "forward", False):
                seq = int.from_bytes(item.raw[:8], "little")  # type: ignore[index]
                if seq < out.get(item.partition, seq + 1):
                    out[item.partition] = seq
        return out

    def _ran(self, seqs: list[int]) -> None:
        """Kept envelopes that ran at the receiver (:data:`~choreo.wire.KEEP_RAN`): should it go
        before it releases them, their copies go to its next life (:attr:`Outgoing.home`)."""
        ran = set(seqs)
        endpoint = self.peer.endpoint
        for item in self.custody.values():
            if item.home is None and int.from_bytes(item.raw[:8], "little") in ran:  # type: ignore[index]
                item.home = endpoint  # (every ack lists them again until the release: marked once)
                ran_there = getattr(item.on_done, "ran_at_target", None)
                if ran_there is not None:  # a forward of ours (Moves): its key's order is kept now
                    ran_there()

    def _drop_released(self, cumulative: int, kept: list[int]) -> None:
        """The copies of seqs up to ``cumulative`` not in ``kept`` (an ack's list) were released.

        The receiver lists a seq in every ACK frame from before the ack that covers it until its
        release (and no ack rides on other frames meanwhile): an ack that covers it unlisted
        comes after the release, whatever order acks arrive in."""
        gone = [msg_id for msg_id, item in self.custody.items()
                if (seq := int.from_bytes(item.raw[:8], "little")) <= cumulative and seq not in kept]  # type: ignore[index]
        if gone:
            self.release(gone)

    def release(self, ids: list[bytes]) -> None:
        """The outputs of these kept messages are acknowledged at the receiver: their copies go."""
        for msg_id in ids:
            item = self.custody.pop(msg_id, None)
            if item is not None:
                self.custody_bytes -= len(item.raw)  # type: ignore[arg-type]
                if msg_id in self.kept_records:  # (a durable node's store holds the copy too)
                    self.journal.released(self, msg_id)  # type: ignore[union-attr]
                if item.on_done is not None:
                    item.on_done()

    # -- the receiver is gone --------------------------------------------------------------------

    def evacuate(self, in_flight: dict[int, Outgoing] | None = None) -> list[Outgoing]:
        """Everything not yet done (in flight, then parked), to send elsewhere; closes the channel.
        ``in_flight`` gets the envelopes that were in flight, by their seq on this channel.

        In-flight envelopes come back encoded (``raw``) with their callbacks, in seq order, after
        the copies the receiver asked us to keep (they are older than anything in flight). Those go
        again whether it died or left: where its partitions' owners have their ids (handed over with
        them) they are dropped as duplicates, and one a leaving receiver had not finished (its drain
        timed out) runs there instead of being lost. A kept copy of one that ran there goes first
        to the receiver's next life at the same endpoint, if it has one (:attr:`Outgoing.home`): a
        node declared dead that rejoins has the ids of what ran in its last life, and runs on what
        waited for its outputs there. (One kept while it waited there goes by its partition, in
        its place among the rest: the next life does not have it.) A copy in flight to such a next
        life keeps that destination: should this node rejoin too before the ack (the heal of a
        long partition, where every node does), the copy goes back there from its new life. Sent
        by partition instead, it ran again at an owner without its id (traced in the two-host heal).
        """
        self.closed = True
        self.window.flush()
        if self.journal is not None:
            self.journal.closed(self)
        out: list[Outgoing] = list(self.custody.values())
        self.custody.clear()
        self.custody_bytes = 0
        for raw in self.window.unacked():
            seq = int.from_bytes(raw[:8], "little")
            item = _from_raw(raw, self.watch.pop(seq, None))
            item.home = self.homes.get(seq)
            out.append(item)
            if in_flight is not None:
                in_flight[seq] = item
        out.extend(self.backlog)
        self.backlog.clear()
        self.watch.clear()
        self.homes.clear()
        self.wake_waiters()
        return out

    @property
    def idle(self) -> bool:
        """Everything sent here is done: acknowledged, and no copy kept for an early ack (a
        receiver acknowledged it before it was done there: :meth:`keep`)."""
        return not self.backlog and self.window.in_flight == 0 and not self.custody


def _from_raw(raw: bytes, on_done: Callback | None) -> Outgoing:
    (env,) = core.parse_envelopes(raw)
    return Outgoing(
        env.kind,
        env.flags,
        env.type.encode(),
        env.key,
        env.partition,
        env.msg_id,
        env.trace_id,
        env.cause_id,
        env.payload,
        on_done,
        raw=raw,
    )


class InChannel:
    """The receiver side from one sender incarnation."""

    def __init__(self, me: int, peer: Peer, window: int, durable: bool = False) -> None:
        self.peer = peer
        self.reorder = core.InboundReorder(window=window)
        self.header = wire.frame(wire.ACK, me, peer.incarnation)
        self.keep_header = wire.frame(wire.ACK, me, peer.incarnation, flags=wire.FLAG_KEEP)
        # seqs of envelopes acknowledged before they are done (handed over running, or relieved):
        # every ACK frame asks the sender to keep a copy of them, until they are done here
        self.keep: list[int] = []
        self.ran: set[int] = set()  # those of them that ran here (or whose id did: see wire.KEEP_RAN)
        self.released = False  # one of them was released since the last ACK frame: one is due
        self.closed = False  # its sender is gone (or we re-incarnated): nobody to ack to
        self.acked_upto = 0  # the cumulative ack last sent
        self.rights: dict[tuple[str, int], str | None] = {}  # with keys: (type, kind) -> None or why refused
        # durable nodes ack only what they committed: the last committed ack (the outbox sends them)
        self.durable = durable
        self.last_ack: bytes = EMPTY_ACK
        self._stuck_at = 0  # the cumulative ack a stall was first seen at, and when (see stalled)
        self._stuck_since = 0.0

    def ack_frame(self) -> bytes:
        if self.durable:
            return self.framed(self.last_ack)
        self.acked_upto = self.reorder.done_upto
        return self.framed(self.reorder.ack_frame())

    def framed(self, ack: bytes) -> bytes:
        """An ACK frame of ``ack``, asking for the copies still kept: every ACK frame lists them
        all, so that its sender drops a copy once an ack covers its seq without listing it (a
        lost RELEASE is made up for by the next ack)."""
        self.released = False
        if self.keep:
            return self.keep_header + wire.keep_prefix(self.keep, self.ran) + ack
        return self.header + ack

    def take_ack(self) -> bytes | None:
        """The ack to send, if one is due (to ride on a frame going to the same peer; never while
        it asks for copies: only an ACK frame carries that request)."""
        if not self.reorder.ack_pending or self.closed or self.durable or self.keep:
            return None
        self.acked_upto, self.released = self.reorder.done_upto, False
        return self.reorder.ack_frame()

    def stalled(self, now: float, after: float) -> bool:
        """Has half this channel's span or more been held ``after`` seconds by envelopes not done?

        An envelope whose handler ran waits for its outputs' acks, which may come a long way
        round (a saga's step back to this node, a standby's ack): should what it waits for travel
        on this very channel's sender's side, behind envelopes that wait for it, nothing moves
        (see :mod:`~choreo.runtime.relief`)."""
        reorder = self.reorder
        if self.closed or reorder.released_upto - reorder.done_upto < reorder.window // 2:
            self._stuck_at = 0
            return False
        if self._stuck_at != reorder.done_upto + 1:
            self._stuck_at, self._stuck_since = reorder.done_upto + 1, now
            return False
        return now - self._stuck_since >= after

    @property
    def unacked_done(self) -> int:
        """Envelopes done since the last ack sent (credit their sender does not have back yet)."""
        return self.reorder.done_upto - self.acked_upto  # type: ignore[no-any-return]

    @property
    def idle(self) -> bool:
        return self.reorder.buffered == 0 and self.reorder.in_progress == 0
