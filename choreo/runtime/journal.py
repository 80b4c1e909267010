"""What a durable node must put in its store before it acknowledges anything: the journal.

How this works. The node's parts tell the journal what changed, as it happens, and cheaply
(per batch where they can); nothing is written then:

* the outbox's channels hand it every batch body they send (:meth:`Journal.body`): a
  :class:`Record`, kept until the receiver has acknowledged every envelope in it
  (:meth:`Journal.acked`), or until the receiver is gone and its envelopes are resent elsewhere
  (:meth:`Journal.closed`). Envelopes acknowledged with a copy kept (``FLAG_KEEP``: the receiver
  acknowledged them before they were done, see :meth:`OutChannel.keep
  <choreo.runtime.channels.OutChannel.keep>`) stay in their body's row, which loses the rest, until
  released (:meth:`Journal.released`): a copy is no safer than the node that holds it, and a
  durable one keeps it across a restart, in its place in the order things were sent. And every
  envelope that waits outside a window, for credit, for a partition's old owner or for an
  instance (:meth:`Journal.limbo`, :meth:`Journal.unlimbo`);
* the dispatcher hands it the ids of the messages it finished (a slice of a batch the compiled
  lane handled, :meth:`Journal.handled_slice`, or one message), cached command results,
  partitions handed over to it, and dead letters.

:meth:`Journal.commit` writes everything since the last commit as one transaction (a
:class:`~choreo.runtime.store.Batch`): it reaches the OS (a crash of the process loses none of
it), not yet the disk. Commits are numbered (*generations*); :meth:`Journal.settle` makes them
safe by the fsync policy: under ``"batch"`` a sync of the store, then ``on_durable`` releases
what waited for them. The outbox commits in its flush, after taking the batch bodies and the
acknowledgements due, and sends answers and acknowledgements once their generation is safe: an
ack never leaves before the dedup id of what it acknowledges, the handler's result and what the
handler emitted are on disk. One commit and one sync per flush, shared by everything since the
last one (group commit: the busier the node, the more each one carries). The sync runs in the
event loop: measured, a sync thread did worse (its completion waits up to the interpreter's
5 ms switch interval for the lock of a busy loop, and acknowledgements with it). Data may leave
before its commit: a receiver that handles it while this node dies unacknowledged sees the same
ids again when the handler runs again. A flush commits when something waits on it
(acknowledgements, answers, ``await emit``); otherwise within ``max_delay``, so that a batch
its receiver acknowledges before then is never written at all.

A commit that fails (a full disk, an I/O error) changes nothing: what it held stays pending,
acknowledgements and answers stay held, emits wait, and the commit is retried every
``RETRY_EVERY`` seconds; :attr:`Journal.failing` says why, once in the log.

Compaction: acknowledged batches are deleted as their acks arrive; dedup rows and cached
results when they expire (or exceed the type's ``dedup_max``); rows of envelopes that left the
node some other way (a retired service's) by a periodic sweep. :meth:`Journal.restore` loads a
restarted node: the declared system, its unacknowledged outbox (waiting for instances, in the
order it was sent), its dedup ids, cached results, dead letters and handler state (``ctx.state``:
each write commits with the id of the message that made it).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Protocol

import msgspec

from .. import core
from ..errors import DeliveryTimeout, StoreError
from ..spec import ServiceSpec
from ..wire import KIND_HANDOVER, KIND_QUERY
from .channels import OutChannel, Outgoing
from .store import Batch, DedupRow, ResultRow, Snapshot, Store

__all__ = ["Journal", "Record", "ENTRY_SIZE"]

log = logging.getLogger("choreo.store")
ENTRY_SIZE = 18  # a dedup entry in the store: a 16-byte id and its u16 partition (the time is the row's)
RETRY_EVERY = 0.25  # seconds between attempts while the store refuses commits
COMPACT_EVERY = 1.0  # seconds between looks for expired dedup ids and results
SWEEP_EVERY = 30.0  # seconds between sweeps for outbox rows nothing refers to any more
MAX_PENDING_BYTES = 8 << 20  # commit at once when this much batch body waits for a commit


class Record:
    """One batch body sent to one receiver: a row of the outbox until every envelope in it is acked."""

    __slots__ = ("row", "service", "body", "hi", "acked", "written", "dead", "kept")

    def __init__(self, row: int, service: str, body: bytes, hi: int) -> None:
        self.row = row
        self.service = service
        self.body = body
        self.hi = hi  # the last sequence number in the body
        self.acked = 0  # every sequence number up to here was acknowledged
        self.written = False
        self.dead = False  # acknowledged (or resent elsewhere) before it was written: never written
        # acknowledged with a copy kept: msg id -> envelope, the whole body now (see Journal.released)
        self.kept: dict[bytes, bytes] | None = None


class Restorable(Protocol):
    """What :meth:`Journal.restore` needs of the partitions' data (:class:`~choreo.runtime.partdata.PartitionData`)."""

    def restore(self, snapshot: Snapshot, shift: float) -> None: ...


