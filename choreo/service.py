"""Services and their handler declarations: the source of truth for routing and for the graph.

A :class:`Service` collects handlers with decorators. Each handler names the one message type
it handles and everything it may emit or send; the runtime routes from these declarations and
refuses anything undeclared, and the analyzer draws the flow from the very same objects::

    orders = Service("orders")

    @orders.command(PlaceOrder, emits=[OrderPlaced])
    def place(cmd: PlaceOrder, ctx: Context) -> OrderAccepted:
        ctx.emit(OrderPlaced(order_id=cmd.cart_id, total_cents=100))
        return OrderAccepted(order_id=cmd.cart_id)

    @orders.on(PaymentFailed, key="order_id", sends=[CancelOrder])
    async def payment_failed(event: PaymentFailed, ctx: Context) -> None:
        ctx.send(CancelOrder(order_id=event.order_id))

    @orders.query(GetOrder)
    def get_order(query: GetOrder) -> OrderView: ...

A handler takes the message, and optionally a :class:`Context` as second argument; it may be a
plain function or ``async def``. Event handlers are *competing* by default (one instance of the
service handles each event, chosen by the key's partition) or ``broadcast=True`` (every
instance handles it).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .errors import ChoreoUsageError
from .messages import Command, Event, Kind, Message, Query, message_options
from .spec import HandlerSpec, ServiceSpec, message_spec
from .statetypes import StateTypes, state_type_name

__all__ = ["Service", "Handler", "Context", "State", "RetryPolicy"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
MessageType = type[Message]
DEFAULT_PARTITIONS = 64


class State(Protocol):
    """``ctx.state``: the values of declared state types for the message's key.

    Writes are applied together with the handler's emits, sends and dedup mark, only if the
    handler returns without raising; they move with the key's partition::

        @inventory.on(StockAdded, key="sku")
        def add(event: StockAdded, ctx: Context) -> None:
            stock = ctx.state.get(Stock) or Stock(available=0)
            ctx.state.put(Stock(available=stock.available + event.qty))
    """

    def get(self, cls: type[T], default: T | None = None) -> T | None:
        """This key's value of type ``cls`` (or ``default``), including this handler's own writes."""

    def put(self, value: Any) -> None:
        """Set this key's value of ``type(value)``."""

    def delete(self, cls: type) -> None:
        """Remove this key's value of type ``cls``."""

    def items(self, cls: type[T], prefix: str | bytes = "") -> list[tuple[str, T]]:
        """``(key, value)`` for this partition's keys that start with ``prefix``, in key order."""


