"""What a handler sees of the node, and a received message on its way through one.

How this works. The dispatcher (:mod:`~choreo.runtime.dispatch`) turns each envelope it cannot
leave to the compiled lane into a :class:`Job`, and runs its handler with a
:class:`HandlerContext` that *buffers* what the handler emits and sends (a failed attempt leaks
nothing) and whose ``state`` is the message's key's handler state (:mod:`~choreo.runtime.state`),
or :class:`NoState` for a service that declares none. What both need of their node is the small
:class:`Host` protocol; what ``ctx.state`` needs of the partitions' data is :class:`Keeper`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..config import NodeConfig
from ..errors import ChoreoUsageError, NoOwner, UndeclaredMessage
from ..messages import Message, message_options
from ..service import Handler
from ..tracing import format_traceparent
from .channels import InChannel
from .deadletters import DeadLetter
from .journal import Journal
from .replicas import Replicas
from .state import StateTables, state_view

__all__ = ["Host", "Keeper", "Job", "HandlerContext", "NoState"]


class Host(Protocol):
    """What the dispatcher needs of the node it runs in."""

    name: str  # the instance, as handlers see it (ctx.instance)
    batch_received: float  # when the batch being delivered arrived (the node's clock: the spans' clock)
    clock: Callable[[], float]
    wall: Callable[[], float]

    def awake(self, now: float) -> bool: ...  # False: it was frozen and rejoined; what it held is void

    @property
    def awake_until(self) -> float: ...  # no handler starts from this reading of the clock without awake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def count_refused(self, reason: str, detail: str) -> None: ...

    def ack_later(self, channel: InChannel) -> None: ...

    def keep(self, channel: InChannel, seq: int, ran: bool = False) -> None: ...

    def kept_ran(self, kept: Iterable[tuple[InChannel, int]]) -> None: ...

    def release(self, channel: InChannel, seq: int, msg_id: bytes) -> None: ...

    def schedule_flush(self) -> None: ...

    def send_outputs(self, job: Job, outputs: list[Message], on_done: Callable[[], None]) -> int: ...

    def send_reply(self, channel: InChannel, env: Any, reply: bytes) -> bool: ...

    def has_owner(self, type_name: str) -> bool: ...

    def receiver_missing(self, type_name: str) -> bool: ...  # a service declared to take it has no live instance

    async def ask(self, query: Message, *, timeout: float | None, trace_id: bytes, cause_id: bytes) -> Any: ...


class Keeper(Protocol):
    """What ``ctx.state`` needs of the partitions' data (:class:`~choreo.runtime.partdata.PartitionData`)."""

    state: StateTables | None
    config: NodeConfig
    replicas: Replicas | None
    journal: Journal | None

    def log_writes(self, p: int, key: bytes, writes: dict[int, bytes | None]) -> None: ...


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
        "mark_owed",
        "outputs",
        "logged",
        "kept",
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
        self.mark_owed = False  # its writes reached the standby ahead of its id (PartitionData.ungate)
        self.logged = False  # a durable node: its id (and result) went to the journal with its writes
        self.outputs: list[Message] | None = None  # what it emitted and sent, while its writes wait to ship
        # acknowledged before its outputs were (handed over running, or relieving a stalled
        # channel): who keeps a copy of it until they are, as (channel, seq)
        self.kept: list[tuple[InChannel, int]] | None = None


class HandlerContext:
    """What a running handler may do besides returning: see :class:`choreo.Context`.

    A plain-function handler may get the same context object for several messages of a batch:
    it is valid during the call it was passed to. ``envelope`` and ``handler`` are what is being
    handled and by whom (the core's compiled lane sets both before each call, and clears
    ``writes``, the handler's buffered state writes).
    """

    # (the core reads and writes envelope, handler, writes, outputs and state in their slots, per
    # message, where it finds all five as plain slots: see slot_offset in cext/lanes.pxi)
    __slots__ = ("_host", "envelope", "handler", "_attempt", "outputs", "writes", "_keeper", "state")

    def __init__(
        self, host: Host, envelope: Any, handler: Handler, attempt: int = 0, keeper: Keeper | None = None
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
