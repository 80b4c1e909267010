"""The application's verbs: ``try_emit``, ``emit``, ``send``, ``ask``, and what a handler produced.

How this works. Nothing is routed before the node has joined the mesh: a verb called earlier
waits for it (``try_emit`` raises at once), then raises :class:`~choreo.NotJoined` naming the
seeds that did not answer. Every verb plans its message with the
:class:`~choreo.runtime.routing.Router` (one envelope per destination; the message's fields
are checked against their declared types first), then asks what blocks the plan: a channel
without credit, a held partition whose queue is as long as a window, or a declared service
with no live instance whose waiting room (a window's worth) is full. ``try_emit`` raises
:class:`~choreo.Backpressure` at once; ``emit``/``send``/``ask`` wait (re-planning whenever
membership changes) until nothing blocks it or their timeout passes, then raise the same error
with the numbers. A plan is committed whole: every destination gets its copy, or none does.
``emit(..., confirm=True)`` also waits until every copy is acknowledged by its service.

``send`` and ``ask`` wait for the answer, which comes back in a REPLY frame ahead of the ack
that completes the command (:meth:`Calls.on_reply`). A command acknowledged without its answer
(the answer's frame was lost) is sent again under the same id; dedup answers it from the
cached result. What a handler emits and sends goes out through :meth:`Calls.send_outputs`
with ids derived from its input, so a retried handler emits the same ids.

On a durable node the application's ``try_emit``, ``emit`` and ``emit_many`` are
:class:`DurableCalls`': the same verbs, returning once the store has committed what they emitted
(a full disk is backpressure).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from typing import Any, Protocol

import msgspec

from .. import core, wire
from ..config import NodeConfig
from ..errors import (
    Backpressure,
    ChoreoError,
    ChoreoUsageError,
    DeliveryTimeout,
    HandlerFailed,
    MessageTooLarge,
    NoOwner,
    NotAllowed,
    NotJoined,
    ProtocolError,
    UndeclaredMessage,
    Undeliverable,
    ValidationError,
)
from ..messages import Message, idempotency_id, message_options, result_decoder_for
from ..service import Service
from ..tracing import parse_traceparent
from .channels import OutChannel
from .holds import Holds
from .journal import Journal
from .lifecycle import Lifecycle
from .membership import Membership, Peer
from .outbox import Outbox
from .routing import ZERO_ID, PlannedCopy, Router
from .stats import Counters

__all__ = ["Calls", "DurableCalls", "OutputsOf", "decode_reply", "ok_reply", "error_reply", "REFUSALS"]

_reply_encoder = msgspec.msgpack.Encoder()
_ROUTING = ("joined", "leaving")  # the lifecycle states in which a node routes (see Calls.routing)

#: errors that no retry can fix, by name: a handler that raises one is dead-lettered at once, and
#: a caller whose command or query was refused that way gets the same class back
REFUSALS: dict[str, type[ChoreoError]] = {
    cls.__name__: cls
    for cls in (ValidationError, UndeclaredMessage, MessageTooLarge, NoOwner, Undeliverable, NotAllowed)
}


class OutputsOf(Protocol):
    """What :meth:`Calls.send_outputs` reads of a finished handler's job."""

    env: Any  # the input envelope (msg_id, trace_id)
    handler: Any  # the Handler that ran (its name seeds the output ids)


def _wrong_kind(message: Message, verb: str) -> ChoreoUsageError:
    """The error for a message ``verb`` (send or ask) does not take (a clear one for a non-message)."""
    options = message_options(type(message))  # (raises for anything not a message type)
    what = f"{options.name} is {'an' if options.kind == 'event' else 'a'} {options.kind}"
    if verb == "send":
        return ChoreoUsageError(f"send takes a command and {what}: use emit() for events and ask() for queries")
    return ChoreoUsageError(f"ask takes a query and {what}: use send() for commands and emit() for events")