class Context(Protocol):
    """What a handler may do besides returning a result (given as its second argument).

    Emits and sends are *buffered*: they leave the node only once the handler returned
    without raising, so a failed attempt that is retried never leaks half its effects.
    """

    message_id: bytes
    trace_id: bytes
    traceparent: str  # W3C traceparent of this handling of the message (for outgoing HTTP calls)
    attempt: int
    service: str
    instance: str
    state: State  # the message key's state (keyed handlers of a service that declares state=)

    def emit(self, event: Event) -> None:
        """Publish an event declared in the handler's ``emits=``."""

    def send(self, command: Command) -> None:
        """Send a command declared in the handler's ``sends=``."""

    def ask(self, query: Query, timeout: float | None = None) -> Awaitable[Any]:
        """Ask a query declared in ``sends=`` and await its result (queries have no side effects)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing handler is retried before its message goes to the dead-letter store.

    ``retries`` further attempts after the first, waiting ``backoff * 2**n`` seconds (at most
    ``backoff_max``) before attempt ``n + 2``.
    """

    retries: int = 3
    backoff: float = 0.05
    backoff_max: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ChoreoUsageError(f"retries must be >= 0, got {self.retries}")
        if self.backoff < 0 or self.backoff_max < self.backoff:
            raise ChoreoUsageError(
                f"need 0 <= backoff <= backoff_max, got backoff={self.backoff}, backoff_max={self.backoff_max}"
            )

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures."""
        return float(min(self.backoff * (2 ** max(failed_attempts - 1, 0)), self.backoff_max))


@dataclass(frozen=True)
class Handler:
    """One declared handler (built by the :class:`Service` decorators, read by runtime and analyzer)."""

    service: str
    name: str
    kind: Kind
    message: MessageType
    fn: Callable[..., Any]
    key: str | None
    broadcast: bool
    emits: tuple[MessageType, ...]
    sends: tuple[MessageType, ...]
    retry: RetryPolicy
    is_async: bool
    takes_context: bool
    module: str
    line: int
    batch: bool = False  # the function takes a list of messages (see Service.on)

    @property
    def message_name(self) -> str:
        return message_options(self.message).name

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line}"


@dataclass
class Service:
    """A named service: the handlers one kind of process runs, and what it originates.

    ``emits``/``sends`` here declare what the service produces *outside* handlers (from a
    timer, an HTTP endpoint, a client): those types enter the flow at this service.
    ``partitions`` is the number of key partitions spread over the service's instances.
    ``state`` lists the msgspec Struct types its keyed handlers keep per key (``ctx.state``);
    ``replicas=1`` keeps a standby copy of each partition's state on another instance, so that
    a crashed instance loses none of it.

    >>> svc = Service("billing")
    >>> svc.name
    'billing'
    """

    name: str
    emits: Iterable[MessageType] = ()
    sends: Iterable[MessageType] = ()
    partitions: int = DEFAULT_PARTITIONS
    doc: str = ""
    state: Iterable[type] = ()
    replicas: int = 0
    handlers: dict[str, Handler] = field(default_factory=dict, init=False, repr=False)
    background: list[Callable[..., Awaitable[None]]] = field(default_factory=list, init=False, repr=False)
    module: str = field(default="", init=False)
    line: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name.encode()) > 100:
            raise ChoreoUsageError(f"service name must be a non-empty string of at most 100 bytes, got {self.name!r}")
        if any(c in self.name for c in "#/ \t\n"):
            raise ChoreoUsageError(f"service name {self.name!r} may not contain '#', '/' or white space")
        if not 1 <= self.partitions <= 65535:
            raise ChoreoUsageError(f"partitions must be between 1 and 65535, got {self.partitions}")
        self.emits = tuple(_check_types(self.emits, "event", f"service {self.name} emits"))
        self.state = tuple([self.state] if isinstance(self.state, type) else self.state)
        StateTypes(self.state)  # raises on a type that is not a Struct, or two with one name
        if self.replicas not in (0, 1):
            raise ChoreoUsageError(f"replicas must be 0 or 1, got {self.replicas!r}")
        if self.replicas and not self.state:
            raise ChoreoUsageError(f"service {self.name}: replicas=1 copies state, and it declares none (state=[...])")
        self.sends = tuple(_check_types(self.sends, ("command", "query"), f"service {self.name} sends"))
        caller = sys._getframe(2)
        self.module = caller.f_globals.get("__name__", "")
        self.line = caller.f_lineno

    # ---- decorators -------------------------------------------------------------------------

    def on(
        self,
        event: MessageType,
        *,
        key: str | None = None,
        broadcast: bool = False,
        emits: Iterable[MessageType] = (),
        sends: Iterable[MessageType] = (),
        retries: int = 3,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        batch: bool = False,
    ) -> Callable[[F], F]:
        """Subscribe a handler to an event type.

        ``key`` is the field whose value orders the events (default: the type's ``key``);
        ``broadcast=True`` runs the handler on every instance instead of one.

        ``batch=True``: the handler takes a *list* of events, every run of them that arrived
        together (as Kafka and FastStream batch consumers do), in order, each one deduplicated
        first; each event is acknowledged on its own once the call returns. If the call raises,
        the events of that batch are run again one by one (each as a list of one, with the
        retry policy, then the dead-letter store), so one bad event does not fail its neighbours.
        A batch handler is a plain function of one argument that emits and sends nothing::

            @sink.on(OrderPlaced, batch=True)
            def store(events: list[OrderPlaced]) -> None:
                db.insert_many(e.order_id for e in events)
        """
        if batch and (emits or sends):
            raise ChoreoUsageError(
                f"a batch handler of {message_options(event).name} cannot emit or send: the ids of what it produced "
                "would have no single input to derive from; use a handler per message"
            )
        return self._register(
            "event", event, key, broadcast, emits, sends, RetryPolicy(retries, backoff, backoff_max), batch=batch
        )

    def command(
        self,
        command: MessageType,
        *,
        key: str | None = None,
        emits: Iterable[MessageType] = (),
        sends: Iterable[MessageType] = (),
        retries: int = 3,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
    ) -> Callable[[F], F]:
        """Make this service the owner of a command type; the handler's return value is the result."""
        return self._register("command", command, key, False, emits, sends, RetryPolicy(retries, backoff, backoff_max))

    def query(
        self,
        query: MessageType,
        *,
        key: str | None = None,
        emits: Iterable[MessageType] = (),
        sends: Iterable[MessageType] = (),
    ) -> Callable[[F], F]:
        """Answer a query type; the handler's return value is the answer.

        A query handler may not emit or send: declaring ``emits``/``sends`` is recorded so the
        analyzer can point at it, but a node refuses to start such a service.
        """
        return self._register("query", query, key, False, emits, sends, RetryPolicy(retries=0))

    def _register(
        self,
        kind: Kind,
        message: MessageType,
        key: str | None,
        broadcast: bool,
        emits: Iterable[MessageType],
        sends: Iterable[MessageType],
        retry: RetryPolicy,
        batch: bool = False,
    ) -> Callable[[F], F]:
        options = message_options(message)
        if options.kind != kind:
            decorator = {"event": "on", "command": "command", "query": "query"}[options.kind]
            raise ChoreoUsageError(
                f"{options.name} is a {options.kind}, not a {kind}: use @{self.name}.{decorator}(...)"
            )
        if options.name in self.handlers:
            other = self.handlers[options.name]
            raise ChoreoUsageError(
                f"service {self.name} already handles {options.name} in {other.name} ({other.where}); "
                "one handler per message type per service"
            )
        emits_t = tuple(_check_types(emits, "event", f"{self.name} handler for {options.name}: emits"))
        sends_t = tuple(_check_types(sends, ("command", "query"), f"{self.name} handler for {options.name}: sends"))

        def decorator(fn: F) -> F:
            if not callable(fn):
                raise ChoreoUsageError(f"@{self.name}.{kind}({options.name}) decorates {fn!r}, which is not callable")
            code = getattr(fn, "__code__", None)
            is_async = inspect.iscoroutinefunction(fn)
            takes_context = _takes_context(fn)
            if batch and (is_async or takes_context):
                raise ChoreoUsageError(
                    f"@{self.name}.on({options.name}, batch=True) needs a plain function of one argument (the list "
                    f"of events), got {'an async function' if is_async else 'one that takes a context'}"
                )
            handler = Handler(
                service=self.name,
                name=getattr(fn, "__qualname__", repr(fn)),
                kind=kind,
                message=message,
                fn=fn,
                key=key if key is not None else options.key,
                broadcast=broadcast,
                emits=emits_t,
                sends=sends_t,
                retry=retry,
                is_async=is_async,
                takes_context=takes_context,
                module=getattr(fn, "__module__", "") or "",
                line=code.co_firstlineno if code else 0,
                batch=batch,
            )
            self.handlers[options.name] = handler
            return fn

        return decorator

    def task(self, fn: F) -> F:
        """Run ``async def fn(node)`` in the background on every instance while it serves.

        This is where a service originates messages outside handlers (a timer, a poller, a
        gateway): ``node`` has ``emit``/``send``/``ask``, limited to what ``Service(emits=...,
        sends=...)`` declares. The task starts when the node starts and is cancelled when it
        stops (before the drain); if it raises, the error is logged and the node keeps serving.

        >>> svc = Service("clock")
        >>> @svc.task
        ... async def tick(node): ...
        """
        if not inspect.iscoroutinefunction(fn):
            raise ChoreoUsageError(f"@{self.name}.task needs an 'async def' function, got {fn!r}")
        self.background.append(fn)
        return fn

    # ---- reading declarations -----------------------------------------------------------------

    def handler_for(self, type_name: str) -> Handler | None:
        return self.handlers.get(type_name)

    def message_types(self) -> dict[str, MessageType]:
        """Every message type this service handles, emits or sends, by wire name."""
        found: dict[str, MessageType] = {}
        for cls in (*self.emits, *self.sends):
            _add_type(found, cls)
        for h in self.handlers.values():
            for cls in (h.message, *h.emits, *h.sends):
                _add_type(found, cls)
        return found

    def validate(self) -> None:
        """Raise :class:`ChoreoUsageError` for declarations a node cannot run (checked at start)."""
        self.message_types()  # raises on two classes with one wire name
        for h in self.handlers.values():
            if h.kind == "query" and (h.emits or h.sends):
                raise ChoreoUsageError(
                    f"query handler {h.name} ({h.where}) declares emits/sends; queries have no side effects"
                )
            if h.key is not None and h.key not in h.message.__struct_fields__:
                raise ChoreoUsageError(
                    f"handler {h.name} ({h.where}) is keyed by {h.key!r}, a field {h.message_name} lacks"
                )

    def spec(self) -> ServiceSpec:
        """This service's declarations as plain data (see :mod:`choreo.spec`).

        >>> Service("billing").spec().name
        'billing'
        """
        types = self.message_types()
        return ServiceSpec(
            name=self.name,
            handlers=tuple(
                HandlerSpec(
                    name=h.name,
                    kind=h.kind,
                    message=h.message_name,
                    key=h.key,
                    broadcast=h.broadcast,
                    emits=tuple(message_options(t).name for t in h.emits),
                    sends=tuple(message_options(t).name for t in h.sends),
                    retries=h.retry.retries,
                    module=h.module,
                    line=h.line,
                )
                for h in self.handlers.values()
            ),
            emits=tuple(message_options(t).name for t in self.emits),
            sends=tuple(message_options(t).name for t in self.sends),
            messages=tuple(message_spec(t) for _, t in sorted(types.items())),
            partitions=self.partitions,
            state=tuple(state_type_name(t) for t in self.state),
            replicas=self.replicas,
            doc=self.doc,
            module=self.module,
            line=self.line,
        )


def _add_type(found: dict[str, MessageType], cls: MessageType) -> None:
    name = message_options(cls).name
    other = found.setdefault(name, cls)
    if other is not cls:
        raise ChoreoUsageError(
            f"two different classes share the wire name {name!r}: {other.__module__}.{other.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}; give one of them name=..."
        )


def _check_types(types: Iterable[MessageType], kinds: str | tuple[str, ...], what: str) -> Iterable[MessageType]:
    if isinstance(types, type):
        types = (types,)
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    for cls in types:
        options = message_options(cls)
        if options.kind not in kinds:
            raise ChoreoUsageError(f"{what} lists {options.name}, a {options.kind}; expected {' or '.join(kinds)}s")
        yield cls


def _takes_context(fn: Callable[..., Any]) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    if not params:
        raise ChoreoUsageError(f"handler {fn!r} must take the message as its first argument")
    return len(params) >= 2
