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
compiled lane ran), command results and its dead letters, all committed before the acks that
cover them leave. What a handler emitted is safe there once it is
in the node's store (:class:`~choreo.runtime.channels.SafeOnceStored`), so its input is
acknowledged without waiting for the emitted messages' receivers.

Arrivals for a partition this node does not own go to :class:`~choreo.runtime.moves.Moves`
(buffered until a handover, or forwarded to the owner). The tables a partition takes with it
when it moves (dedup ids, command results, handler state) are shared with
:class:`~choreo.runtime.partdata.PartitionData`, which exports, installs and restores them and
applies handlers' state writes. What the dispatcher needs of its node (sending, acks, timers, the
caller API for ``ctx.ask``) is the small :class:`~choreo.runtime.context.Host` protocol; a job and
its handler's context are :mod:`~choreo.runtime.context`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import core
from ..config import NodeConfig
from ..errors import ChoreoUsageError, MessageTooLarge, ValidationError
from ..messages import Message, decode, decoder_for
from ..service import Handler, Service
from ..statetypes import StateTypes
from ..tracing import Tracer
from ..wire import FLAG_BROADCAST, FLAG_REPLAY, FLAG_UNKEYED, KIND_COMMAND, KIND_EVENT, KIND_HANDOVER, KIND_QUERY
from .calls import error_reply, ok_reply
from .channels import InChannel, SafeOnceStored
from .context import HandlerContext, Host, Job
from .deadletters import DeadLetter, DeadLetters, ReplayEnvelope
from .journal import Journal
from .moves import Moves
from .owed import KeyHolds
from .partdata import PartitionData
from .replicas import Replicas
from .state import StateTables

__all__ = ["Dispatcher", "DispatchStats", "NOT_RETRIED"]

log = logging.getLogger("choreo.dispatch")
_reply_encoder = msgspec.msgpack.Encoder()
_KIND_FOR = {"event": KIND_EVENT, "command": KIND_COMMAND, "query": KIND_QUERY}


#: failures that no retry can fix: dead-lettered at the first attempt
NOT_RETRIED = (ValidationError, ChoreoUsageError, MessageTooLarge)


@dataclass
class DispatchStats:
    received: int = 0
    processed: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    in_handler: int = 0
    abandoned: int = 0  # received, not run: their sender was declared gone (it resends them elsewhere)
    relieved: int = 0  # acknowledged before they were done, to free a stalled channel (see relief.py)
    lag: dict[int, int] = field(default_factory=dict)  # partition -> messages received and not yet handled

    def track(self, partition: int) -> None:
        lag = self.lag
        lag[partition] = lag.get(partition, 0) + 1

    def untrack(self, partition: int) -> None:
        lag = self.lag
        n = lag.get(partition, 0) - 1
        if n > 0:
            lag[partition] = n
        else:
            lag.pop(partition, None)


class HeldResults:
    """The results of commands the lane answered, kept only once their answers have left.

    The intake's urgent path (intake.py) sends a frame's answers first: its callers' wait is the
    one that counts (:meth:`hold` ... :meth:`release` around it). Not on a durable node, whose
    answers wait for the commit their results are part of. A duplicate met meanwhile keeps them
    first (:meth:`keep_now`)."""

    __slots__ = ("_keep", "_durable", "pending")

    def __init__(self, keep: Callable[[Any, Handler, bytes], None], durable: bool) -> None:
        self._keep = keep
        self._durable = durable
        self.pending: list[tuple[Any, Handler, bytes]] | None = None  # (env, handler, reply); None: not holding

    def hold(self) -> None:
        if not self._durable and self.pending is None:
            self.pending = []

    def release(self) -> None:
        self.keep_now()
        self.pending = None

    def keep_now(self) -> None:
        pending = self.pending
        if pending:
            self.pending = []
            keep = self._keep
            for env, handler, reply in pending:
                keep(env, handler, reply)


def _who(service: Service | None) -> str:
    return service.name if service else "this client"


