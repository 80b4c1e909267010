"""What a service node keeps per partition, and how it travels: dedup ids, command results, state.

How this works. The dispatcher (:mod:`~choreo.runtime.dispatch`) fills these tables as it runs
handlers: the ids of the messages it handled (``DedupWindow`` per message type), the results of
commands (a duplicate gets the first answer), and the handler state of each key
(:class:`~choreo.runtime.state.StateTables`, written by :meth:`PartitionData.apply` in the step
that sends a handler's outputs). :class:`PartitionData` shares those tables with the dispatcher and
does everything else with them, the jobs of a partition on the move:

* a hand-over or a standby copy reads a partition out (:meth:`~PartitionData.export_partition`,
  as stream pieces, see :mod:`~choreo.runtime.transfer`), and the old owner forgets it
  (:meth:`~PartitionData.forget_partition`);
* the receiver installs it (:meth:`~PartitionData.install`); a standby applies its owner's
  deltas (:meth:`~PartitionData.apply_delta`), which :meth:`~PartitionData.ship_ready` sends in
  the order the handlers ran, once their outputs are acknowledged;
* a restarted durable node reloads them from its store (:meth:`~PartitionData.restore`), and
  every write is logged to its journal first (:meth:`~PartitionData.log_writes`).
"""

from __future__ import annotations

import logging
import struct
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import msgspec

from .. import core
from ..config import NodeConfig
from ..messages import Message, encode, message_options
from ..service import Handler
from ..wire import KIND_CODES, KIND_COMMAND
from .channels import InChannel
from .context import Host, Job
from .deadletters import DeadLetter, DeadLetters
from .journal import ENTRY_SIZE, Journal
from .owed import Owed, nothing
from .ownership import Ownership
from .replicas import Replicas
from .state import StateTables
from .store import Snapshot
from .transfer import Delta, Piece, Staged, encode_transfer

__all__ = ["PartitionData", "DEDUP_PER_PIECE"]

log = logging.getLogger("choreo.dispatch")