class _Call:
    """A command or query waiting for its reply (until ``deadline`` on the node's clock)."""

    __slots__ = ("future", "cls", "service", "deadline", "timeout")

    def __init__(
        self, future: asyncio.Future[Any], cls: type[Message], service: str, deadline: float, timeout: float
    ) -> None:
        self.future = future
        self.cls = cls
        self.service = service
        self.deadline = deadline
        self.timeout = timeout


class Calls:
    """The verbs of one node (see the module docstring)."""

    def __init__(
        self,
        router: Router,
        outbox: Outbox,
        holds: Holds,
        membership: Membership,
        *,
        lifecycle: Lifecycle,
        service: Service | None,
        config: NodeConfig,
        clock: Callable[[], float],
        call_later: Callable[[float, Callable[[], None]], None],
        counters: Counters,
        join_status: Callable[[], str] = lambda: "",
    ) -> None:
        self.router = router
        self.outbox = outbox
        self.holds = holds
        self.membership = membership
        self.life = lifecycle
        self.service = service
        self.config = config
        self.clock = clock
        self.call_later = call_later
        self.counters = counters
        self.join_status = join_status  # why this node has not joined yet (which seeds are silent)
        self.pending: dict[bytes, list[_Call]] = {}  # message id -> callers waiting for its answer
        # (deadline, message id) of every request, oldest deadline first: checked at each tick by
        # expire(), and left behind when answered (atoms only: the cycle collector never visits them)
        self._deadlines: list[tuple[float, bytes]] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the node's loop, once it started
        self._service_waiters: dict[str, list[Callable[[], None]]] = {}
        self._join_waiters: list[Callable[[], None]] = []

    # -- joining ---------------------------------------------------------------------------------

    @property
    def routing(self) -> bool:
        """Whether this node routes: it has joined the mesh (and may be leaving it)."""
        return self.life.state in _ROUTING

    async def _await_joined(self, deadline: float) -> None:
        """Wait until this node has joined; NotJoined (naming the silent seeds) at ``deadline``."""
        start = self.clock()
        loop = asyncio.get_running_loop()
        while not self.routing:
            if self.life.fatal is not None:
                raise self.life.fatal
            if self.clock() >= deadline:
                raise self._not_joined(self.clock() - start)
            fut: asyncio.Future[None] = loop.create_future()
            wake = partial(_wake, fut)
            self._join_waiters.append(wake)
            self.call_later(max(deadline - self.clock(), 0.0), wake)
            await fut

    def _not_joined(self, waited: float) -> NotJoined:
        status = self.join_status()
        return NotJoined(
            f"this node has not joined the mesh after {waited:.1f} s ({self.life.state}), so it routes nothing yet"
            + (f": {status}" if status else "")
        )

    def on_joined(self) -> None:
        """The node has joined: wake every caller waiting for it."""
        waiters, self._join_waiters = self._join_waiters, []
        for wake in waiters:
            wake()

    # -- events ----------------------------------------------------------------------------------

    def try_emit(self, event: Message, *, traceparent: str | None = None) -> bytes:
        """Publish an event now or raise :class:`Backpressure` at once; returns its message id."""
        if traceparent is None and self.routing:
            msg_id = self.router.emit_now(event)
            if msg_id is not None:
                return msg_id
        self._check_origin(event, "emit")
        if message_options(type(event)).kind != "event":
            raise ChoreoUsageError("emit takes an event; use send() for commands and ask() for queries")
        if not self.routing:
            raise self._not_joined(0.0)
        msg_id, trace_id = self._origin_ids(event, traceparent)
        plan = self.router.plan(event, msg_id, trace_id, ZERO_ID, None)
        blocked = self.blocked(plan)
        if blocked is not None:
            raise self._backpressure(blocked, 0.0)
        self.router.commit(plan)
        self.counters.emitted += 1
        return msg_id

    async def emit(
        self, event: Message, *, timeout: float | None = None, traceparent: str | None = None, confirm: bool = False
    ) -> bytes:
        """Publish an event, waiting up to ``timeout`` for credit; returns its message id.

        With ``confirm=True`` it returns only once every consuming service acknowledged it (its
        handler ran, and what that emitted was acknowledged in turn), raising
        :class:`~choreo.Undeliverable` if no declared service consumes the type and
        :class:`~choreo.DeliveryTimeout` if the acknowledgements take longer than ``timeout``.
        """
        if traceparent is None and not confirm and self.routing:
            msg_id = self.router.emit_now(event)
            if msg_id is not None:
                return msg_id
        self._check_origin(event, "emit")
        options = message_options(type(event))
        if options.kind != "event":
            raise ChoreoUsageError("emit takes an event; use send() for commands and ask() for queries")
        timeout = self.config.emit_timeout if timeout is None else timeout
        deadline = self.clock() + timeout
        if not self.routing:
            await self._await_joined(deadline)
        msg_id, trace_id = self._origin_ids(event, traceparent)
        acked: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if confirm else None
        copies = [0]

        def done() -> None:
            copies[0] -= 1
            if copies[0] == 0 and acked is not None and not acked.done():
                acked.set_result(None)

        def replan() -> list[PlannedCopy]:
            plan = self.router.plan(event, msg_id, trace_id, ZERO_ID, done if confirm else None)
            copies[0] = len(plan)
            return plan

        plan = replan()
        if confirm and not plan:
            raise Undeliverable(f"no service in the mesh declares that it consumes {options.name}: nobody would get it")
        if self.blocked(plan) is not None:
            plan = await self._await_credit(plan, max(deadline - self.clock(), 0.0), replan)
        self.router.commit(plan)
        self.counters.emitted += 1
        if acked is not None:
            self.outbox.flush()
            try:
                await asyncio.wait_for(asyncio.shield(acked), max(deadline - self.clock(), 0.0))
            except asyncio.TimeoutError:
                raise DeliveryTimeout(
                    f"event {options.name} not acknowledged by every consumer within {timeout:.1f} s "
                    f"({copies[0]} of its copies still on their way: they are not withdrawn)"
                ) from None
        return msg_id

    async def emit_many(self, events: Iterable[Message], *, timeout: float | None = None) -> list[bytes]:
        """Publish events in order, in one crossing into the core per run of one type; returns their ids.

        The rules: every event is checked before any goes (an event this node may emit, fields
        that match their types); then each goes as ``emit`` would send it (its type's
        subscribers, its key's partition; its id is its idempotency id when the type declares
        one). When credit runs out part-way, what went stays on its way and the rest waits for
        credit, in order, up to ``timeout`` in all; then :class:`~choreo.Backpressure` is raised
        with ``emitted``, the ids of the events that went.
        """
        batch = events if isinstance(events, list) else list(events)
        ids: list[bytes] = []
        if not batch:
            return ids
        types = set(map(type, batch))
        for cls in types:
            self.router.check_emittable(cls)
        if len(types) > 1 or not self.router.has_lane(batch[0]):
            for event in batch:  # several runs (or no lane): checked whole here, before any goes
                self.router.check_body(event, self.config.max_message_bytes)
        timeout = self.config.emit_timeout if timeout is None else timeout
        deadline = self.clock() + timeout
        if not self.routing:
            await self._await_joined(deadline)
        n = len(batch)
        i = 0
        while True:
            i = self.router.emit_many_now(batch, i, ids)
            if i >= n:
                return ids
            try:  # events[i] waits for credit (or an instance), as emit() does; then the lanes again
                ids.append(await self.emit(batch[i], timeout=max(deadline - self.clock(), 0.0)))
            except Backpressure as exc:
                exc.emitted = ids
                raise
            i += 1

    # -- commands and queries --------------------------------------------------------------------

    async def request(
        self,
        message: Message,
        *,
        timeout: float | None,
        trace_id: bytes | None = None,
        cause_id: bytes = ZERO_ID,
        traceparent: str | None = None,
        origin_check: bool = True,
    ) -> Any:
        """Send a command or query and await its result (shared by send and ask, which check its kind)."""
        cls = type(message)
        if origin_check:
            service = self.service  # (a declared type needs no further look: Service checked it)
            if service is None or cls not in service.sends:
                self._check_origin(message, "send")
        timeout = self.config.request_timeout if timeout is None else timeout
        start = self.clock()
        if self.life.state not in _ROUTING:  # (self.routing, inline: every request asks)
            await self._await_joined(start + timeout)
        # an idempotent type's id is its intent's; any other's is drawn by the lane that writes it
        # (or here, for the general path)
        msg_id = idempotency_id(message) if cls.__choreo_options__.idempotency is not None else None
        if trace_id is None and traceparent:
            trace_id = parse_traceparent(traceparent)
        loop = self.loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        resends = 0
        sent_on: OutChannel | None = None  # the channel it went on (the instance that will ack it)

        def acked() -> None:
            # processed (acked), and its answer came first on the same connection unless that frame
            # was lost: then ask again; dedup answers the resend from the cached result
            nonlocal resends, sent_on
            if future.done() or resends >= 3:
                return
            resends += 1
            self.counters.resent_requests += 1
            try:
                plan = _to_runner(replan(), sent_on)
                self.router.commit(plan)
                sent_on = plan[0][0] if plan else None
                self.outbox.flush()
            except ChoreoError as exc:
                future.set_exception(exc)

        def replan() -> list[PlannedCopy]:
            return self.router.plan(message, msg_id, trace_id or msg_id, cause_id, acked)

        # the common case in one call into the core: its owner's channel has credit, nothing is held
        fast = None if self.holds.by_key else self.router.request_lane(cls)
        if fast is not None:
            outbox = self.outbox
            scheduled = outbox.flush_scheduled
            outbox.flush_scheduled = True  # a caller waits on the answer: it leaves now, not a turn later
            written = fast.lane.request(message, msg_id, trace_id, cause_id, acked)
            if written is None:
                fast = None  # no credit, or a body the general path explains
                outbox.flush_scheduled = scheduled
            else:
                msg_id = written
                sent_on = fast.channels[fast.lane.last]
        if fast is None and msg_id is None:
            msg_id = self.router.fresh_id()
        plan = replan() if fast is None else []
        owner = fast.service if fast is not None else plan[0][2]
        call = _Call(future, cls, owner, start + timeout, timeout)
        self.pending.setdefault(msg_id, []).append(call)
        try:
            if fast is None:
                if self.blocked(plan) is not None:
                    plan = await self._await_credit(plan, max(start + timeout - self.clock(), 0.0), replan)
                self.outbox.flush_scheduled = True  # (as above)
                self.router.commit(plan)
                sent_on = plan[0][0]
            self.outbox.flush()
            self.counters.sent += 1
            heapq.heappush(self._deadlines, (call.deadline, msg_id))
            return await future
        finally:
            # the two closures refer to each other: without this their cycle (and the future, the
            # message) would wait for the cyclic GC, whose runs every few dozen requests cost the
            # tail latency. An ack still to come finds the future done and stops before replan: it is
            # cancelled here if this request ended another way (credit never came, say)
            if not future.done():
                future.cancel()
            acked = replan = None  # type: ignore[assignment]
            calls = self.pending.get(msg_id)
            if calls is not None:
                if call in calls:
                    calls.remove(call)
                if not calls:
                    del self.pending[msg_id]

    def send(
        self, command: Message, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Send a command to its owner: await it for the handler's result once it is processed.

        (Not a coroutine itself: the request is the one the caller awaits, one frame fewer to
        resume when the answer comes; a message of another kind is refused here, at the call.)"""
        options = getattr(type(command), "__choreo_options__", None)  # (message_options, inline)
        if options is None or options.kind != "command":
            raise _wrong_kind(command, "send")
        return self.request(command, timeout=timeout, traceparent=traceparent)

    def ask(
        self,
        query: Message,
        *,
        timeout: float | None = None,
        trace_id: bytes | None = None,
        cause_id: bytes = ZERO_ID,
        traceparent: str | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Ask a query: await it for its answer (refused at the call if it is not a query, as :meth:`send`)."""
        options = getattr(type(query), "__choreo_options__", None)
        if options is None or options.kind != "query":
            raise _wrong_kind(query, "ask")
        return self.request(
            query,
            timeout=timeout,
            trace_id=trace_id,
            cause_id=cause_id,
            traceparent=traceparent,
            origin_check=cause_id == ZERO_ID,
        )

    def next_deadline(self) -> float:
        """The earliest deadline of a request still waiting for its answer (inf: none).

        Answered requests leave their entries behind (see ``_deadlines``): those at the top go
        here, or a node answering requests for longer than their timeout would find one due at
        every tick. (An entry of an id sent again is kept: it only makes a tick early.)"""
        deadlines, pending = self._deadlines, self.pending
        while deadlines and deadlines[0][1] not in pending:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else math.inf

    def expire(self, now: float) -> None:
        """Fail every request whose answer did not come before its deadline (called at each tick)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, msg_id = heapq.heappop(deadlines)
            for call in self.pending.get(msg_id, ()):
                if call.deadline <= now and not call.future.done():
                    options = message_options(call.cls)
                    call.future.set_exception(DeliveryTimeout(
                        f"{options.kind} {options.name} to {call.service}: no answer within {call.timeout:.1f} s"
                    ))

    def on_reply(self, msg_id: bytes, type_name: str, payload: bytes, peer: Peer | None = None) -> bool:
        """An answer arrived (from ``peer``): resolve every caller waiting on that message id;
        True if it woke one (its task is scheduled to run).

        Only an instance of the service the request went to answers it: an answer from any other
        member (it may have computed the id of an idempotent command) is refused, and the callers
        go on waiting for the real one."""
        calls = self.pending.get(msg_id)
        if not calls:
            return False
        if peer is not None and peer.service_name != calls[0].service:
            raise ProtocolError("not_allowed", f"an answer to {type_name} from {peer.node}, which does not serve "
                                               f"{calls[0].service}")
        del self.pending[msg_id]
        if self.outbox.waiting:  # a copy parked while its service seemed gone: it ran, it stays here
            self.outbox.withdraw(msg_id)
        try:
            ok, body = decode_reply(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            error = ProtocolError("malformed", f"answer to {type_name}: {exc}")
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
            raise error from None
        woke = False
        for call in calls:
            if call.future.done():
                continue
            woke = True
            if ok:
                try:
                    result = result_decoder_for(call.cls).decode(body)  # type: ignore[arg-type]
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    call.future.set_exception(ValidationError(f"result of {type_name}: {exc}"))
                else:
                    call.future.set_result(result)
            else:
                etype, message = body  # type: ignore[misc]
                refusal = REFUSALS.get(etype)
                if refusal is not None:  # no retry could fix it: the same class as a local refusal
                    call.future.set_exception(refusal(f"{call.service} refused {type_name}: {message}"))
                else:
                    call.future.set_exception(HandlerFailed(type_name, call.service, etype, message))
        return woke

    # -- what a handler produced -----------------------------------------------------------------

    def send_outputs(self, job: OutputsOf, outputs: list[Message], on_done: Callable[[], None]) -> int:
        """Send what a handler emitted/sent, with ids derived from its input; returns how many
        envelopes must be acknowledged (each calls ``on_done`` when it is) before the input is."""
        env = job.env
        handler_id = job.handler.name.encode()
        now = self.clock()
        append = self.outbox.append
        park = self.outbox.park
        count = 0
        for position, message in enumerate(outputs):
            msg_id = idempotency_id(message) or core.derive_id(env.msg_id, handler_id, position)
            for ch, item, service in self.router.plan(message, msg_id, env.trace_id, env.msg_id, on_done):
                if ch is None:
                    park(service, item, new=True)  # until an instance is back
                else:
                    append(ch, item, now)
                count += 1
        return count

    # -- waiting for room ------------------------------------------------------------------------

    def blocked(self, plan: list[PlannedCopy]) -> OutChannel | str | None:
        """What stops the plan now: a channel without credit, a service without instances, or None."""
        held = self.holds.by_key
        for ch, item, service in plan:
            hold = self.holds.for_item(service, item) if held else None
            if hold is not None:  # (with an owner or without one, it waits behind the hold)
                if len(hold.queue) >= hold.channel.window.max_messages:
                    return hold.channel  # a long hold is backpressure too
            elif ch is None:
                if not self.outbox.has_room(service, item.size):
                    return service  # its waiting room is full: wait for an instance
            elif not ch.can_accept(item.size):
                return ch
        return None

    async def _await_credit(
        self, plan: list[PlannedCopy], timeout: float, replan: Callable[[], list[PlannedCopy]]
    ) -> list[PlannedCopy]:
        """Wait until every destination can take it (all or nothing), re-planning when owners change."""
        blocked = self.blocked(plan)
        if blocked is None:
            return plan
        self.counters.backpressure_waits += 1
        start = self.clock()
        deadline = start + timeout
        loop = asyncio.get_running_loop()
        version = self.membership.version
        while True:
            if self.life.fatal is not None:  # refused, or stopped while it waited
                raise self.life.fatal
            if self.membership.version != version or (not isinstance(blocked, str) and blocked.closed):
                version = self.membership.version  # owners changed while we waited: plan again
                plan = replan()
            blocked = self.blocked(plan)
            if blocked is None:
                return plan
            if self.clock() >= deadline:
                raise self._backpressure(blocked, self.clock() - start)
            fut: asyncio.Future[None] = loop.create_future()
            wake = partial(_wake, fut)
            if isinstance(blocked, str):
                self._service_waiters.setdefault(blocked, []).append(wake)
            elif plan and plan[0][1].kind != wire.KIND_EVENT:  # a command or query: first when credit frees
                blocked.urgent_waiters.append(wake)
            else:
                blocked.credit_waiters.append(wake)
            self.call_later(max(deadline - self.clock(), 0.0), wake)
            await fut

    def abandon(self, error: Exception) -> None:
        """The node stopped: every caller waiting here gets ``error`` now (``life.fatal``, which
        the woken waits for a join or for credit raise when they look again)."""
        pending, self.pending = self.pending, {}
        self._deadlines.clear()
        for calls in pending.values():
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
        waiters, self._join_waiters = self._join_waiters, []
        for service_waiters in self._service_waiters.values():
            waiters.extend(service_waiters)
        self._service_waiters = {}
        for wake in waiters:
            wake()
        for ch in self.outbox.out.values():
            ch.wake_waiters()

    def wake_services(self) -> None:
        """Membership changed: wake the callers waiting for a service that now has instances."""
        if self._service_waiters:
            for service in [s for s in self._service_waiters if self.membership.instances(s)]:
                for wake in self._service_waiters.pop(service):
                    wake()

    def _backpressure(self, blocked: OutChannel | str, waited: float) -> Backpressure:
        self.counters.backpressure_errors += 1
        if isinstance(blocked, str):
            return Backpressure.unavailable(blocked, waited, len(self.outbox.waiting.get(blocked, ())))
        w = blocked.window
        return Backpressure(blocked.peer.node, w.in_flight + len(blocked.backlog), w.max_messages, waited, w.in_flight_bytes)

    # -- checks ----------------------------------------------------------------------------------

    def _check_origin(self, message: Message, verb: str) -> None:
        if not isinstance(message, Message):
            raise TypeError(f"{verb} takes a choreo message (Event, Command or Query), got {type(message).__name__}")
        if self.service is None:
            return
        declared = self.service.emits if verb == "emit" else self.service.sends
        if type(message) not in declared:
            name = message_options(type(message)).name
            raise UndeclaredMessage(
                f"service {self.service.name} {verb}s {name} outside a handler without declaring it: "
                f"add it to Service({self.service.name!r}, {verb}s=[...])"
            )

    def _origin_ids(self, message: Message, traceparent: str | None) -> tuple[bytes, bytes]:
        """A new flow starts here: its trace id is the first message's id, unless the caller has one."""
        msg_id = idempotency_id(message) or self.router.fresh_id()
        trace_id = parse_traceparent(traceparent) if traceparent else msg_id
        return msg_id, trace_id


class DurableCalls:
    """The emitting verbs of a durable node: :class:`Calls`' own, then a wait for the store's commit."""

    def __init__(self, calls: Calls, journal: Journal, *, config: NodeConfig, clock: Callable[[], float]) -> None:
        self.calls = calls
        self.journal = journal
        self.config = config
        self.clock = clock

    def try_emit(self, event: Message, *, traceparent: str | None = None) -> bytes:
        """try_emit on a durable node: a full disk raises StoreFull (a Backpressure) at once."""
        self.journal.check()
        return self.calls.try_emit(event, traceparent=traceparent)

    async def emit(
        self, event: Message, *, timeout: float | None = None, traceparent: str | None = None, confirm: bool = False
    ) -> bytes:
        """emit on a durable node: returns once the event is committed to the store."""
        timeout = self.config.emit_timeout if timeout is None else timeout
        deadline = self.clock() + timeout
        if self.journal.failing is not None:  # a full disk is backpressure: wait for a commit, or raise
            await self.journal.durable(timeout)
        msg_id = await self.calls.emit(event, timeout=max(deadline - self.clock(), 0.0), traceparent=traceparent,
                                       confirm=confirm)
        # (its commit is the next flush's: even after a long wait for credit, a little time for it)
        await self.journal.durable(max(deadline - self.clock(), 10 * self.config.tick))
        return msg_id

    async def emit_many(self, events: Iterable[Message], *, timeout: float | None = None) -> list[bytes]:
        """emit_many on a durable node: returns once every event is committed to the store (one commit)."""
        timeout = self.config.emit_timeout if timeout is None else timeout
        deadline = self.clock() + timeout
        if self.journal.failing is not None:
            await self.journal.durable(timeout)
        ids = await self.calls.emit_many(events, timeout=max(deadline - self.clock(), 0.0))
        await self.journal.durable(max(deadline - self.clock(), 10 * self.config.tick))
        return ids


def _to_runner(plan: list[PlannedCopy], sent_on: OutChannel | None) -> list[PlannedCopy]:
    """A request sent again because its ack came without its answer: to the partition's owner
    now, whose dedup answers it (its last owner handed it the cached result); but when its service
    has no routable instance, to the instance that ran it, if that one still lives (the last
    instance, leaving: the result is cached there and nowhere else, and a newcomer would run the
    request again)."""
    if plan and plan[0][0] is None and sent_on is not None and not sent_on.closed and sent_on.peer.live:
        return [(sent_on, plan[0][1], plan[0][2])]
    return plan


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def ok_reply(body: bytes) -> bytes:
    """The encoded answer of a handler that returned ``body`` (MessagePack)."""
    return b"\x01" + body


def error_reply(error_type: str, message: str) -> bytes:
    """The encoded answer of a handler that failed (or of a message refused)."""
    return b"\x00" + _reply_encoder.encode([error_type, message])


def decode_reply(payload: bytes) -> tuple[bool, bytes | tuple[str, str]]:
    """``(True, result body)`` or ``(False, (error type, message))``; msgspec errors if malformed.

    >>> decode_reply(error_reply("KeyError", "no such order"))
    (False, ('KeyError', 'no such order'))
    """
    if not payload:
        return False, ("ProtocolError", "empty reply")
    if payload[0] == 1:
        return True, payload[1:]
    etype, message = msgspec.msgpack.decode(payload[1:], type=tuple[str, str])
    return False, (etype, message)