def _sender(job: Job) -> str:
    return job.channel.peer.node if job.channel is not None else "a replay"


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
        self.replays_committing: dict[int, int] = {}  # durable: letter id -> the commit that makes its replay safe
        if journal is not None:
            journal.windows = self.dedup.get
            journal.results_max = results_max
        self.ready: deque[Job] = deque()
        # (a hold outlasts a receiver's death and replacement, suspect + dead + a join, several times)
        bound = max(config.handover_timeout, 4 * (config.suspect_after + config.dead_after))
        self.holds = KeyHolds(self.keyed, self.ready, self.pump, host, bound, _who(service))
        self.stats = DispatchStats()
        self._fast: dict[str, bool] = {}  # type -> handled by the fast lane
        # a handler that emits and sends nothing ends the flow of a message from outside at its span
        tracer.terminal.update(h.name for h in self.handlers.values() if not h.emits and not h.sends)
        self.lane = core.FastLane()
        self._lane_clock = core.lane_clock(host.clock)  # the host's clock, as the lane reads it fastest
        self.state: StateTables | None = None  # the state of this node's partitions
        if service is not None and service.state:
            self.state = StateTables(StateTypes(service.state), service.partitions)
        # the tables above as a partition takes them along (hand-overs, standby copies, a restart)
        self.data = PartitionData(
            host, self.handlers, config=config, dedup=self.dedup, results=self.results, results_max=results_max,
            in_progress=self.in_progress, state=self.state, dead_letters=self.dead_letters,
            output_done=self.output_done, hand_on=self.hand_on, who=_who(self.service),
            send_mark=moves.send_mark if moves is not None else None,
            ownership=moves.ownership if moves is not None else None, replicas=replicas, journal=journal,
        )
        self.data.owed.holds = self.holds
        self.held_results = HeldResults(self.data.keep_result, durable=journal is not None)
        # one context, reused by the lane for each message it runs
        self._lane_ctx = HandlerContext(host, None, None, keeper=self.data)  # type: ignore[arg-type]

    # -- arrival -------------------------------------------------------------------------------

    def _fast_entry(self, type_name: str) -> bool:
        """Register a type with the fast lane when its handler is a plain function (a command's or
        query's takes one message at a time, and its result goes to :meth:`_answer`)."""
        handler = self.handlers.get(type_name)
        ok = handler is not None and not handler.is_async and (handler.kind == "event" or not handler.batch)
        if ok:
            assert handler is not None
            deduped = self.config.dedup and handler.kind != "query"  # a query changes nothing: no dedup
            self.lane.set(
                type_name,
                decoder_for(handler.message).decode,
                self.data.window(type_name, handler) if deduped else None,
                handler.fn,
                handler.name,
                handler.takes_context,
                handler,
                handler.batch,
                _KIND_FOR[handler.kind],
            )
        self._fast[type_name] = ok
        return ok

    def deliver_batch(self, channel: InChannel, envs: list[Any], now: float) -> None:
        """Take a channel's released envelopes, in order.

        The common case, a message for a plain-function handler whose key is idle, is handled
        by the core's compiled lane (dedup, decode, call, complete, span; a command's or query's
        answer through :meth:`_answer`) without any bookkeeping object. Wherever the lane stops
        (async handlers, duplicates, failures, emitted effects, state a command wrote, busy keys,
        partitions not ours), the envelope becomes a :class:`Job` here, and the lane resumes
        after it.
        """
        host = self.host
        received = host.batch_received
        tracer = self.tracer
        spans_append = tracer.spans if tracer.enabled else None  # the lane records into the ring itself
        gate = self.moves.ownership.gate if self.moves is not None else None
        reorder = channel.reorder
        run = self.lane.run
        journal = self.journal if self.config.dedup else None
        until = host.awake_until
        done, i, n = 0, 0, len(envs)
        while i < n:
            if self.ready:  # jobs wait to start: everything after them waits too (per-key order)
                for env in envs[i:]:
                    self.deliver(channel, env, now)
                break
            handled, i, status, a, b, started = run(
                envs, i, reorder, now, self._lane_clock, received, gate, self.keyed, spans_append, self._lane_ctx,
                self._answer, channel, until,
            )
            done += handled
            if handled:
                if journal is not None:
                    journal.handled_slice(envs, i - handled, i)  # their ids commit before their ack leaves
                if tracer.completed is not None:  # metrics watch: flows from outside may end here
                    tracer.flows_ran(envs[i - handled : i], self.handlers, received)
            if status == core.LANE_END:
                break
            if status == core.LANE_LATE:  # the batch ran long, or the process was stopped in it
                if not host.awake(started):
                    break  # frozen past dead_after: the channel is closed, its sender resends the rest
                until = host.awake_until
                continue
            env = envs[i]
            if status == core.LANE_SLOW:
                if env.type not in self._fast and self._fast_entry(env.type):
                    continue  # a type seen for the first time, now registered: the lane takes it
                self.deliver(channel, env, now)
            else:
                handler = self.handlers[env.type]
                if status == core.LANE_DUPLICATE:
                    self.stats.received += 1
                    self.stats.track(env.partition)
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
                    elif status == core.LANE_RESULT:  # a command's effects, or an answer that cannot travel
                        self._succeeded(job, b[0], b[1])
                    else:  # LANE_EFFECTS: the handler emitted or sent; they go out, then the ack
                        self._succeeded(job, b, None)
            i += 1
        if done:
            self.stats.received += done
            self.stats.processed += done
            host.ack_later(channel)

    def _answer(self, channel: InChannel, env: Any, result: Any) -> bool:
        """The lane ran a command or query that had no effects: answer its caller (False, with
        nothing done, when the result cannot travel: :meth:`_succeeded` then says why, both sides)."""
        try:
            body = _reply_encoder.encode(result)
        except (TypeError, msgspec.EncodeError):
            return False
        if len(body) > self._reply_limit(channel):
            return False
        reply = ok_reply(body)
        handler = self.handlers[env.type]
        if env.kind == KIND_COMMAND and self.config.dedup:  # a duplicate gets the same answer
            held = self.held_results.pending
            if held is None:
                self.data.keep_result(env, handler, reply)
            else:
                held.append((env, handler, reply))
        self.host.send_reply(channel, env, reply)
        if self.tracer.completed is not None:  # metrics watch: a flow from outside may end here
            self.tracer.flow_answered(env, handler.name, self.host.batch_received)
        return True

    def lag_of(self, partition: int) -> int:
        """Messages of ``partition`` received here and not yet handled."""
        return self.stats.lag.get(partition, 0)

    def untrack(self, partition: int) -> None:
        self.stats.untrack(partition)

    def _slow_path(self, channel: InChannel, env: Any, handler: Handler, received: float, message: Message | None) -> Job:
        """An envelope the fast path took through dedup becomes a tracked job."""
        self.stats.received += 1
        self.stats.track(env.partition)
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
            else:
                moves.on_transfer(channel, env)  # (refused unless from an instance of its service)
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
            if self.data.knows(env, handler, now):  # a duplicate, wherever its partition is (see Router.send_again)
                self.stats.received += 1
                self.stats.track(env.partition)
                self._duplicate(self._job(channel, env, handler))
                return
            if moves.buffer(channel, env):  # until the handover (or our own join)
                self.stats.track(env.partition)
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
                job.reply = error_reply("UnknownType", f"{_who(self.service)} does not handle {env.type}")
            self._effects_safe(job)
            return
        job = self._job(channel, env, handler)
        self.stats.track(env.partition)
        if handler.kind != "query" and self.config.dedup:
            if not self.data.window(env.type, handler).insert(env.msg_id, now, env.partition):
                self._duplicate(job)
                return
            self.in_progress[env.msg_id] = job
        self._admit(job)

    def _job(self, channel: InChannel, env: Any, handler: Handler | None) -> Job:
        job = Job(env, channel, handler, self.host.batch_received)
        if channel.keep and env.seq in channel.keep:  # acknowledged while it waited for its partition (relief.py)
            job.kept = [(channel, env.seq)]  # (its copy goes when it is done)
        return job

    def refuse(self, channel: InChannel, env: Any, reason: str, detail: str) -> None:
        """An envelope this node will not run: counted and logged, acknowledged (it cannot wedge its
        channel), and answered with the reason when its sender waits for an answer."""
        self.host.count_refused(reason, detail)
        job = self._job(channel, env, None)  # (a copy kept of it goes too: see _job)
        if env.kind in (KIND_COMMAND, KIND_QUERY):
            job.reply = error_reply("NotAllowed" if reason == "not_allowed" else "ProtocolError", detail)
        self._effects_safe(job)

    def _admit(self, job: Job) -> None:
        env = job.env
        assert job.handler is not None
        if env.flags & FLAG_UNKEYED:
            self.ready.append(job)
        elif job.handler.is_async or self.keyed.busy(env.key) or self.ready:
            if self.holds.traces and self.holds.passes(env.key, env.trace_id):
                self.ready.append(job)  # its flow came back to a held key: it must not wait for itself
            elif self.keyed.admit(env.key, job):
                job.holds_key = True
                self.ready.append(job)
        else:
            self._start(job)

    def draining(self, partition: int) -> None:
        """(For Moves) ``partition`` drains towards another instance: what waited behind its held
        keys goes to the next owner unrun (:meth:`KeyHolds.release_partition`), first."""
        waited = self.holds.release_partition(partition)
        for job in waited:
            self._abandon(job, withdrawn=True)
        if waited:  # (ahead of what the drain held back since: they came before)
            held_back = self.moves.held_back.setdefault(partition, deque())  # type: ignore[union-attr]
            held_back.extendleft((job.channel, job.env) for job in reversed(waited))

    def _abandon(self, job: Job, withdrawn: bool = False) -> None:
        """A job whose channel closed before its handler ran: its sender was declared gone (or this
        node re-incarnated), so its ack can never arrive and the sender resends the message to the
        partition's owner. Running it here as well would run it twice: forget it, and its dedup id,
        so that the resend runs wherever it lands (here too). A duplicate waiting on it runs instead.
        ``withdrawn``: it goes to its partition's next owner instead (see :meth:`draining`)."""
        if not withdrawn:
            self.stats.abandoned += 1
        env = job.env
        if job.holds_key:
            job.holds_key = False
            self.holds.next(env.key)
        self.stats.untrack(job.env.partition)
        if self.in_progress.get(env.msg_id) is job:
            del self.in_progress[env.msg_id]
            window = self.dedup.get(env.type)
            if window is not None:
                window.remove(env.msg_id)
            now = self.host.clock()
            for dup in job.duplicates:
                self.stats.untrack(dup.env.partition)  # (delivered again, it counts anew: else twice, never drained)
                if dup.channel is not None and not dup.channel.closed:
                    self.deliver(dup.channel, dup.env, now)

    def _duplicate(self, job: Job) -> None:
        if self.held_results.pending:
            self.held_results.keep_now()
        self.stats.duplicates += 1
        job.started = self.host.clock()
        self.tracer.finished(job, "duplicate", None)  # a retry shows in its trace, not run
        original = self.in_progress.get(job.env.msg_id)
        if original is not None:
            original.duplicates.append(job)
            self.data.keep_ran(job, original)
            return
        cached = self.results.get(job.env.msg_id)
        if cached is not None and job.env.kind != KIND_EVENT:
            job.reply = cached[2]
        elif job.env.kind != KIND_EVENT:
            job.reply = error_reply("ResultExpired", f"{job.env.type} was already handled, and its result is no longer "
                                    "remembered (older than the type's dedup window, or the handling instance crashed)")
        if not self.data.wait_for_owed(job, partial(self._effects_safe, job)):
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
        host = self.host
        now = host.clock()
        host.awake(now)  # (frozen past dead_after: it rejoined, and this job's channel is closed now)
        if job.channel is not None and job.channel.closed:
            self._abandon(job)
            return
        if job.message is None:
            try:
                job.message = decode(handler.message, job.env.payload)
            except ValidationError as exc:  # an older or foreign sender: counted, and kept as a dead letter
                host.count_refused("invalid_payload", f"{exc} (from {_sender(job)})")
                self.stats.in_handler += 1
                job.started = now
                self._failed(job, exc)
                return
        ctx = HandlerContext(host, job.env, handler, job.attempt, self.data)
        self.stats.in_handler += 1
        job.started = now
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
            limit = self._reply_limit(job.channel)
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
            self.data.apply(job.env, writes, job, reply)
            if outputs and job.writes is not None:
                job.outputs = outputs  # while its writes wait to ship: an ungated delta carries them
        if job.pending and self.journal is None and job.replay_of is None:
            self.data.ran(job, outputs)  # it waits for acks: its partition may move before they come
            self.host.kept_ran(job.kept or ())  # (acknowledged before it ran: its sender hears it ran now)
        self.tracer.finished(job, "ok", None)
        self._finish_handler(job, reply=reply, dead=False)
        if job.writes is not None:
            self.data.ship_ready(job.env.key)

    def _reply_limit(self, channel: InChannel | None) -> int:
        """The largest result that may travel to the caller on ``channel``: its limit and ours."""
        limit = self.config.max_message_bytes
        return min(limit, channel.peer.max_message_bytes) if channel is not None else limit

    def _failed(self, job: Job, exc: BaseException) -> None:
        self.stats.in_handler -= 1
        self.stats.failed_attempts += 1
        handler = job.handler
        assert handler is not None
        job.attempt += 1
        job.error = f"{type(exc).__name__}: {exc}"
        self.tracer.finished(job, "error", job.error)
        if job.attempt <= handler.retry.retries and not isinstance(exc, NOT_RETRIED):
            env = job.env  # (one of a held key's flow runs again without it, see _admit)
            if not job.holds_key and not env.flags & FLAG_UNKEYED and not self.holds.passes(env.key, env.trace_id):
                if self.keyed.admit(env.key, job):
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
            self.holds.next(job.env.key)
        if job.pending == 0:
            self._effects_safe(job)

    def output_done(self, job: Job) -> None:
        job.pending -= 1
        if job.pending == 0:
            self._effects_safe(job)
        elif job.pending == 1:
            if job.writes is not None:
                self.data.ship_ready(job.env.key)
            elif job.mark_owed:
                self.data.ship_mark(job)

    def _effects_safe(self, job: Job) -> None:
        """Everything the handler emitted is acknowledged: answer the caller, then ack the input."""
        reply = job.reply
        if reply is not None and job.env.kind in (KIND_COMMAND, KIND_QUERY):
            job.reply = None
            if self.in_progress.get(job.env.msg_id) is job:
                self.data.remember(job, reply)
            if job.channel is not None:
                self.host.send_reply(job.channel, job.env, reply)  # ahead of the ack that completes the command
        self._complete(job)

    def hand_on(self, job: Job) -> None:
        """``job`` went with its partition to a new owner, which answers for its outputs from now
        on (:meth:`PartitionData.ran <choreo.runtime.partdata.PartitionData.ran>`): its input is
        acknowledged, a command answered, without waiting for them (a producer's hold on the
        partition waits for that ack, and the outputs' acks may wait for that producer)."""
        reply, channel = job.reply, job.channel
        if channel is None:
            return
        stand_in = Job(job.env, channel, None, job.received)  # (completes the input, not the job)
        stand_in.reply, job.channel, job.reply = reply, None, None
        self._effects_safe(stand_in)
        for dup in job.duplicates:
            dup.reply = reply
            self._effects_safe(dup)
        job.duplicates = []

    def _complete(self, job: Job) -> None:
        env = job.env
        if self.data.settling:
            self.data.settled(job)
        for sender, seq in job.kept or ():  # acknowledged before now (relief.py, handed_on): the copies may go
            self.host.release(sender, seq, env.msg_id)
        job.kept = None
        if job.channel is not None:
            job.channel.reorder.complete(env.seq)
            self.host.ack_later(job.channel)
        if job.handler is not None:
            if job.replay_of is None:
                self.stats.untrack(job.env.partition)
            self.stats.processed += 1
            if self.tracer.completed is not None:  # metrics watch: a flow from outside ends here
                self.tracer.flow_done(job)
            if job.replay_of is not None and self.journal is not None:
                if self.dead_letters.get(job.replay_of.id) is None:  # replayed and handled: gone
                    self.journal.letter_gone(job.replay_of.id)
                    # ... once the next commit is safe: only then is the replay "handled" to its
                    # operator (a SIGKILL before it would bring the letter back); those safe already go
                    safe, committing = self.journal.safe, self.replays_committing
                    for done in [k for k, generation in committing.items() if generation <= safe]:
                        del committing[done]
                    committing[job.replay_of.id] = self.journal.written + 1
            if self.in_progress.get(env.msg_id) is job:
                if self.journal is not None and not job.logged:
                    self.journal.handled(env)  # its id commits before its ack leaves
                del self.in_progress[env.msg_id]
                if self.held_results.pending:
                    self.held_results.keep_now()
                cached = self.results.get(env.msg_id)
                for dup in job.duplicates:
                    if cached is not None:
                        dup.reply = cached[2]
                    self._effects_safe(dup)  # (one acknowledged before: its copy goes)

    # -- dead letters --------------------------------------------------------------------------

    def _dead_letter(self, job: Job, exc: BaseException) -> None:
        handler = job.handler
        assert handler is not None
        env = job.env
        letter = self.dead_letters.failed(env, handler, exc, job.attempt, self.host.wall(), job.replay_of)
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
        env = ReplayEnvelope(letter, _KIND_FOR[handler.kind])
        job = Job(env, None, handler, self.host.clock())  # a later attempt, on the spans' clock
        job.replay_of = letter
        self._admit(job)
        self.pump()
        self.host.schedule_flush()
        return letter

    @property
    def idle(self) -> bool:
        return not self.in_progress and not self.ready and self.stats.in_handler == 0 and self.keyed.busy_keys == 0