class PartitionData:
    """The dispatcher's per-partition tables, exported, installed, restored (see the module docstring)."""

    def __init__(
        self,
        host: Host,
        handlers: dict[str, Handler],
        *,
        config: NodeConfig,
        dedup: dict[str, core.DedupWindow],
        results: OrderedDict[bytes, tuple[float, float, bytes, int]],
        results_max: int,
        in_progress: dict[bytes, Job],
        state: StateTables | None,
        dead_letters: DeadLetters,
        output_done: Callable[[Job], None],
        who: str,
        hand_on: Callable[[Job], None],
        send_mark: Callable[[int, int, bytes], None] | None = None,
        ownership: Ownership | None = None,
        replicas: Replicas | None = None,
        journal: Journal | None = None,
    ) -> None:
        """The tables are the dispatcher's own (shared, not copied); ``output_done(job)`` tells it
        that one of a job's waits is over (here: its state delta reached the standby), ``hand_on(job)``
        that a job went with a hand-over (see :meth:`handed_on`); ``send_mark(to, partition,
        payload)`` tells a partition's new owner that such a job is done (service nodes: moves')."""
        self.host = host
        self.handlers = handlers
        self.config = config
        self.dedup = dedup  # message type -> ids handled (and their partitions)
        self.results = results  # command id -> (time, ttl, reply, partition)
        self.results_max = results_max
        self.in_progress = in_progress  # message id -> the job handling it
        self.state = state  # the state of this node's partitions (a service that declares state types)
        self.dead_letters = dead_letters
        self.output_done = output_done
        self.hand_on = hand_on  # a job went with a hand-over: its input is acknowledged (see handed_on)
        self.who = who  # the service, or "this client" (for what is refused)
        self.ownership = ownership
        self.replicas = replicas  # standby copies of the state (a service with replicas=1)
        self.journal = journal  # durable nodes: what must commit before an ack leaves
        self.unshipped: dict[bytes, deque[Job]] = {}  # key -> jobs whose writes the standby has yet to get
        self.ungated = 0  # writes sent to the standby ahead of their outputs' acks (see ungate)
        self._ungated_by: set[str] = set()  # handlers already logged for it
        # outputs owed for messages handled elsewhere (a standby's ungated deltas, a hand-over's running ones)
        self.owed = Owed(host, handlers, replicas, who)
        # a memory node's: partition -> the jobs that ran and wait for their outputs' acks (see ran)
        self.settling: dict[int, dict[Job, None]] = {}
        self.mark_to: dict[Job, int] = {}  # those that went with a hand-over -> the new owner to tell
        self.send_mark = send_mark

    def window(self, name: str, handler: Handler) -> core.DedupWindow:
        """The dedup window of message type ``name`` (made on first use, sized by its options)."""
        window = self.dedup.get(name)
        if window is None:
            options = message_options(handler.message)
            window = self.dedup[name] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
        return window

    def export_partition(self, p: int, settled: bool = False, to: int | None = None) -> Iterator[Piece]:
        """Everything this node knows of partition ``p``, as stream pieces (read as they go; kept
        here until :meth:`forget_partition`). Times are this node's clock: each chunk says what
        that clock read, and the receiver shifts them onto its own.

        ``settled`` (a standby's copy): only what its deltas will not bring later: no id of a
        message still in progress, and a key's value before the writes its standby has yet to get.
        ``to``: a hand-over's receiver, which hears when its running messages are done (see :meth:`ran`).
        """
        # (taken first: one that finishes while the stream goes has its result in neither part)
        running = [] if settled else self._running(p, to)
        for name, window in list(self.dedup.items()):
            blob = window.export_partition(p)
            if settled and self.in_progress:
                blob = _without(blob, self.in_progress)
            for part in _split_dedup(blob, DEDUP_PER_PIECE):
                yield Piece(dedup=[(name, part)])
        for msg_id, (t, ttl, reply, partition) in list(self.results.items()):
            if partition == p:
                yield Piece(results=[(msg_id, t, ttl, reply)])
        if self.state is not None:
            yield from _bunched(self._state_entries(p, settled))
        if not settled:
            # a keeper draining the copy of a dead owner to the partition's new owner: what that
            # owner's ungated messages still owe goes too
            owed = self.owed.of(p)
            if owed or running:
                yield Piece(owed=owed, running=running)

    def ran(self, job: Job, outputs: list[Message]) -> None:
        """A memory node's ``job`` ran and sent ``outputs``; its input now waits for their acks
        (or its writes' at its standby).

        Its partition may be handed over before they come (:meth:`all_ran`): an output's ack waits
        for the handler it reaches, and a flow that comes back to the partition (a saga's step:
        shop's reserve -> reserve_line -> checked) reaches it at its new owner, which waits for
        the hand-over. The hand-over takes such a message along (:attr:`Piece.running
        <choreo.runtime.transfer.Piece.running>`) as a standby gets an ungated delta: its id, a
        command's result and the outputs. Once the partition checked out there, its input is
        acknowledged (:meth:`handed_on`); once its outputs are acknowledged here, its new owner is
        told (a mark, see :meth:`settled`). Should this node go before that, the new owner sends the
        outputs under their ids (:meth:`source_gone`; dropped where they arrived already). (A
        durable node's outputs count once stored: no such wait.)
        """
        job.outputs = outputs
        jobs = self.settling.get(job.env.partition)
        if jobs is None:
            jobs = self.settling[job.env.partition] = {}
        jobs[job] = None
        for duplicate in job.duplicates:  # (they came while it ran)
            self.keep_ran(duplicate)

    def settled(self, job: Job) -> None:
        """``job`` is done (see :meth:`ran`): if it went with a hand-over, its new owner hears so."""
        env = job.env
        jobs = self.settling.get(env.partition)
        if jobs is None or job not in jobs:
            return
        del jobs[job]
        if not jobs:
            del self.settling[env.partition]
        to = self.mark_to.pop(job, None)
        if to is not None and self.send_mark is not None:
            mark = Delta(env.partition, env.key, [], env.type, env.msg_id, self.host.clock(), trace_id=env.trace_id,
                         handed=True)
            self.send_mark(to, env.partition, encode_transfer(mark))

    def all_ran(self, p: int, lag: int) -> bool:
        """Have the ``lag`` messages of partition ``p`` in progress here all run (some may wait for
        their outputs' acks, see :meth:`ran`; a duplicate waits with its original)? Then ``p`` may be handed over."""
        return not lag or lag == sum(self._ran_and_waiting(p))

    def _ran_and_waiting(self, p: int) -> tuple[int, int, int]:
        """Of partition ``p``'s messages in progress, those that ran and wait for their outputs' (or
        standby's) acks, the duplicates waiting with them, and the duplicates of what it owes (they go with it)."""
        jobs = self.settling.get(p) or ()
        owed = self.owed.waiting_in(p) if self.owed.waiting else 0
        return len(jobs), sum(len(job.duplicates) for job in jobs), owed

    def drain_state(self, p: int, lag: int) -> str:
        """What of partition ``p``'s ``lag`` messages in progress here has yet to finish, in words
        (for the log: a drain that takes long, see ``Moves``)."""
        ran, duplicates, owed = self._ran_and_waiting(p)
        return (f"{lag} messages in progress: {ran} ran and wait for their outputs' or standby's acks "
                f"({duplicates} duplicates with them, {owed} waiting for outputs owed here), "
                f"{lag - ran - duplicates - owed} yet to run or finish")

    def _running(self, p: int, to: int | None) -> list[Delta]:
        """The messages of ``p`` that ran and wait for their outputs' acks (see :meth:`ran`), as
        unmarked deltas (their writes are in the state already); their marks will go ``to``."""
        jobs = self.settling.get(p)
        if not jobs or not self.config.dedup:  # (without ids their senders' resends run again anyway)
            return []
        now = self.host.clock()
        out = []
        for job in jobs:
            env = job.env
            if to is not None:
                self.mark_to[job] = to
            outputs = [(message_options(type(m)).name, encode(m)) for m in job.outputs or ()]
            reply = job.reply if env.kind == KIND_COMMAND else None
            out.append(Delta(p, env.key, [], env.type, env.msg_id, now, reply, False, outputs, env.trace_id))
        return out

    def handed_on(self, p: int) -> None:
        """Partition ``p`` checked out at its new owner, with the messages that went running: that
        owner sends their outputs should this node go first, so their inputs need not wait for them.

        That ack asks their senders to keep a copy beyond it (``FLAG_KEEP``), until the outputs are
        acknowledged here after all (:meth:`settled`): should this node die before, and the new
        owner too, the copy runs again at the partition's next owner instead of being lost."""
        for job in [job for job in self.mark_to if job.env.partition == p]:
            if job.channel is not None:
                kept = job.kept = job.kept or []  # (some may be kept already: see relief.py)
                for j in (job, *job.duplicates):
                    if j.channel is not None and (j.channel, j.env.seq) not in kept:
                        self.host.keep(j.channel, j.env.seq, True)
                        kept.append((j.channel, j.env.seq))
                    if j is not job:
                        j.kept = None  # (released with the job's, not when hand_on finishes it below)
            self.hand_on(job)

    def keep_ran(self, job: Job, original: Job | None = None) -> None:
        """Acknowledge ``job``'s envelope now, its sender keeping a copy until ``job`` is done
        (``FLAG_KEEP``, marked :data:`~choreo.wire.KEEP_RAN`): it ran here (or, a duplicate, its
        ``original`` did: not while that has yet to run) and waits for its outputs' acks. A
        duplicate so acknowledged no longer holds its channel's cumulative ack behind the
        original's outputs, which may wait for a flow that comes back over that channel.
        """
        channel = job.channel
        if channel is None or channel.closed or channel.durable:
            return
        if original is not None and original not in self.settling.get(original.env.partition, ()):
            return
        seq = job.env.seq
        self.host.keep(channel, seq, True)
        if not job.kept or (channel, seq) not in job.kept:
            job.kept = [*(job.kept or ()), (channel, seq)]
        channel.reorder.complete(seq)
        self.host.ack_later(channel)

    def wait_for_owed(self, duplicate: Job, then: Callable[[], None]) -> bool:
        """A duplicate of a message whose outputs are owed here: acknowledged with its copy kept
        (:meth:`keep_ran`), done (``then``) once they are acknowledged (:meth:`Owed.wait`).
        False: nothing is owed for it (or this node is durable: its outputs count once stored)."""
        if self.journal is not None or not self.owed.wait(duplicate.env.msg_id, then):
            return False
        self.keep_ran(duplicate)
        return True

    def knows(self, env: Any, handler: Handler, now: float) -> bool:
        """Does this node have ``env``'s id, running or in its dedup window (where it dedups)?"""
        if not self.config.dedup or handler.kind == "query" or KIND_CODES[handler.kind] != env.kind:
            return False
        window = self.dedup.get(env.type)
        return env.msg_id in self.in_progress or (window is not None and window.contains(env.msg_id, now))

    def keep_all_ran(self, channel: InChannel | None = None) -> None:
        """This memory node was declared dead and rejoins: what ran and waits for its outputs'
        acks is acknowledged on its last life's channels before they close, each sender keeping
        a copy (:meth:`keep_ran`). The outputs go again from the new life, which runs on; the
        release cannot come on a closed channel, so each sender sends its copy to the new life
        at the same endpoint, which has its id and holds it as a duplicate until the message is
        done (``Router.send_again``). Unacknowledged instead, the message went to its
        partition's next owner, without its id, and ran twice (the heal of a long partition).

        ``channel``: only what came on that one, as it closes (its sender is gone: see ``Outbox.close``)."""
        for jobs in list(self.settling.values()):
            for job in list(jobs):
                if channel is None or job.channel is channel:
                    self.keep_ran(job)

    @property
    def owed_sent(self) -> int:
        """Messages whose outputs this node sent for another (a dead owner, a previous one)."""
        return self.owed.sent

    def marked(self, msg_id: bytes) -> bool:
        """A message handed over running is done at its previous owner (see :meth:`Owed.marked`)."""
        return self.owed.marked(msg_id)

    def source_gone(self, incarnation: int) -> int:
        """A previous owner went before it marked what it handed over running (see :meth:`Owed.source_gone`)."""
        return self.owed.source_gone(incarnation)

    def _state_entries(self, p: int, settled: bool) -> Iterator[tuple[str, bytes, bytes]]:
        assert self.state is not None
        names = self.state.types.names
        before: dict[tuple[int, bytes], bytes | None] = {}
        if settled:
            for key, queue in self.unshipped.items():
                if queue and queue[0].env.partition == p and queue[0].before is not None:
                    for t, body in queue[0].before.items():
                        before[(t, key)] = body
        for t, key, body in self.state.entries(p):
            if before:
                if (t, key) in before:
                    old = before.pop((t, key))
                    if old is None:
                        continue
                    body = old
            yield names[t], key, body
        for (t, key), old in before.items():  # a value its pending writes created, or deleted
            if old is not None:
                yield names[t], key, old

    def forget_partition(self, p: int, keep_ids: bool = False) -> None:
        """Partition ``p`` is another instance's: forget its state and what it owes here, and its
        dedup ids and results unless ``keep_ids`` (it was handed over: see ``Moves._verdict_on``)."""
        if not keep_ids:
            for window in self.dedup.values():
                window.drop_partition(p)
            for msg_id in [k for k, v in self.results.items() if v[3] == p]:
                del self.results[msg_id]
        self.owed.forget(p)
        if self.state is not None:
            self.state.drop(p)
            if self.journal is not None:
                self.journal.state_dropped(p)
        if self.ownership is not None:
            self.ownership.set_epoch(p, 0)

    def install(self, staged: Staged, source: int | None = None) -> None:
        """A partition received whole and checked (see :mod:`choreo.runtime.transfer`): its dedup
        ids and results join ours; its state replaces ours, unless this node already runs the
        partition (a race of views), where what it wrote itself since is newer and stays.

        A durable node keeps a standby's copy in memory only: its store holds the partitions it
        owns, which are what it reads back after a restart (:meth:`persist` writes a copy that
        became its own)."""
        p = staged.partition
        for name, blob, shift in staged.dedup:
            handler = self.handlers.get(name)
            if handler is None:
                continue
            window = self.window(name, handler)
            try:
                shifted = _shift_times(blob, shift)
                window.import_entries(shifted, p)
            except (core.MalformedFrame, struct.error) as exc:
                self.host.count_refused("malformed", f"dedup ids of partition {p} in a hand-over: {exc}")
        now = self.host.clock()
        for msg_id, t, ttl, reply in staged.results:
            if now - t < ttl and msg_id not in self.results:
                self.results[msg_id] = (t, ttl, reply, p)
        # owed: sent when the partition is ours (take_over), as a standby's would be; running:
        # sent only if ``source``, the live previous owner, goes before it marks them (source_gone)
        for delta, by in [*((d, None) for d in staged.owed), *((d, source) for d in staged.running)]:
            handler = self.handlers.get(delta.message_type)
            if handler is not None and delta.partition == p and not delta.marked:
                self.owed.add(delta, by, ours=staged.purpose != "copy")
                self._handled_elsewhere(delta, handler)
        if self.state is not None:
            self._install_state(p, staged)
        ownership = self.ownership
        if ownership is not None:  # the copy here is as old as what came (see Ownership's epochs)
            if staged.purpose == "copy":
                ownership.epochs[p] = staged.epoch  # (memory only, as the copy is)
            elif ownership.state[p] == "owned":  # a race of views: what we wrote since is newer
                ownership.set_epoch(p, max(ownership.epochs[p], staged.epoch + 1))
            else:
                ownership.set_epoch(p, staged.epoch)
        if staged.purpose != "copy":  # a durable node keeps what it was handed
            self.persist(p)

    def _install_state(self, p: int, staged: Staged) -> None:
        """The staged state of ``p`` replaces ours (what we wrote ourselves while owning it stays)."""
        assert self.state is not None
        by_name = self.state.types.by_name
        tables: list[dict[bytes, bytes]] = [{} for _ in by_name]
        for name, key, body in staged.state:
            t = by_name.get(name)
            if t is None:
                self.host.count_refused("unknown_type", f"state {name!r} of partition {p} in a hand-over: "
                                                        f"{self.who} declares {', '.join(by_name) or 'none'}")
                continue
            tables[t][key] = body
        if self.ownership is not None and self.ownership.state[p] == "owned":
            clashed: list[bytes] = []
            for t, table in enumerate(tables):
                mine = self.state.tables[t][p]
                clashed += [key for key, body in mine.items() if table.get(key, body) != body]
                table.update(mine)
            if clashed:  # two copies that diverged: said, never settled in silence (seen only after
                # a loss of state the README allows: in memory, several faults at once)
                self.host.count_refused("state_conflict", (
                    f"the hand-over of partition {p} disagrees with what this node has of it already: "
                    f"{len(clashed)} key(s) (e.g. {clashed[0]!r}) keep this node's value, not the one handed "
                    "over; one of the two copies is behind"))
        self.state.install(p, tables)

    def persist(self, p: int) -> None:
        """A durable node: what this node holds of partition ``p`` (its dedup ids, results and
        state) goes to the store, the state replacing the store's whole: a partition handed over
        to it, or a standby's copy (kept in memory until then) that became its own."""
        journal = self.journal
        if journal is None:
            return
        for name, window in self.dedup.items():
            blob = window.export_partition(p)
            journal.imported(name, list(_DEDUP_RECORD.iter_unpack(blob[4:])), p)
        now = self.host.clock()
        for msg_id, (t, ttl, reply, partition) in self.results.items():
            if partition == p and now - t < ttl:
                journal.result(msg_id, ttl - (now - t), reply, p)
        if self.state is not None:
            journal.state_dropped(p)
            names = self.state.types.names
            for t, table in enumerate(self.state.tables):
                for key, body in table[p].items():
                    journal.state(names[t], key, p, body)

    def apply_delta(self, delta: Delta) -> None:
        """One handler's writes on its owner, applied to our standby copy with the message's id
        (and a command's result): the message is a duplicate here from now on. An ungated
        delta's outputs are kept until its mark comes (:meth:`take_over` sends them)."""
        p = delta.partition
        if self.state is not None:
            by_name = self.state.types.by_name
            writes = {by_name[name]: body for name, body in delta.writes if name in by_name}
            if len(writes) < len(delta.writes):
                self.host.count_refused("unknown_type", f"a state delta of partition {p} names a type "
                                                        f"{self.who} does not declare")
            self.state.apply(p, delta.key, writes)  # (a copy: memory only, see install)
        handler = self.handlers.get(delta.message_type)
        if handler is None:
            return
        if delta.marked:
            self.owed.settle(delta.msg_id)
        elif delta.outputs:
            self.owed.add(delta)
        else:
            return  # the writes alone: the message is not done yet
        self._handled_elsewhere(delta, handler)

    def _handled_elsewhere(self, delta: Delta, handler: Handler) -> None:
        """``delta``'s message was handled by the partition's owner: a duplicate here from now on
        (its id), and a command's retry gets the same answer (its result)."""
        now = self.host.clock()
        if self.config.dedup and handler.kind != "query":
            self.window(delta.message_type, handler).insert(delta.msg_id, now, delta.partition)
        if delta.reply is not None and handler.kind == "command":
            self.results[delta.msg_id] = (now, message_options(handler.message).dedup_ttl, delta.reply, delta.partition)

    def restore(self, snapshot: Snapshot, shift: float) -> None:
        """A restarted node: its dedup ids, cached results and dead letters from its store.

        ``shift`` turns the store's wall-clock times into this node's clock.
        """
        now = self.host.clock()
        for _, name, t, expires, entries in snapshot.dedup:
            handler = self.handlers.get(name)
            if handler is None or expires + shift <= now:
                continue
            window = self.window(name, handler)
            n = len(entries) // ENTRY_SIZE
            parts = array("H")
            parts.frombytes(entries[16 * n : ENTRY_SIZE * n])
            if sys.byteorder == "big":  # pragma: no cover
                parts.byteswap()
            by_partition: dict[int, list[bytes]] = {}
            for k, p in enumerate(parts):
                by_partition.setdefault(p, []).append(entries[16 * k : 16 * k + 16])
            at = t + shift
            for p, ids in by_partition.items():
                blob = len(ids).to_bytes(4, "little") + b"".join(_DEDUP_RECORD.pack(i, at) for i in ids)
                window.import_entries(blob, p)
        for msg_id, t, expires, partition, reply in snapshot.results:
            if expires + shift > now:
                self.results[msg_id] = (t + shift, expires - t, reply, partition)
        if self.state is not None:
            by_name = self.state.types.by_name
            for type_name, key, partition, body in snapshot.state:
                t = by_name.get(type_name)
                if t is None or partition >= self.state.partitions:
                    log.warning("state %s of key %r in the store is not this service's any more: left there",
                                type_name, key[:64])
                    continue
                self.state.tables[t][partition][key] = body
                if self.ownership is not None:
                    self.ownership.restored.add(partition)
        if self.ownership is not None:
            epochs = self.ownership.epochs
            for partition, epoch in snapshot.epochs:
                if 0 <= partition < len(epochs):
                    epochs[partition] = epoch
        for letter_id, encoded in snapshot.letters:
            try:
                self.dead_letters.restore(DeadLetter.decode(encoded))
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
                log.warning("dead letter #%d in the store cannot be read (%s): skipped", letter_id, exc)


    def apply(
        self, env: Any, writes: dict[int, bytes | None], job: Job | None = None, reply: bytes | None = None
    ) -> None:
        """A handler's state writes, for the key of ``env``: applied, logged, and (with a standby)
        held on ``job`` until its outputs are acknowledged (then :meth:`ship_ready`).

        On a durable node the message's id (and a command's ``reply``) commits with its writes:
        its completion may wait for its outputs' or its standby's acks, and a crash in between
        must find the message done, not run it again on the state it already changed."""
        state = self.state
        assert state is not None
        p, key = env.partition, env.key
        if job is not None and self.replicas is not None and self.replicas.copies(p):
            job.before = {t: state.get(t, p, key) for t in writes}
            job.writes = writes
            job.pending += 1  # its delta: shipped once its outputs are acknowledged (ship_ready)
            queue = self.unshipped.get(key)
            if queue and queue[0].pending > 1:  # behind writes that wait for their outputs' acks
                trace = env.trace_id  # (every output carries its input's trace: a flow is one trace)
                if any(j.env.trace_id == trace for j in queue):
                    self.ungate(key)  # ... which wait for this very flow: it came back to their key
                else:  # ... for another flow (two flows may still wait for each other: a bound)
                    self.host.call_later(self.config.standby_gate_timeout, partial(self._gate_expired, key))
            self.unshipped.setdefault(key, deque()).append(job)
        state.apply(p, key, writes)
        journal = self.journal
        if journal is not None:
            self.log_writes(p, key, writes)
            if job is not None and self.in_progress.get(env.msg_id) is job:  # (its id is remembered)
                journal.handled(env)  # in this commit, not at its completion (Dispatcher._complete)
                if reply is not None:
                    self.remember(job, reply)
                job.logged = True

    def log_writes(self, p: int, key: bytes, writes: dict[int, bytes | None]) -> None:
        """A durable node: state writes commit with the message that made them."""
        assert self.journal is not None and self.state is not None
        names = self.state.types.names
        for t, body in writes.items():
            self.journal.state(names[t], key, p, body)

    def _ship(self, job: Job, *, marked: bool = True) -> None:
        """Send the standby ``job``'s held writes (none left: its id alone), with its id unless
        ``marked`` is False; a marked delta counts as one of the job's waits until acknowledged."""
        assert self.state is not None and self.replicas is not None
        env = job.env
        names = self.state.types.names
        writes = [(names[t], body) for t, body in job.writes.items()] if job.writes is not None else []
        outputs = [(message_options(type(m)).name, encode(m)) for m in job.outputs or ()] if not marked else []
        job.writes = job.before = None
        if marked:
            job.outputs = None  # (an ungated job keeps them until its mark: a new standby gets them too)
        reply = job.reply if env.kind == KIND_COMMAND else None
        delta = Delta(env.partition, env.key, writes, env.type, env.msg_id, self.host.clock(), reply, marked, outputs,
                      env.trace_id)
        self.replicas.ship(env.partition, delta, partial(self.output_done, job) if marked else nothing)

    def ship_ready(self, key: bytes) -> None:
        """Send the standby the writes of this key's jobs whose outputs are all acknowledged, in
        the order their handlers ran (a later write never overtakes an earlier one)."""
        queue = self.unshipped.get(key)
        while queue and queue[0].pending == 1:
            self._ship(queue.popleft())
        if not queue:
            self.unshipped.pop(key, None)

    def ungate(self, key: bytes) -> None:
        """Ship every write of ``key`` still held, in order, without waiting for outputs.

        A write waits for its handler's outputs to be acknowledged so that its standby never
        counts a message done whose outputs a crash could lose. But an output's ack waits for
        the handler it reaches, and when that handler writes the same key (a flow that came back
        to a key it wrote), its write waits behind the first: neither would ever leave. Here the
        writes of a job still waiting go alone (``marked=False``); its id follows once its
        outputs are acknowledged (:meth:`ship_mark`). The delta carries the job's outputs, so a
        standby that takes the partition over in between sends them (the same ids: whoever got
        them already drops them) instead of running the message again (:meth:`take_over`).
        """
        queue = self.unshipped.pop(key, None)
        for job in queue or ():
            if job.pending == 1:  # ready anyway: writes and id together, as usual
                self._ship(job)
                continue
            self.ungated += 1
            job.mark_owed = True
            handler = job.handler.name if job.handler is not None else job.env.type
            if handler not in self._ungated_by:
                self._ungated_by.add(handler)
                log.info("%s: %s's state writes went to the standby with its outputs, before they were "
                         "acknowledged (a flow came back to a key it wrote)", self.who, handler)
            self._ship(job, marked=False)

    def _gate_expired(self, key: bytes) -> None:
        queue = self.unshipped.get(key)
        if queue and len(queue) > 1 and queue[0].pending > 1:
            self.ungate(key)

    def reship_owed(self, p: int) -> None:
        """Partition ``p`` has a new standby: the ungated jobs that still owe their mark send it
        their outputs again (their writes are in the copy; their ids are not, yet)."""
        assert self.replicas is not None
        for job in [j for j in self.in_progress.values() if j.mark_owed and j.env.partition == p]:
            self._ship(job, marked=False)
        self.owed.restandby(p)

    def take_over(self, p: int) -> int:
        """Partition ``p`` is ours now: send the outputs of the ungated messages its last owner
        had not marked done (it may have died before they all arrived). Each goes under the id
        it had, so a destination that has it already drops it; the message itself is a duplicate
        here (its id came with its writes). Returns how many messages' outputs went.

        A standby's copy of ``p`` is no copy any more: a durable node stores it now."""
        if self.replicas is not None and p in self.replicas.held:
            self.replicas.forgotten(p)
            self.persist(p)
        return self.owed.take_over(p)

    def ship_mark(self, job: Job) -> None:
        """An ungated job's outputs are acknowledged: its id (and a command's result) to the standby."""
        job.mark_owed = False
        self._ship(job)


    def remember(self, job: Job, reply: bytes) -> None:
        """A command's result, for its duplicates (kept for its type's dedup window, at most ``results_max``)."""
        if job.env.kind != KIND_COMMAND or job.handler is None:
            return
        if job.logged and job.env.msg_id in self.results:
            return  # remembered (and logged) with its writes already
        self.keep_result(job.env, job.handler, reply)

    def keep_result(self, env: Any, handler: Handler, reply: bytes) -> None:
        """The result of command ``env``, handled by ``handler`` (see :meth:`remember`)."""
        ttl = handler.message.__choreo_options__.dedup_ttl  # (message_options: a registered type)
        now = self.host.clock()
        results = self.results
        results[env.msg_id] = (now, ttl, reply, env.partition)
        if self.journal is not None:
            self.journal.result(env.msg_id, ttl, reply, env.partition)
        while len(results) > self.results_max:
            results.popitem(last=False)
        # forget results older than their dedup window, oldest first
        while results:
            t, kept_for, _, _ = next(iter(results.values()))
            if now - t < kept_for:
                break
            results.popitem(last=False)



