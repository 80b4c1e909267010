"""Running handlers: dedup, per-key order, retries, dead letters and the ack after the effects.

The path of one received envelope (a :class:`Job`):

1. **Dedup.** Its id (or idempotency key, which senders put in the id) goes into the type's
   ``DedupWindow``. A duplicate is not handled again: it is finished when the original is
   (at once if that is already done), and a duplicate command gets the original's result.
2. **Per-key order.** At most one job per key is in a handler; the others wait in arrival order
   (``KeyedDispatch``). A job that waits for a retry keeps its key, so a later message of the
   same key never overtakes a failing one.
3. **The handler** runs, sync inline or async as a task, with a :class:`HandlerContext` that
   *buffers* what it emits and sends: a failed attempt leaks nothing.
4. **Effects.** On success the buffered messages are sent with ids derived from the input's
   id, the handler and their position; the job waits until every one is acknowledged
   downstream, then the result goes back to the caller (commands and queries), and only then
   is the input acknowledged to its sender.
5. **Failure.** An exception is retried with backoff, then the job goes to the dead-letter store
   (payload, error, attempts) and is acknowledged, so one poison message cannot wedge a channel.
   A failure no retry can fix goes there at once, under its own class: a body that does not
   match its declared type, an undeclared emit, a message too large, a misused API
   (:data:`NOT_RETRIED`); a command's caller gets that same class back.

On a durable node (with a :class:`~choreo.runtime.journal.Journal`) the dispatcher also tells
the journal what it finished: the ids of the messages it handled (a slice of each batch the
compiled lane ran), command results, the partitions handed over to it and its dead letters, all
committed before the acks that cover them leave. What a handler emitted is safe there once it is
in the node's store (:class:`~choreo.runtime.channels.SafeOnceStored`), so its input is
acknowledged without waiting for the emitted messages' receivers.

Arrivals for a partition this node does not own go to :class:`~choreo.runtime.moves.Moves`
(buffered until a handover, or forwarded to the owner). What the dispatcher needs of its node
(sending, acks, timers, the caller API for ``ctx.ask``) is the small :class:`Host` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
import traceback
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from .. import core
from ..config import NodeConfig
from ..errors import ChoreoUsageError, MessageTooLarge, NoOwner, UndeclaredMessage, ValidationError
from ..messages import Message, decode, decoder_for, message_options
from ..service import Handler, Service
from ..statetypes import StateTypes
from ..tracing import Tracer, format_traceparent
from ..wire import FLAG_BROADCAST, FLAG_REPLAY, FLAG_UNKEYED, KIND_COMMAND, KIND_EVENT, KIND_HANDOVER, KIND_QUERY
from .calls import error_reply, ok_reply
from .channels import InChannel, SafeOnceStored
from .deadletters import DeadLetter, DeadLetters
from .journal import ENTRY_SIZE, Journal
from .moves import Moves
from .replicas import Replicas
from .state import StateTables, state_view
from .transfer import Delta, Piece, Staged
from .store import Snapshot

__all__ = ["Job", "HandlerContext", "Dispatcher", "Host"]

log = logging.getLogger("choreo.dispatch")
_reply_encoder = msgspec.msgpack.Encoder()
_KIND_FOR = {"event": KIND_EVENT, "command": KIND_COMMAND, "query": KIND_QUERY}


#: failures that no retry can fix: dead-lettered at the first attempt
NOT_RETRIED = (ValidationError, ChoreoUsageError, MessageTooLarge)


class Host(Protocol):
    """What the dispatcher needs of the node it runs in."""

    name: str  # the instance, as handlers see it (ctx.instance)
    batch_received: float  # when the batch being delivered arrived (the node's clock: the spans' clock)
    clock: Callable[[], float]
    wall: Callable[[], float]

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def count_refused(self, reason: str, detail: str) -> None: ...

    def ack_later(self, channel: InChannel) -> None: ...

    def schedule_flush(self) -> None: ...

    def send_outputs(self, job: Job, outputs: list[Message], on_done: Callable[[], None]) -> int: ...

    def send_reply(self, job: Job, reply: bytes) -> bool: ...

    def has_owner(self, type_name: str) -> bool: ...

    async def ask(self, query: Message, *, timeout: float | None, trace_id: bytes, cause_id: bytes) -> Any: ...


class Job:
    """One received message on its way through a handler."""

    __slots__ = (
        "env",
        "channel",
        "handler",
        "attempt",
        "message",
        "pending",
        "reply",
        "holds_key",
        "duplicates",
        "received",
        "started",
        "replay_of",
        "error",
        "writes",
        "before",
    )

    def __init__(self, env: Any, channel: InChannel | None, handler: Handler | None, received: float) -> None:
        self.env = env
        self.channel = channel
        self.handler = handler
        self.attempt = 0
        self.message: Message | None = None
        self.pending = 0  # outputs not yet done downstream
        self.reply: bytes | None = None  # encoded [ok, body] for commands and queries
        self.holds_key = False
        self.duplicates: list[Job] = []
        self.received = received
        self.started = 0.0
        self.replay_of: DeadLetter | None = None
        self.error: str | None = None
        self.writes: dict[int, bytes | None] | None = None  # state writes a standby has yet to get
        self.before: dict[int, bytes | None] | None = None  # the values they replaced


class HandlerContext:
    """What a running handler may do besides returning: see :class:`choreo.Context`.

    A plain-function handler may get the same context object for several messages of a batch:
    it is valid during the call it was passed to. ``envelope`` and ``handler`` are what is being
    handled and by whom (the core's compiled lane sets both before each call, and clears
    ``writes``, the handler's buffered state writes).
    """

    __slots__ = ("_host", "envelope", "handler", "_attempt", "outputs", "writes", "_keeper", "state")

    def __init__(
        self, host: Host, envelope: Any, handler: Handler, attempt: int = 0, keeper: Dispatcher | None = None
    ) -> None:
        self._host = host
        self.envelope = envelope
        self.handler = handler
        self._attempt = attempt
        self.outputs: list[Message] = []
        self.writes: dict[int, bytes | None] | None = None
        self._keeper = keeper
        # the state of this message's key (see choreo.State): a plain attribute, read per message
        self.state: Any = (
            state_view(
                self, keeper.state, keeper.config.max_state_bytes,
                keeper.replicas.standby if keeper.replicas is not None else None,
                keeper.log_writes if keeper.journal is not None else None,
            )
            if keeper is not None and keeper.state is not None
            else NoState(self)
        )

    @property
    def message_id(self) -> bytes:
        return self.envelope.msg_id  # type: ignore[no-any-return]

    @property
    def trace_id(self) -> bytes:
        return self.envelope.trace_id  # type: ignore[no-any-return]

    @property
    def traceparent(self) -> str:
        """W3C ``traceparent`` of this handling of the message (pass it on to HTTP calls)."""
        return format_traceparent(self.envelope.trace_id, self.envelope.msg_id, self.handler.name)

    @property
    def attempt(self) -> int:
        return self._attempt + 1

    @property
    def service(self) -> str:
        return self.handler.service

    @property
    def instance(self) -> str:
        return self._host.name

    @property
    def key(self) -> bytes:
        return self.envelope.key  # type: ignore[no-any-return]

    def _declared(self, message: Message, allowed: tuple[type, ...], verb: str) -> None:
        handler = self.handler
        if handler.kind == "query":
            raise ChoreoUsageError(f"query handler {handler.name} may not {verb}: queries have no side effects")
        if type(message) not in allowed:
            name = message_options(type(message)).name
            declared = ", ".join(message_options(t).name for t in allowed) or "nothing"
            raise UndeclaredMessage(
                f"handler {handler.name} ({handler.where}) {verb}s {name}, which it does not declare "
                f"(its {verb}s= lists {declared}); add it to the decorator"
            )

    def emit(self, event: Message) -> None:
        """Publish an event (sent once the handler returns without raising)."""
        self._declared(event, self.handler.emits, "emit")
        self.outputs.append(event)

    def send(self, command: Message) -> None:
        """Send a command (sent once the handler returns without raising)."""
        self._declared(command, self.handler.sends, "send")
        name = message_options(type(command)).name
        if not self._host.has_owner(name):
            raise NoOwner(f"no live service in the mesh handles command {name}")
        self.outputs.append(command)

    async def ask(self, query: Message, timeout: float | None = None) -> Any:
        """Ask a query declared in ``sends=`` and return its answer."""
        self._declared(query, self.handler.sends, "send")
        env = self.envelope
        return await self._host.ask(query, timeout=timeout, trace_id=env.trace_id, cause_id=env.msg_id)


class NoState:
    """``ctx.state`` of a service that declares no state types: every use says how to declare them."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: HandlerContext) -> None:
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        handler = self._ctx.handler
        raise ChoreoUsageError(
            f"handler {handler.name} ({handler.where}) uses ctx.state, but service {handler.service} "
            "declares no state types: Service(..., state=[YourType])"
        )


@dataclass
class DispatchStats:
    received: int = 0
    processed: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    in_handler: int = 0
    abandoned: int = 0  # received, not run: their sender was declared gone (it resends them elsewhere)
    lag: dict[int, int] = field(default_factory=dict)


class Dispatcher:
    """Handles the envelopes addressed to this node's service."""

    def __init__(
        self,
        host: Host,
        service: Service | None,
        *,
        config: NodeConfig,
        tracer: Tracer,
        moves: Moves | None = None,
        results_max: int = 100_000,
        replicas: Replicas | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.host = host
        self.service = service
        self.config = config
        self.tracer = tracer
        self.moves = moves  # service nodes: partitions not (yet) ours go there
        self.handlers: dict[str, Handler] = dict(service.handlers) if service else {}
        self.keyed = core.KeyedDispatch()
        self.dedup: dict[str, core.DedupWindow] = {}
        self.in_progress: dict[bytes, Job] = {}
        # command id -> (time, ttl, reply, partition): a duplicate command gets the first result
        self.results: OrderedDict[bytes, tuple[float, float, bytes, int]] = OrderedDict()
        self.results_max = results_max
        self.journal = journal  # durable nodes: what must commit before an ack leaves
        self.dead_letters = DeadLetters(config.dlq_max, config.dlq_max_bytes, journal=journal)
        if journal is not None:
            journal.windows = self.dedup.get
            journal.results_max = results_max
        self.ready: deque[Job] = deque()
        self.stats = DispatchStats()
        self._fast: dict[str, bool] = {}  # type -> handled by the fast lane
        # a handler that emits and sends nothing ends the flow of a message from outside at its span
        tracer.terminal.update(h.name for h in self.handlers.values() if not h.emits and not h.sends)
        self.lane = core.FastLane()
        self.state: StateTables | None = None  # the state of this node's partitions
        if service is not None and service.state:
            self.state = StateTables(StateTypes(service.state), service.partitions)
        self.replicas = replicas  # standby copies of the state (a service with replicas=1)
        self.unshipped: dict[bytes, deque[Job]] = {}  # key -> jobs whose writes the standby has yet to get
        self._lane_ctx = HandlerContext(host, None, None, keeper=self)  # type: ignore[arg-type]  # reused by the lane

    # -- arrival -------------------------------------------------------------------------------

    def _fast_entry(self, type_name: str) -> bool:
        """Register a type with the fast lane when its handler is a plain event function."""
        handler = self.handlers.get(type_name)
        ok = handler is not None and handler.kind == "event" and not handler.is_async
        if ok:
            assert handler is not None
            window = self.dedup.get(type_name)
            if window is None:
                options = message_options(handler.message)
                window = self.dedup[type_name] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
            self.lane.set(
                type_name,
                decoder_for(handler.message).decode,
                window if self.config.dedup else None,
                handler.fn,
                handler.name,
                handler.takes_context,
                handler,
                handler.batch,
            )
        self._fast[type_name] = ok
        return ok

    def deliver_batch(self, channel: InChannel, envs: list[Any], now: float) -> None:
        """Take a channel's released envelopes, in order.

        The common case, an event for a plain-function handler whose key is idle, is handled
        by the core's compiled lane (dedup, decode, call, complete, span) without any
        bookkeeping object. Wherever the lane stops (commands, async handlers, duplicates,
        failures, emitted effects, busy keys, partitions not ours), the envelope becomes a
        :class:`Job` here, and the lane resumes after it.
        """
        host = self.host
        received = host.batch_received
        tracer = self.tracer
        spans_append = tracer.spans if tracer.enabled else None  # the lane records into the ring itself
        gate = self.moves.ownership.gate if self.moves is not None else None
        reorder = channel.reorder
        run = self.lane.run
        journal = self.journal if self.config.dedup else None
        done, i, n = 0, 0, len(envs)
        while i < n:
            if self.ready:  # jobs wait to start: everything after them waits too (per-key order)
                for env in envs[i:]:
                    self.deliver(channel, env, now)
                break
            handled, i, status, a, b, started = run(
                envs, i, reorder, now, host.clock, received, gate, self.keyed, spans_append, self._lane_ctx
            )
            done += handled
            if handled and journal is not None:
                journal.handled_slice(envs, i - handled, i)  # their ids commit before their ack leaves
            if status == core.LANE_END:
                break
            env = envs[i]
            if status == core.LANE_SLOW:
                if env.type not in self._fast and self._fast_entry(env.type):
                    continue  # a type seen for the first time, now registered: the lane takes it
                self.deliver(channel, env, now)
            else:
                handler = self.handlers[env.type]
                if status == core.LANE_DUPLICATE:
                    self.stats.received += 1
                    self._track(env.partition)
                    self._duplicate(Job(env, channel, handler, received))
                elif status == core.LANE_BAD:
                    self._slow_path(channel, env, handler, received, None)  # refused, counted, acked
                elif status == core.LANE_BATCH_FAILED:
                    # the batch raised: each of its messages runs again on its own, in order (keys kept)
                    error = f"{type(b).__name__}: {b} (in a batch of {len(a)}; each is run again on its own)"
                    for k, message in enumerate(a):
                        job = self._slow_path(channel, envs[i + k], handler, received, message)
                        job.started = started
                        self.tracer.finished(job, "error", error)
                        self._admit(job)
                    i += len(a) - 1
                else:
                    job = self._slow_path(channel, env, handler, received, a)
                    job.started = started
                    self.stats.in_handler += 1
                    if status == core.LANE_FAILED:
                        self._failed(job, b)
                    else:  # LANE_EFFECTS: the handler emitted or sent; they go out, then the ack
                        self._succeeded(job, b, None)
            i += 1
        if done:
            self.stats.received += done
            self.stats.processed += done
            host.ack_later(channel)

    def _track(self, partition: int) -> None:
        lag = self.stats.lag
        lag[partition] = lag.get(partition, 0) + 1

    def lag_of(self, partition: int) -> int:
        """Messages of ``partition`` received here and not yet handled."""
        return self.stats.lag.get(partition, 0)

    def untrack(self, partition: int) -> None:
        lag = self.stats.lag
        n = lag.get(partition, 0) - 1
        if n > 0:
            lag[partition] = n
        else:
            lag.pop(partition, None)

    # -- a partition moves: its dedup ids, cached results and state go with it -------------------

    def export_partition(self, p: int, settled: bool = False) -> Iterator[Piece]:
        """Everything this node knows of partition ``p``, as stream pieces (read as they go; kept
        here until :meth:`forget_partition`). Times are this node's clock: each chunk says what
        that clock read, and the receiver shifts them onto its own.

        ``settled`` (a standby's copy): only what its deltas will not bring later: no id of a
        message still in progress, and a key's value before the writes its standby has yet to get.
        """
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

    def forget_partition(self, p: int) -> None:
        """Partition ``p`` is its new owner's now: forget its dedup ids, results and state here."""
        for window in self.dedup.values():
            window.drop_partition(p)
        for msg_id in [k for k, v in self.results.items() if v[3] == p]:
            del self.results[msg_id]
        if self.state is not None:
            self.state.drop(p)
            if self.journal is not None:
                self.journal.state_dropped(p)

    def install(self, staged: Staged) -> None:
        """A partition received whole and checked (see :mod:`choreo.runtime.transfer`): its dedup
        ids and results join ours; its state replaces ours, unless this node already runs the
        partition (a race of views), where what it wrote itself since is newer and stays."""
        p = staged.partition
        for name, blob, shift in staged.dedup:
            handler = self.handlers.get(name)
            if handler is None:
                continue
            window = self.dedup.get(name)
            if window is None:
                options = message_options(handler.message)
                window = self.dedup[name] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
            try:
                shifted = _shift_times(blob, shift)
                window.import_entries(shifted, p)
            except (core.MalformedFrame, struct.error) as exc:
                self.host.count_refused("malformed", f"dedup ids of partition {p} in a hand-over: {exc}")
                continue
            if self.journal is not None:  # a durable node keeps what it was handed
                self.journal.imported(name, list(_DEDUP_RECORD.iter_unpack(shifted[4:])), p)
        now = self.host.clock()
        for msg_id, t, ttl, reply in staged.results:
            if now - t < ttl and msg_id not in self.results:
                self.results[msg_id] = (t, ttl, reply, p)
                if self.journal is not None:
                    self.journal.result(msg_id, ttl - (now - t), reply, p)
        if self.state is None:
            return
        by_name = self.state.types.by_name
        tables: list[dict[bytes, bytes]] = [{} for _ in by_name]
        for name, key, body in staged.state:
            t = by_name.get(name)
            if t is None:
                self.host.count_refused("unknown_type", f"state {name!r} of partition {p} in a hand-over: "
                                                        f"{self._who()} declares {', '.join(by_name) or 'none'}")
                continue
            tables[t][key] = body
        if self.moves is not None and self.moves.ownership.state[p] == "owned":
            for t, table in enumerate(tables):
                table.update(self.state.tables[t][p])
        self.state.install(p, tables)
        if self.journal is not None:  # the partition's state, replaced whole in the store too
            self.journal.state_dropped(p)
            names = self.state.types.names
            for t, table in enumerate(tables):
                for key, body in table.items():
                    self.journal.state(names[t], key, p, body)

    def apply_delta(self, delta: Delta) -> None:
        """One handler's writes on its owner, applied to our standby copy with the message's id
        (and a command's result): the message is a duplicate here from now on."""
        p = delta.partition
        if self.state is not None:
            by_name = self.state.types.by_name
            writes = {by_name[name]: body for name, body in delta.writes if name in by_name}
            if len(writes) < len(delta.writes):
                self.host.count_refused("unknown_type", f"a state delta of partition {p} names a type "
                                                        f"{self._who()} does not declare")
            self.state.apply(p, delta.key, writes)
            if self.journal is not None:
                self.log_writes(p, delta.key, writes)
        handler = self.handlers.get(delta.message_type)
        if handler is None:
            return
        now = self.host.clock()
        options = message_options(handler.message)
        if self.config.dedup and handler.kind != "query":
            window = self.dedup.get(delta.message_type)
            if window is None:
                window = self.dedup[delta.message_type] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
            window.insert(delta.msg_id, now, p)
            if self.journal is not None:
                self.journal.imported(delta.message_type, [(delta.msg_id, now)], p)
        if delta.reply is not None and handler.kind == "command":
            self.results[delta.msg_id] = (now, options.dedup_ttl, delta.reply, p)
            if self.journal is not None:
                self.journal.result(delta.msg_id, options.dedup_ttl, delta.reply, p)

    def restore(self, snapshot: Snapshot, shift: float) -> None:
        """A restarted node: its dedup ids, cached results and dead letters from its store.

        ``shift`` turns the store's wall-clock times into this node's clock.
        """
        now = self.host.clock()
        for _, name, t, expires, entries in snapshot.dedup:
            handler = self.handlers.get(name)
            if handler is None or expires + shift <= now:
                continue
            window = self._window(name, handler)
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
        for letter_id, encoded in snapshot.letters:
            try:
                self.dead_letters.restore(DeadLetter.decode(encoded))
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
                log.warning("dead letter #%d in the store cannot be read (%s): skipped", letter_id, exc)

    def _window(self, name: str, handler: Handler) -> core.DedupWindow:
        window = self.dedup.get(name)
        if window is None:
            options = message_options(handler.message)
            window = self.dedup[name] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
        return window

    def _slow_path(self, channel: InChannel, env: Any, handler: Handler, received: float, message: Message | None) -> Job:
        """An envelope the fast path took through dedup becomes a tracked job."""
        self.stats.received += 1
        self._track(env.partition)
        job = Job(env, channel, handler, received)
        job.message = message
        self.in_progress[env.msg_id] = job
        if message is None:
            self._admit(job)  # decoding fails again there, with the refusal counted and logged
        return job

    def deliver(self, channel: InChannel, env: Any, now: float) -> None:
        """Take one released envelope (called in sequence order per channel)."""
        if channel.closed:
            return  # its sender was declared gone: it resends this to the partition's owner
        moves = self.moves
        if env.kind == KIND_HANDOVER:
            if moves is None:
                self.host.count_refused("unknown_type", f"a hand-over from {channel.peer.node}, and this is a client")
            elif channel.peer.service_name != moves.service:
                self.host.count_refused("not_allowed", f"a hand-over from {channel.peer.node}, which is not an "
                                                       f"instance of {moves.service}")
            elif env.partition >= moves.ownership.partitions:
                self.host.count_refused("malformed", f"a hand-over of partition {env.partition} from "
                                                     f"{channel.peer.node}: {moves.service} has {moves.ownership.partitions}")
            else:
                moves.on_transfer(channel, env)
            channel.reorder.complete(env.seq)
            self.host.ack_later(channel)
            return
        if env.flags & FLAG_REPLAY:  # only this node replays its own dead letters: never a flag from the wire
            self.refuse(channel, env, "malformed", f"{env.type} from {channel.peer.node} flagged as a replay")
            return
        if moves is not None and env.partition >= moves.ownership.partitions:
            self.refuse(channel, env, "malformed", f"{env.type} from {channel.peer.node} for partition {env.partition}: "
                                                   f"{moves.service} has {moves.ownership.partitions}")
            return
        handler = self.handlers.get(env.type)
        if (
            moves is not None
            and handler is not None
            and not moves.ownership.gate[env.partition]
            and not env.flags & (FLAG_UNKEYED | FLAG_BROADCAST)
        ):
            if moves.buffer(channel, env):  # until the handover (or our own join)
                self._track(env.partition)
                return
            if moves.forward(channel, env):
                return
        self.stats.received += 1
        if handler is None or _KIND_FOR[handler.kind] != env.kind:
            self.host.count_refused(
                "unknown_type",
                f"{env.type!r} (kind {env.kind}) from {channel.peer.node}: "
                f"{self.service.name if self.service else 'this client'} has no handler for it",
            )
            job = Job(env, channel, None, self.host.batch_received)
            if env.kind in (KIND_COMMAND, KIND_QUERY):
                job.reply = error_reply("UnknownType", f"{self._who()} does not handle {env.type}")
            self._effects_safe(job)
            return
        job = Job(env, channel, handler, self.host.batch_received)
        self._track(env.partition)
        if handler.kind != "query" and self.config.dedup:
            window = self.dedup.get(env.type)
            if window is None:
                options = message_options(handler.message)
                window = self.dedup[env.type] = core.DedupWindow(options.dedup_ttl, options.dedup_max)
            if not window.insert(env.msg_id, now, env.partition):
                self._duplicate(job)
                return
            self.in_progress[env.msg_id] = job
        self._admit(job)

    def refuse(self, channel: InChannel, env: Any, reason: str, detail: str) -> None:
        """An envelope this node will not run: counted and logged, acknowledged (it cannot wedge its
        channel), and answered with the reason when its sender waits for an answer."""
        self.host.count_refused(reason, detail)
        job = Job(env, channel, None, self.host.batch_received)
        if env.kind in (KIND_COMMAND, KIND_QUERY):
            job.reply = error_reply("NotAllowed" if reason == "not_allowed" else "ProtocolError", detail)
        self._effects_safe(job)

    def _admit(self, job: Job) -> None:
        env = job.env
        assert job.handler is not None
        if env.flags & FLAG_UNKEYED:
            self.ready.append(job)
        elif job.handler.is_async or self.keyed.busy(env.key) or self.ready:
            if self.keyed.admit(env.key, job):
                job.holds_key = True
                self.ready.append(job)
        else:
            self._start(job)

    def _abandon(self, job: Job) -> None:
        """A job whose channel closed before its handler ran: its sender was declared gone (or this
        node re-incarnated), so its ack can never arrive and the sender resends the message to the
        partition's owner. Running it here as well would run it twice: forget it, and its dedup id,
        so that the resend runs wherever it lands (here too). A duplicate waiting on it runs instead."""
        self.stats.abandoned += 1
        env = job.env
        if job.holds_key:
            job.holds_key = False
            nxt = self.keyed.done(env.key)
            if nxt is not None:
                nxt.holds_key = True
                self.ready.append(nxt)
        self._unlag(job)
        if self.in_progress.get(env.msg_id) is job:
            del self.in_progress[env.msg_id]
            window = self.dedup.get(env.type)
            if window is not None:
                window.remove(env.msg_id)
            now = self.host.clock()
            for dup in job.duplicates:
                if dup.channel is not None and not dup.channel.closed:
                    self.deliver(dup.channel, dup.env, now)

    def _duplicate(self, job: Job) -> None:
        self.stats.duplicates += 1
        job.started = self.host.clock()
        self.tracer.finished(job, "duplicate", None)  # a retry shows in its trace, not run
        original = self.in_progress.get(job.env.msg_id)
        if original is not None:
            original.duplicates.append(job)
            return
        cached = self.results.get(job.env.msg_id)
        if cached is not None and job.env.kind != KIND_EVENT:
            job.reply = cached[2]
        elif job.env.kind != KIND_EVENT:
            job.reply = error_reply(
                "ResultExpired",
                f"{job.env.type} was already handled, and its result is no longer remembered "
                "(older than the type's dedup window, or the handling instance crashed)",
            )
        self._effects_safe(job)

    def pump(self) -> None:
        """Start every job that became ready (iteratively: no recursion through handlers)."""
        ready = self.ready
        while ready:
            self._start(ready.popleft())

    # -- running -------------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        handler = job.handler
        assert handler is not None
        if job.channel is not None and job.channel.closed:
            self._abandon(job)
            return
        if job.message is None:
            try:
                job.message = decode(handler.message, job.env.payload)
            except ValidationError as exc:  # an older or foreign sender: counted, and kept as a dead letter
                self.host.count_refused("invalid_payload", f"{exc} (from {self._sender(job)})")
                self.stats.in_handler += 1
                job.started = self.host.clock()
                self._failed(job, exc)
                return
        ctx = HandlerContext(self.host, job.env, handler, job.attempt, self)
        self.stats.in_handler += 1
        job.started = self.host.clock()
        try:
            if handler.is_async:
                coro = handler.fn(job.message, ctx) if handler.takes_context else handler.fn(job.message)
                task = asyncio.get_running_loop().create_task(coro)
                task.add_done_callback(lambda t, job=job, ctx=ctx: self._async_done(job, ctx, t))
                return
            if handler.batch:  # a batch handler, given one message: a list of one
                result = handler.fn([job.message])
            else:
                result = handler.fn(job.message, ctx) if handler.takes_context else handler.fn(job.message)
        except Exception as exc:
            self._failed(job, exc)
        else:
            self._succeeded(job, ctx, result)

    def _async_done(self, job: Job, ctx: HandlerContext, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self._failed(job, asyncio.CancelledError("handler task was cancelled"))
        elif task.exception() is not None:
            self._failed(job, task.exception())  # type: ignore[arg-type]
        else:
            self._succeeded(job, ctx, task.result())
        self.pump()
        self.host.schedule_flush()

    def _succeeded(self, job: Job, ctx: HandlerContext, result: Any) -> None:
        self.stats.in_handler -= 1
        handler = job.handler
        assert handler is not None
        reply = None
        if handler.kind != "event":
            try:
                reply = ok_reply(_reply_encoder.encode(result))
            except (TypeError, msgspec.EncodeError) as exc:
                self._failed(job, TypeError(f"handler {handler.name} returned a value choreo cannot encode: {exc}"))
                return
            limit = self._reply_limit(job)
            if len(reply) - 1 > limit:  # it ran (its effects stand), but its result cannot travel: say so, both sides
                detail = (f"the result of {job.env.type} is {len(reply) - 1} bytes, above the limit of {limit} "
                          "(max_message_bytes): return less (a page, or a reference to fetch it by)")
                self.host.count_refused("result_too_large", f"{handler.name}: {detail}")
                reply = error_reply("MessageTooLarge", detail)
        outputs = ctx.outputs
        ctx.outputs = []
        writes = ctx.writes
        ctx.writes = None
        if outputs:
            # on a durable node an output is safe once it is in a window: its batch commits first
            done = SafeOnceStored(self.output_done, job) if self.journal is not None else partial(self.output_done, job)
            try:
                routed = self.host.send_outputs(job, outputs, done)
            except Exception as exc:  # routing failed (no owner any more...): the attempt failed
                self.stats.in_handler += 1
                self._failed(job, exc)
                return
            job.pending += routed
        if writes is not None:  # in the same step as its outputs went to the outbox: both or neither
            self._apply(job.env, writes, job)
        self.tracer.finished(job, "ok", None)
        self._finish_handler(job, reply=reply, dead=False)
        if job.writes is not None:
            self._ship_ready(job.env.key)

    # -- state ---------------------------------------------------------------------------------

    def _apply(self, env: Any, writes: dict[int, bytes | None], job: Job | None = None) -> None:
        state = self.state
        assert state is not None
        p, key = env.partition, env.key
        if job is not None and self.replicas is not None and self.replicas.copies(p):
            job.before = {t: state.get(t, p, key) for t in writes}
            job.writes = writes
            job.pending += 1  # its delta: shipped once its outputs are acknowledged (_ship_ready)
            self.unshipped.setdefault(key, deque()).append(job)
        state.apply(p, key, writes)
        if self.journal is not None:
            self.log_writes(p, key, writes)

    def log_writes(self, p: int, key: bytes, writes: dict[int, bytes | None]) -> None:
        """A durable node: state writes commit with the message that made them."""
        assert self.journal is not None and self.state is not None
        names = self.state.types.names
        for t, body in writes.items():
            self.journal.state(names[t], key, p, body)

    def _ship_ready(self, key: bytes) -> None:
        """Send the standby the writes of this key's jobs whose outputs are all acknowledged, in
        the order their handlers ran (a later write never overtakes an earlier one)."""
        queue = self.unshipped.get(key)
        assert self.state is not None and self.replicas is not None
        names = self.state.types.names
        while queue and queue[0].pending == 1:
            job = queue.popleft()
            env = job.env
            assert job.writes is not None
            delta = Delta(
                env.partition, key, [(names[t], body) for t, body in job.writes.items()], env.type, env.msg_id,
                self.host.clock(), job.reply if env.kind == KIND_COMMAND else None,
            )
            job.writes = job.before = None
            self.replicas.ship(env.partition, delta, partial(self.output_done, job))
        if not queue:
            self.unshipped.pop(key, None)

    def _reply_limit(self, job: Job) -> int:
        """The largest result that may travel to this job's caller: its limit and ours."""
        limit = self.config.max_message_bytes
        if job.channel is not None:
            limit = min(limit, job.channel.peer.max_message_bytes)
        return limit

    def _failed(self, job: Job, exc: BaseException) -> None:
        self.stats.in_handler -= 1
        self.stats.failed_attempts += 1
        handler = job.handler
        assert handler is not None
        job.attempt += 1
        job.error = f"{type(exc).__name__}: {exc}"
        self.tracer.finished(job, "error", job.error)
        if job.attempt <= handler.retry.retries and not isinstance(exc, NOT_RETRIED):
            if not job.holds_key and not job.env.flags & FLAG_UNKEYED:
                if self.keyed.admit(job.env.key, job):
                    job.holds_key = True
            delay = handler.retry.delay(job.attempt)
            log.info("%s failed (attempt %d), retrying in %.3f s: %s", handler.name, job.attempt, delay, job.error)
            self.host.call_later(delay, lambda: self._retry(job))
            return
        self._dead_letter(job, exc)
        reply = error_reply(type(exc).__name__, str(exc)) if handler.kind != "event" else None
        self._finish_handler(job, reply=reply, dead=True)

    def _retry(self, job: Job) -> None:
        if job.holds_key or job.env.flags & FLAG_UNKEYED:
            self._start(job)
        else:  # pragma: no cover - a retry always holds its key
            self._admit(job)
        self.pump()
        self.host.schedule_flush()

    def _finish_handler(self, job: Job, *, reply: bytes | None, dead: bool) -> None:
        """The handler phase is over (success, refusal or dead letter): free the key, then wait for effects."""
        job.reply = reply
        if job.holds_key:
            job.holds_key = False
            nxt = self.keyed.done(job.env.key)
            if nxt is not None:
                nxt.holds_key = True
                self.ready.append(nxt)
        if job.pending == 0:
            self._effects_safe(job)

    def output_done(self, job: Job) -> None:
        job.pending -= 1
        if job.pending == 0:
            self._effects_safe(job)
        elif job.pending == 1 and job.writes is not None:
            self._ship_ready(job.env.key)

    def _effects_safe(self, job: Job) -> None:
        """Everything the handler emitted is acknowledged: answer the caller, then ack the input."""
        reply = job.reply
        if reply is not None and job.env.kind in (KIND_COMMAND, KIND_QUERY):
            job.reply = None
            if self.in_progress.get(job.env.msg_id) is job:
                self._remember_result(job, reply)
            if job.channel is not None:
                self.host.send_reply(job, reply)  # ahead of the ack that completes the command
        self._complete(job)

    def _complete(self, job: Job) -> None:
        env = job.env
        if job.channel is not None:
            job.channel.reorder.complete(env.seq)
            self.host.ack_later(job.channel)
        if job.handler is not None:
            if job.replay_of is None:
                self._unlag(job)
            self.stats.processed += 1
            if self.tracer.completed is not None:  # metrics watch: a flow from outside ends here
                self.tracer.flow_done(job)
            if job.replay_of is not None and self.journal is not None:
                if self.dead_letters.get(job.replay_of.id) is None:  # replayed and handled: gone
                    self.journal.letter_gone(job.replay_of.id)
            if self.in_progress.get(env.msg_id) is job:
                if self.journal is not None:
                    self.journal.handled(env)  # its id commits before its ack leaves
                del self.in_progress[env.msg_id]
                cached = self.results.get(env.msg_id)
                for dup in job.duplicates:
                    if cached is not None:
                        dup.reply = cached[2]
                    self._effects_safe(dup)

    def _unlag(self, job: Job) -> None:
        self.untrack(job.env.partition)

    def _remember_result(self, job: Job, reply: bytes) -> None:
        if job.env.kind != KIND_COMMAND or job.handler is None:
            return
        options = message_options(job.handler.message)
        self.results[job.env.msg_id] = (self.host.clock(), options.dedup_ttl, reply, job.env.partition)
        if self.journal is not None:
            self.journal.result(job.env.msg_id, options.dedup_ttl, reply, job.env.partition)
        while len(self.results) > self.results_max:
            self.results.popitem(last=False)
        # forget results older than their dedup window, oldest first
        now = self.host.clock()
        while self.results:
            t, ttl, _, _ = next(iter(self.results.values()))
            if now - t < ttl:
                break
            self.results.popitem(last=False)

    # -- dead letters --------------------------------------------------------------------------

    def _dead_letter(self, job: Job, exc: BaseException) -> None:
        handler = job.handler
        assert handler is not None
        now = self.host.wall()
        env = job.env
        if job.replay_of is not None:
            letter = job.replay_of
            letter.attempts += job.attempt
            letter.error, letter.error_type = str(exc), type(exc).__name__
            letter.last_failed = now
            self.dead_letters.put_back(letter)
        else:
            letter = DeadLetter(
                id=0,
                message_type=env.type,
                service=handler.service,
                handler=handler.name,
                msg_id=env.msg_id,
                trace_id=env.trace_id,
                key=env.key,
                partition=env.partition,
                payload=env.payload,
                error=str(exc),
                error_type=type(exc).__name__,
                traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=20)),
                attempts=job.attempt,
                first_failed=now,
                last_failed=now,
            )
            self.dead_letters.add(letter)
        self.stats.dead_lettered += 1
        log.warning(
            "%s: %s -> dead letter #%d after %d attempts: %s", handler.name, env.type, letter.id, job.attempt, job.error
        )

    def replay(self, letter_id: int) -> DeadLetter:
        """Run a dead letter's handler again, once (with its retry policy). KeyError if unknown."""
        letter = self.dead_letters.take(letter_id)
        handler = self.handlers.get(letter.message_type)
        if handler is None:
            self.dead_letters.put_back(letter)
            raise ChoreoUsageError(f"this node no longer handles {letter.message_type}")
        letter.replays += 1
        env = _ReplayEnvelope(letter, _KIND_FOR[handler.kind])
        job = Job(env, None, handler, self.host.clock())  # a later attempt, on the spans' clock
        job.replay_of = letter
        self._admit(job)
        self.pump()
        self.host.schedule_flush()
        return letter

    # -- helpers -------------------------------------------------------------------------------

    def _who(self) -> str:
        return self.service.name if self.service else "this client"

    @staticmethod
    def _sender(job: Job) -> str:
        return job.channel.peer.node if job.channel is not None else "a replay"

    @property
    def idle(self) -> bool:
        return not self.in_progress and not self.ready and self.stats.in_handler == 0 and self.keyed.busy_keys == 0


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


class _ReplayEnvelope:
    """A dead letter dressed as a received envelope, for its replay."""

    __slots__ = ("seq", "kind", "flags", "partition", "type", "key", "msg_id", "trace_id", "cause_id", "payload")

    def __init__(self, letter: DeadLetter, kind: int) -> None:
        self.seq = 0
        self.kind = kind
        self.flags = FLAG_REPLAY | (FLAG_UNKEYED if not letter.key else 0)
        self.partition = letter.partition
        self.type = letter.message_type
        self.key = letter.key
        self.msg_id = letter.msg_id
        self.trace_id = letter.trace_id
        self.cause_id = bytes(16)
        self.payload = letter.payload