class _System(msgspec.Struct):
    services: list[ServiceSpec]
    retired: list[str]


_system_encoder = msgspec.msgpack.Encoder()
_system_decoder = msgspec.msgpack.Decoder(_System)


class Journal:
    """What one durable node has not committed yet, and its commits (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        call_later: Callable[[float, Callable[[], None]], None],
        max_delay: float = 0.01,
    ) -> None:
        """``call_later(delay, fn)`` runs ``fn`` after ``delay`` seconds of ``clock`` (the engine's timers)."""
        self.store = store
        self.clock = clock
        self.wall = wall
        self.call_later = call_later
        self.max_delay = max_delay
        self.on_durable: Callable[[int], None] = lambda generation: None  # the outbox releases what waited
        self.written = 0  # commits written (generations)
        self.safe = 0  # of those, the ones the fsync policy counts as safe (on disk under "batch")
        self._write_ok = True  # the last commit attempt succeeded (a failing sync is retried alone)
        self._by_generation: deque[tuple[int, list[asyncio.Future[None]]]] = deque()  # waiters of a commit
        self.windows: Callable[[str], Any] = lambda name: None  # the dispatcher's dedup windows by type
        self.results_max = 100_000
        self.wake: Callable[[], None] = lambda: None  # asks the outbox to flush (and so to commit)
        self.failing: StoreError | None = None
        self._retry_at = 0.0
        self._logged_at = -1e9
        self._next_row = 0
        self._next_dedup = 0
        self._records: list[Record] = []
        self._pending_bytes = 0
        self._limbo: dict[int, tuple[Outgoing, str]] = {}  # row -> (envelope, service), not written yet
        self._outbox_del: list[int] = []
        self._acked: dict[Record, None] = {}
        self._rewrite: dict[Record, None] = {}  # written rows whose body is now only the copies kept
        self._slices: list[tuple[list[Any], int, int]] = []
        self._envs: list[Any] = []
        self._dedup_put: list[DedupRow] = []  # partitions handed over to us
        self._dedup_del: list[int] = []
        self._dedup_rows: dict[str, deque[tuple[int, int, float]]] = {}  # type -> (row, ids, expires), oldest first
        self._dedup_ids: dict[str, int] = {}
        self._results_put: list[ResultRow] = []
        self._results_del: list[bytes] = []
        self._results: OrderedDict[bytes, float] = OrderedDict()  # stored results -> expires
        self._letters_put: dict[int, bytes] = {}
        self._letters_del: set[int] = set()
        self._state: dict[tuple[str, bytes], tuple[int, bytes | None]] = {}  # (type, key) -> (partition, body)
        self._state_drop: list[int] = []
        self._epochs: dict[int, int] = {}  # partition -> epoch of its copy here (0: it left)
        self._system: bytes | None = None
        self._system_written: bytes | None = None
        self._system_version = -1
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty_since: float | None = None
        self._compacted = self._swept = self._synced = 0.0
        self._unsynced = False
        self._outbox: Any = None
        self._membership: Any = None
        self.is_closed = False
        self.commits = 0
        self.commit_seconds = 0.0
        self.syncs = 0
        self.sync_seconds = 0.0
        self.rows_written = 0
        self.failures = 0

    # -- the outbox ------------------------------------------------------------------------------

    def body(self, ch: OutChannel, body: bytes) -> None:
        """A batch body left ``ch``'s window: it is kept until its receiver acknowledges all of it."""
        self._next_row += 1
        rec = Record(self._next_row, ch.peer.service_name or "", body, ch.window.next_seq - 1)
        assert ch.records is not None
        ch.records.append(rec)
        self._records.append(rec)
        self._pending_bytes += len(body)

    def acked(self, ch: OutChannel) -> None:
        """``ch``'s receiver acknowledged everything up to ``ch.done_upto``; the copies it asked
        to keep (``ch.custody``, taken before this is called) stay."""
        done = ch.done_upto
        records = ch.records
        assert records is not None
        # (seq, msg id, envelope) of the copies kept whose row is still the body they left in, by seq
        kept = _unfiled(ch) if ch.custody else None
        while records and records[0].hi <= done:
            rec = records.popleft()
            if kept and kept[0][0] <= rec.hi:
                self._file_kept(ch, rec, kept)
            elif rec.written:
                self._outbox_del.append(rec.row)
            else:
                rec.dead = True
        if records:
            head = records[0]
            if kept and kept[0][0] <= head.hi:
                done = min(done, kept[0][0] - 1)  # (restored, the envelopes after it go again too)
            if done > head.acked:
                head.acked = done
                if head.written:
                    self._acked[head] = None

    def _file_kept(self, ch: OutChannel, rec: Record, kept: deque[tuple[int, bytes, bytes]]) -> None:
        """``rec`` is acknowledged but for copies kept (the head of ``kept``, in seq order): its row
        keeps only those, from now on all due (they go by partition if restored)."""
        rec.kept = {}
        while kept and kept[0][0] <= rec.hi:
            _, msg_id, raw = kept.popleft()
            rec.kept[msg_id] = raw
            ch.kept_records[msg_id] = rec
        self._trim(rec)
        self._acked.pop(rec, None)  # (its row is written again whole: a stale "acked" would skip them)

    def released(self, ch: OutChannel, msg_id: bytes) -> None:
        """The copy ``msg_id`` kept on ``ch`` was released (or is resent elsewhere): its row goes
        once it keeps no other."""
        rec = ch.kept_records.pop(msg_id, None)
        if rec is not None and rec.kept is not None:
            del rec.kept[msg_id]
            if rec.kept:
                self._trim(rec)
            elif rec.written:
                self._rewrite.pop(rec, None)
                self._outbox_del.append(rec.row)
            else:
                rec.dead = True

    def _trim(self, rec: Record) -> None:
        assert rec.kept is not None
        rec.body = b"".join(rec.kept.values())
        rec.acked = 0
        if rec.written:
            self._rewrite[rec] = None  # (else the pending write takes the new body)

    def closed(self, ch: OutChannel) -> None:
        """``ch``'s receiver is gone: what it had not acknowledged, and the copies kept, are resent
        (and kept) elsewhere."""
        assert ch.records is not None
        for rec in [*ch.records, *dict.fromkeys(ch.kept_records.values())]:
            if rec.written:
                self._rewrite.pop(rec, None)
                self._outbox_del.append(rec.row)
            else:
                rec.dead = True
        ch.records.clear()
        ch.kept_records.clear()

    def limbo(self, item: Outgoing, service: str | None) -> None:
        """``item`` waits outside any window (for credit, a partition's old owner, an instance).

        It gets a new row each time it starts waiting somewhere, so that the rows' order is the
        order in which a restarted node must send them again.
        """
        row = item.row
        if row and self._limbo.pop(row, None) is None:
            self._outbox_del.append(row)
        self._next_row += 1
        item.row = self._next_row
        self._limbo[item.row] = (item, service or "")

    def unlimbo(self, item: Outgoing) -> None:
        """``item`` went into a window (its batch body keeps it from now on)."""
        row = item.row
        item.row = 0
        if self._limbo.pop(row, None) is None:
            self._outbox_del.append(row)

    # -- the dispatcher --------------------------------------------------------------------------

    def handled_slice(self, envs: list[Any], lo: int, hi: int) -> None:
        """``envs[lo:hi]`` were handled (by the compiled lane): their ids commit with their ack."""
        self._slices.append((envs, lo, hi))

    def handled(self, env: Any) -> None:
        """One message was handled (or dead-lettered): its id commits with its ack."""
        self._envs.append(env)

    def imported(self, type_name: str, entries: list[tuple[bytes, float]], partition: int) -> None:
        """Dedup ids of a partition handed over to this node, with their times (this node's clock)."""
        if not entries:
            return
        window = self.windows(type_name)
        ttl = window.ttl if window is not None else 300.0
        t = max(t for _, t in entries) + (self.wall() - self.clock())
        ids = b"".join(i for i, _ in entries)
        parts = array("H", [partition]) * len(entries)
        self._next_dedup += 1
        self._dedup_put.append((self._next_dedup, type_name, t, t + ttl, ids + _le(parts)))

    def result(self, msg_id: bytes, ttl: float, reply: bytes, partition: int) -> None:
        """A command's result: a duplicate of it, after a restart too, gets the same answer."""
        t = self.wall()
        self._results_put.append((msg_id, t, t + ttl, partition, reply))

    def state(self, type_name: str, key: bytes, partition: int, body: bytes | None) -> None:
        """A key's value of one state type changed (None: deleted): it commits with the id of the
        message that changed it, before that message's ack leaves."""
        self._state[(type_name, key)] = (partition, body)

    def state_dropped(self, partition: int) -> None:
        """A partition's state left this node, or is replaced whole (what follows is its new state)."""
        self._state = {k: v for k, v in self._state.items() if v[0] != partition}
        self._state_drop.append(partition)

    def epoch(self, partition: int, epoch: int) -> None:
        """The epoch of this node's copy of a partition (0: the copy left; see Ownership)."""
        self._epochs[partition] = epoch

    def letter(self, letter_id: int, encoded: bytes) -> None:
        """A dead letter was stored (or stored again after a failed replay)."""
        self._letters_del.discard(letter_id)
        self._letters_put[letter_id] = encoded

    def letter_gone(self, letter_id: int) -> None:
        """A dead letter left the store (evicted, or replayed successfully)."""
        self._letters_put.pop(letter_id, None)
        self._letters_del.add(letter_id)

    # -- committing ------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Something waits to be written."""
        return bool(
            self._records or self._rewrite or self._limbo or self._slices or self._envs or self._dedup_put
            or self._results_put or self._letters_put or self._letters_del or self._system is not None or self._outbox_del
            or self._acked or self._dedup_del or self._results_del or self._state or self._state_drop
            or self._epochs
        )

    def should_commit(self, waiting: bool) -> bool:
        """Whether the flush commits now: something waits on it (``waiting``: acknowledgements or
        answers held for it), the pending bodies are large, or they waited ``max_delay``."""
        now = self.clock()
        if self.failing is not None:
            return now >= self._retry_at
        if waiting or self._waiters or self._pending_bytes >= MAX_PENDING_BYTES:
            return True
        if not self.dirty:
            return False
        if self._dirty_since is None:
            self._dirty_since = now
            return False
        return now - self._dirty_since >= self.max_delay

    def commit(self) -> bool:
        """Write everything since the last commit as one transaction; False if the store refused
        (everything stays pending, and :attr:`failing` says why)."""
        if self.is_closed:
            return False  # a crashed node's last callbacks: nothing more reaches its store
        wall = self.wall()
        records = list(dict.fromkeys([*(r for r in self._records if not r.dead), *self._rewrite]))
        limbo = list(self._limbo.items())
        batch = Batch(
            outbox_put=[(r.row, r.service, r.body, r.acked) for r in records]
            + [(row, service, _raw(item), 0) for row, (item, service) in limbo],
            outbox_acked=[(r.acked, r.row) for r in self._acked],
            outbox_del=self._outbox_del,
            dedup_put=self._dedup_put + self._handled_rows(wall),
            dedup_del=self._dedup_del,
            results_put=self._results_put,
            results_del=self._results_del,
            letters_put=list(self._letters_put.items()),
            letters_del=list(self._letters_del),
            state_drop=self._state_drop,
            state_del=[k for k, (_, body) in self._state.items() if body is None],
            state_put=[(t, k, p, body) for (t, k), (p, body) in self._state.items() if body is not None],
            epochs_del=[p for p, epoch in self._epochs.items() if not epoch],
            epochs_put=[(p, epoch) for p, epoch in self._epochs.items() if epoch],
            system=self._system,
        )
        if batch.rows():
            started = time.perf_counter()  # (a measurement of the disk: real time, under the fake link too)
            try:
                self.store.write(batch)
            except StoreError as exc:
                self._write_ok = False
                self._failed(exc)
                return False
            self.commit_seconds += time.perf_counter() - started
            self.commits += 1
            self.written += 1
            self.rows_written += batch.rows()
            self._unsynced = True
        self._write_ok = True
        if self.failing is not None and (self.store.fsync != "batch" or self.written <= self.safe):
            log.warning("%s: commits succeed again", self.store.path)
            self.failing = None
        for r in records:
            r.written = True
        self._track_dedup(batch.dedup_put)
        for msg_id, _, expires, _, _ in self._results_put:
            self._results[msg_id] = expires
            self._results.move_to_end(msg_id)
        if self._system is not None:
            self._system_written, self._system = self._system, None
        self._records = []
        self._pending_bytes = 0
        self._limbo = {}
        self._outbox_del = []
        self._acked = {}
        self._rewrite = {}
        self._slices = []
        self._envs = []
        self._dedup_put = []
        self._dedup_del = []
        self._results_put = []
        self._results_del = []
        self._letters_put = {}
        self._letters_del = set()
        self._state = {}
        self._state_drop = []
        self._epochs = {}
        self._dirty_since = None
        if self._waiters:
            self._by_generation.append((self.written, self._waiters))
            self._waiters = []
        return True

    def settle(self) -> None:
        """After a commit: make what is written safe by the fsync policy, then release it
        (``on_durable``). Under ``"batch"``: a sync, unless one runs (the next one covers it)."""
        if self.store.fsync != "batch":
            self._durable_upto(self.written)  # in the OS: a crash of the process loses none of it
        elif self.safe >= self.written:
            self._durable_upto(self.written)  # nothing new written: what waited is on disk already
        else:
            self._sync()

    def _sync(self) -> None:
        if self.is_closed:
            return
        target = self.written
        started = time.perf_counter()
        try:
            self.store.sync()
        except StoreError as exc:
            self._failed(exc)
            return
        self.sync_seconds += time.perf_counter() - started
        self.syncs += 1
        self._synced = self.clock()
        self._unsynced = False
        self._durable_upto(target)

    def _durable_upto(self, generation: int) -> None:
        if generation > self.safe:
            self.safe = generation
        if self.failing is not None and self._write_ok:
            log.warning("%s: commits succeed again", self.store.path)
            self.failing = None
        queue = self._by_generation
        while queue and queue[0][0] <= self.safe:
            for fut in queue.popleft()[1]:
                if not fut.done():
                    fut.set_result(None)
        self.on_durable(self.safe)

    def _handled_rows(self, wall: float) -> list[DedupRow]:
        """The ids handled since the last commit, one row per message type."""
        if not self._slices and not self._envs:
            return []
        by_type: dict[str, tuple[list[bytes], array[int]]] = {}
        for envs, lo, hi in [*self._slices, (self._envs, 0, len(self._envs))]:
            for env in islice(envs, lo, hi):
                name = env.type
                entry = by_type.get(name)
                if entry is None:
                    entry = by_type[name] = ([], array("H"))
                entry[0].append(env.msg_id)
                entry[1].append(env.partition)
        rows = []
        for name, (ids, parts) in by_type.items():
            window = self.windows(name)
            ttl = window.ttl if window is not None else 300.0
            self._next_dedup += 1
            rows.append((self._next_dedup, name, wall, wall + ttl, b"".join(ids) + _le(parts)))
        return rows

    def _track_dedup(self, rows: list[DedupRow]) -> None:
        for row, name, _, expires, entries in rows:
            tracked = self._dedup_rows.get(name)
            if tracked is None:
                tracked = self._dedup_rows[name] = deque()
            n = len(entries) // ENTRY_SIZE
            tracked.append((row, n, expires))
            self._dedup_ids[name] = self._dedup_ids.get(name, 0) + n

    def _failed(self, exc: StoreError) -> None:
        now = self.clock()
        self.failures += 1
        self.failing = exc
        self._retry_at = now + RETRY_EVERY
        if now - self._logged_at >= 10.0:
            self._logged_at = now
            log.error("%s", exc)

    # -- waiting for a commit --------------------------------------------------------------------

    async def durable(self, timeout: float) -> None:
        """Return once everything handed to the node so far is committed (DeliveryTimeout, or the
        store's error while it refuses commits, after ``timeout`` seconds)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        expired: list[bool] = []

        def expire() -> None:
            if not fut.done():
                expired.append(True)
                fut.set_result(None)

        self._waiters.append(fut)
        self.call_later(timeout, expire)
        self.wake()
        await fut
        if expired:
            if self.failing is not None:
                raise self.failing
            raise DeliveryTimeout(f"not committed to data dir {self.store.path} within {timeout:.1f} s")

    def uncommitted(self) -> set[bytes]:
        """Ids of the messages handled since the last commit: what a crash now would make run again."""
        ids = {env.msg_id for envs, lo, hi in self._slices for env in islice(envs, lo, hi)}
        ids.update(env.msg_id for env in self._envs)
        return ids

    def check(self) -> None:
        """Raise the store's error while it refuses commits (``try_emit`` refuses at once then)."""
        if self.failing is not None:
            raise self.failing

    # -- timers ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Compaction, the declared system, syncs (``"interval"``), the WAL's upkeep, the sweep;
        and a retry while the store refuses commits or syncs."""
        if self.is_closed:
            return
        if self.failing is not None and now >= self._retry_at:
            if self.written > self.safe:
                self._sync()  # what is written waits for a sync (a failure sets the next retry)
            if self.failing is not None:
                self.wake()  # what is not, for a commit: the flush retries it
        if now - self._compacted >= COMPACT_EVERY:
            self._compacted = now
            self._compact(self.wall())
            self._note_system()
        if self.store.fsync == "interval" and self._unsynced and now - self._synced >= self.store.interval:
            self._sync()  # nothing waits on it: what it covers was released at its commit
        if now - self._swept >= SWEEP_EVERY and self._outbox is not None and self.failing is None:
            self._swept = now
            self._sweep()



    def _compact(self, wall: float) -> None:
        for name, rows in self._dedup_rows.items():
            window = self.windows(name)
            limit = window.max_entries if window is not None else 1 << 62
            count = self._dedup_ids.get(name, 0)
            while rows and (rows[0][2] <= wall or count - rows[0][1] >= limit):
                row, n, _ = rows.popleft()
                count -= n
                self._dedup_del.append(row)
            self._dedup_ids[name] = count
        results = self._results
        while results and (next(iter(results.values())) <= wall or len(results) > self.results_max):
            msg_id, _ = results.popitem(last=False)
            self._results_del.append(msg_id)

    def _note_system(self) -> None:
        m = self._membership
        if m is None or m.version == self._system_version:
            return
        self._system_version = m.version
        encoded = _system_encoder.encode(_System(sorted(m.declared.values(), key=lambda s: s.name), sorted(m.retired)))
        if encoded != self._system_written:
            self._system = encoded

    def _sweep(self) -> None:
        """Delete the outbox rows nothing refers to any more (envelopes that left some other way)."""
        live = self._outbox.live_rows()
        pending = set(self._outbox_del)
        orphans = [row for row in self.store.outbox_rows() if row not in live and row not in pending]
        if orphans:
            log.info("%s: %d outbox rows no envelope refers to: deleted", self.store.path, len(orphans))
            self._outbox_del.extend(orphans)

    # -- a restarted node ------------------------------------------------------------------------

    def restore(self, outbox: Any, data: Restorable | None, membership: Any) -> int:
        """Load what the store holds into a node that starts: returns how many envelopes wait to be
        sent again (for instances, in the order they were first sent)."""
        snap = self.store.load()
        self._outbox = outbox
        self._membership = membership
        if snap.system is not None:
            system = _system_decoder.decode(snap.system)
            membership.retired.update(system.retired)
            for spec in system.services:
                membership.declare(spec)
            self._system_written = snap.system
        self._next_row = max((row for row, *_ in snap.outbox), default=0)
        self._next_dedup = max((row for row, *_ in snap.dedup), default=0)
        resent = 0
        for row, service, body, acked in snap.outbox:
            self._outbox_del.append(row)  # each envelope still due gets a row of its own below, in order
            if not service or service in membership.retired:
                continue
            for env in core.parse_envelopes(body):
                if (acked and env.seq <= acked) or env.kind in (KIND_HANDOVER, KIND_QUERY):
                    continue  # acknowledged; a partition's state or a question nobody waits for any more
                item = Outgoing(env.kind, env.flags, env.type.encode(), env.key, env.partition, env.msg_id,
                                env.trace_id, env.cause_id, env.payload, None, raw=env.raw)
                outbox.park(service, item)
                resent += 1
        self._track_dedup(snap.dedup)
        self._results.update((msg_id, expires) for msg_id, _, expires, _, _ in snap.results)
        if data is not None:  # dedup ids, results, handler state and dead letters
            data.restore(snap, self.clock() - self.wall())
        self._compact(self.wall())
        return resent

    def close(self, commit: bool = True) -> None:
        """Commit and sync what is pending (unless ``commit`` is False: a crash), then close the
        store (once). The caller makes sure no sync runs meanwhile (the node joins its thread)."""
        if self.is_closed:
            return
        try:
            if commit:
                if self.dirty or self._waiters:
                    self.commit()
                if self.written > self.safe or self._unsynced:
                    self._sync()
        finally:
            self.is_closed = True
            self.store.close()
            stopped = StoreError(f"data dir {self.store.path}: the node stopped before this was committed")
            for fut in self._waiters + [f for _, waiters in self._by_generation for f in waiters]:
                if not fut.done():
                    fut.set_exception(stopped)

    def stats(self) -> dict[str, Any]:
        """What ``stats`` reports about the store."""
        return {
            "data_dir": self.store.path,
            "fsync": self.store.fsync,
            "lives": self.store.identity.lives,
            "commits": self.commits,
            "commit_ms": round(1000 * self.commit_seconds / self.commits, 3) if self.commits else 0.0,
            "syncs": self.syncs,
            "sync_ms": round(1000 * self.sync_seconds / self.syncs, 3) if self.syncs else 0.0,
            "rows_written": self.rows_written,
            "bytes": self.store.size(),
            "used_bytes": self.store.used(),
            "dedup_ids": sum(self._dedup_ids.values()),
            "failing": str(self.failing) if self.failing is not None else None,
        }


def _raw(item: Outgoing) -> bytes:
    """The envelope of an item waiting outside a window (its sequence number is the next window's)."""
    if item.raw is not None:
        return item.raw
    return core.pack_envelope(
        0, item.kind, item.flags, item.type, item.key, item.partition, item.msg_id, item.trace_id, item.cause_id,
        item.payload,
    )


def _le(parts: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover - the store's partitions are little-endian
        parts = array("H", parts)
        parts.byteswap()
    return parts.tobytes()


def _unfiled(ch: OutChannel) -> deque[tuple[int, bytes, bytes]]:
    """(seq, msg id, envelope) of the copies ``ch`` keeps that no row of their own holds yet, by seq."""
    filed = ch.kept_records
    return deque(sorted((int.from_bytes(item.raw[:8], "little"), msg_id, item.raw)  # type: ignore[index]
                        for msg_id, item in ch.custody.items() if msg_id not in filed))