_DEDUP_RECORD = struct.Struct("<16sd")
DEDUP_PER_PIECE = 4096  # dedup ids per stream piece (about 100 KB)


def _bunched(entries: Iterator[tuple[str, bytes, bytes]], limit: int = 32 << 10) -> Iterator[Piece]:
    """State entries as pieces of about ``limit`` bytes (a stream cuts its chunks from pieces)."""
    bunch: list[tuple[str, bytes, bytes]] = []
    size = 0
    for entry in entries:
        bunch.append(entry)
        size += len(entry[1]) + len(entry[2])
        if size >= limit:
            yield Piece(state=bunch)
            bunch, size = [], 0
    if bunch:
        yield Piece(state=bunch)


def _without(blob: bytes, ids: dict[bytes, Any]) -> bytes:
    """A DedupWindow export without the entries whose id is in ``ids``."""
    n = int.from_bytes(blob[:4], "little")
    size = _DEDUP_RECORD.size
    kept = [blob[4 + i * size : 4 + (i + 1) * size] for i in range(n) if blob[4 + i * size : 20 + i * size] not in ids]
    return len(kept).to_bytes(4, "little") + b"".join(kept)


def _split_dedup(blob: bytes, per: int) -> Iterator[bytes]:
    """A DedupWindow export (``u32 n | n x (16s id, f64 time)``) as exports of at most ``per`` ids."""
    n = int.from_bytes(blob[:4], "little")
    size = _DEDUP_RECORD.size
    for lo in range(0, n, per):
        hi = min(n, lo + per)
        yield (hi - lo).to_bytes(4, "little") + blob[4 + lo * size : 4 + hi * size]


def _shift_times(blob: bytes, shift: float) -> bytes:
    """Move the times of a dedup export (``u32 n | n x (16s id, f64 time)``) by ``shift`` seconds."""
    if len(blob) < 4:
        raise struct.error("dedup export shorter than its count")
    n = int.from_bytes(blob[:4], "little")
    out = bytearray(blob)
    for i in range(n):
        offset = 4 + i * _DEDUP_RECORD.size
        key, t = _DEDUP_RECORD.unpack_from(blob, offset)
        _DEDUP_RECORD.pack_into(out, offset, key, t + shift)
    return bytes(out)
