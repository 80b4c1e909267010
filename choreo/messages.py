"""Message types: the three primitives, their options and their codec.

A message type is a class with named, typed fields (a ``msgspec.Struct`` underneath, so
encoding is compact MessagePack and decoding validates every field). Subclass one of the three
primitives and pass the options as class keywords::

    class OrderPlaced(Event, key="order_id", dedup_ttl=600):
        order_id: str
        total_cents: int

    class PlaceOrder(Command, idempotency=["customer_id", "cart_id"], returns=OrderAccepted):
        customer_id: str
        cart_id: str

The options (all optional):

``name``
    the type's name on the wire and in the flow graph (default: the class name). Every service
    in a mesh must agree on it; it is how a receiver finds the class to decode a body with.
``key``
    the field whose value orders and partitions the type (default for subscriptions that do not
    name one). Messages with the same key are handled one at a time, in order.
``idempotency``
    how duplicates are recognised beyond the message id: a list of field names, or ``"body"`` for
    a SHA-256 of the whole canonical body. Two messages with the same idempotency key inside the
    dedup window are the same message: the second is acknowledged without running the handler
    (and a command gets the first result). Choose fields that identify the *intent*; a body that
    contains a timestamp or a per-attempt request id defeats ``"body"``.
``dedup_ttl`` / ``dedup_max``
    how long (seconds) and how many message ids the receiver remembers for this type.
``returns``
    for commands and queries: the type of the handler's result, used to validate and decode it
    at the caller (default: any MessagePack value).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import msgspec

from .errors import ChoreoUsageError, ValidationError

__all__ = [
    "Message",
    "Event",
    "Command",
    "Query",
    "MessageOptions",
    "encode",
    "decode",
    "encode_checked",
    "idempotency_id",
    "message_options",
    "simple_fields",
]

Kind = Literal["event", "command", "query"]

DEFAULT_DEDUP_TTL = 300.0
DEFAULT_DEDUP_MAX = 100_000

_encoder = msgspec.msgpack.Encoder()
_sorted_encoder = msgspec.msgpack.Encoder(order="sorted")


class MessageOptions(msgspec.Struct, frozen=True):
    """The choreo options of one message type (read them with :func:`message_options`)."""

    name: str
    kind: Kind
    key: str | None = None
    idempotency: tuple[str, ...] | Literal["body"] | None = None
    dedup_ttl: float = DEFAULT_DEDUP_TTL
    dedup_max: int = DEFAULT_DEDUP_MAX
    returns: Any = None
    module: str = ""
    line: int = 0


class _MessageMeta(type(msgspec.Struct)):  # type: ignore[misc]
    """Takes choreo's class keywords off before msgspec sees the class."""

    def __new__(
        mcls,
        cls_name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        *,
        name: str | None = None,
        key: str | None = None,
        idempotency: Sequence[str] | Literal["body"] | None = None,
        dedup_ttl: float | None = None,
        dedup_max: int | None = None,
        returns: Any = None,
        **struct_options: Any,
    ) -> Any:
        cls = super().__new__(mcls, cls_name, bases, namespace, **struct_options)
        kind = namespace.get("__choreo_kind__") or getattr(cls, "__choreo_kind__", None)
        if kind is None:  # the root class Message itself
            return cls
        if namespace.get("__choreo_kind__"):  # Event, Command, Query: the primitives
            return cls
        caller = sys._getframe(1)
        inherited: MessageOptions | None = getattr(cls, "__choreo_options__", None)
        options = _build_options(
            cls,
            kind=kind,
            name=name or cls_name,
            key=key if key is not None else (inherited.key if inherited else None),
            idempotency=idempotency if idempotency is not None else (inherited.idempotency if inherited else None),
            dedup_ttl=dedup_ttl if dedup_ttl is not None else (inherited.dedup_ttl if inherited else DEFAULT_DEDUP_TTL),
            dedup_max=dedup_max if dedup_max is not None else (inherited.dedup_max if inherited else DEFAULT_DEDUP_MAX),
            returns=returns if returns is not None else (inherited.returns if inherited else None),
            module=namespace.get("__module__", caller.f_globals.get("__name__", "")),
            line=caller.f_lineno,
        )
        cls.__choreo_options__ = options
        return cls


def _enable_vectorcall(meta: type) -> bool:
    """Let classes of ``meta`` be constructed through msgspec's fast path (CPython 3.11).

    msgspec constructs structs through the vectorcall protocol. CPython 3.12 lets a metaclass
    written in Python inherit it when it does not override ``__call__``; 3.11 does not, and
    constructing a message with keyword arguments then takes about 3.5 times as long. This sets
    the same flag 3.12 would set, after checking that the type object's layout is the one
    expected (the flags read back equal ``__flags__``); anywhere else it does nothing.
    """
    import ctypes
    import platform

    if platform.python_implementation() != "CPython" or sys.version_info >= (3, 12):
        return False
    base = type(msgspec.Struct)
    have_vectorcall = 1 << 11
    if meta.__call__ is not base.__call__ or not base.__flags__ & have_vectorcall or meta.__flags__ & have_vectorcall:
        return False

    class _TypeHead(ctypes.Structure):  # PyTypeObject up to tp_flags (CPython 3.11)
        _fields_ = [(n, t) for n, t in (
            ("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p), ("ob_size", ctypes.c_ssize_t),
            ("tp_name", ctypes.c_char_p), ("tp_basicsize", ctypes.c_ssize_t), ("tp_itemsize", ctypes.c_ssize_t),
            ("tp_dealloc", ctypes.c_void_p), ("tp_vectorcall_offset", ctypes.c_ssize_t),
            ("tp_getattr", ctypes.c_void_p), ("tp_setattr", ctypes.c_void_p), ("tp_as_async", ctypes.c_void_p),
            ("tp_repr", ctypes.c_void_p), ("tp_as_number", ctypes.c_void_p), ("tp_as_sequence", ctypes.c_void_p),
            ("tp_as_mapping", ctypes.c_void_p), ("tp_hash", ctypes.c_void_p), ("tp_call", ctypes.c_void_p),
            ("tp_str", ctypes.c_void_p), ("tp_getattro", ctypes.c_void_p), ("tp_setattro", ctypes.c_void_p),
            ("tp_as_buffer", ctypes.c_void_p), ("tp_flags", ctypes.c_ulong),
        )]

    mine, theirs = _TypeHead.from_address(id(meta)), _TypeHead.from_address(id(base))
    if (
        mine.tp_flags != meta.__flags__
        or theirs.tp_flags != base.__flags__
        or mine.tp_name != meta.__name__.encode()
        or mine.tp_call != theirs.tp_call
        or mine.tp_vectorcall_offset != theirs.tp_vectorcall_offset
    ):
        return False
    mine.tp_flags |= have_vectorcall
    return True


def _build_options(cls: type, **opts: Any) -> MessageOptions:
    fields = set(cls.__struct_fields__)
    where = f"{cls.__qualname__} ({opts['module']}:{opts['line']})"
    key = opts["key"]
    if key is not None and key not in fields:
        raise ChoreoUsageError(f"{where}: key field {key!r} is not a field of the type; fields: {sorted(fields)}")
    idem = opts["idempotency"]
    if isinstance(idem, str):
        if idem != "body":
            raise ChoreoUsageError(
                f"{where}: idempotency must be a list of field names or 'body', got {idem!r}"
            )
    elif idem is not None:
        idem = tuple(idem)
        if not idem:
            raise ChoreoUsageError(f"{where}: idempotency names no field; give field names or 'body'")
        missing = [f for f in idem if f not in fields]
        if missing:
            raise ChoreoUsageError(
                f"{where}: idempotency names fields the type lacks: {missing}; fields: {sorted(fields)}"
            )
    opts["idempotency"] = idem
    if not opts["dedup_ttl"] > 0:
        raise ChoreoUsageError(f"{where}: dedup_ttl must be > 0 seconds, got {opts['dedup_ttl']!r}")
    if int(opts["dedup_max"]) < 1:
        raise ChoreoUsageError(f"{where}: dedup_max must be >= 1, got {opts['dedup_max']!r}")
    if opts["kind"] == "event" and opts["returns"] is not None:
        raise ChoreoUsageError(f"{where}: events have no result; 'returns' is for commands and queries")
    if not opts["name"] or len(opts["name"].encode()) > 255:
        raise ChoreoUsageError(f"{where}: name must be 1 to 255 bytes of UTF-8, got {opts['name']!r}")
    return MessageOptions(**opts)


FAST_CONSTRUCTION = _enable_vectorcall(_MessageMeta)


class Message(msgspec.Struct, frozen=True, gc=False, metaclass=_MessageMeta):
    """Base of every message type; subclass :class:`Event`, :class:`Command` or :class:`Query`.

    Messages are immutable facts and requests: they cannot be part of a reference cycle, so the
    cycle collector is told not to track them (``gc=False``), which keeps a busy node from
    spending its time walking received messages.
    """

    __choreo_options__: ClassVar[MessageOptions]


class Event(Message, frozen=True):
    """A fact that happened, broadcast to every subscribing service.

    >>> class OrderPlaced(Event, key="order_id"):
    ...     order_id: str
    ...     total_cents: int
    >>> OrderPlaced("o-1", 1250).order_id
    'o-1'
    """

    __choreo_kind__: ClassVar[Kind] = "event"


class Command(Message, frozen=True):
    """An instruction to the one service that owns the type; answered by an ack and a result.

    >>> class ChargeCard(Command, key="order_id", idempotency=["order_id"]):
    ...     order_id: str
    ...     amount_cents: int
    """

    __choreo_kind__: ClassVar[Kind] = "command"


class Query(Message, frozen=True):
    """A read of state; its handler may not emit or send anything.

    >>> class GetOrder(Query, key="order_id"):
    ...     order_id: str
    """

    __choreo_kind__: ClassVar[Kind] = "query"


def message_options(cls: type) -> MessageOptions:
    """The options of a message type, or a clear error for anything else.

    >>> class Ping(Event):
    ...     n: int
    >>> message_options(Ping).kind
    'event'
    """
    options = getattr(cls, "__choreo_options__", None)
    if not isinstance(cls, type) or options is None or cls.__dict__.get("__choreo_kind__"):
        raise ChoreoUsageError(
            f"{cls!r} is not a message type: subclass choreo.Event, choreo.Command or choreo.Query"
        )
    return options


# Decoders are cached here rather than on the classes, so a class can travel by value through
# cloudpickle to a node process (a Decoder cannot be pickled).
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}
_result_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def decoder_for(cls: type[Message]) -> msgspec.msgpack.Decoder[Any]:
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    return decoder


def result_decoder_for(cls: type[Message]) -> msgspec.msgpack.Decoder[Any]:
    """Decodes (and validates) a command's or query's result as its declared ``returns`` type."""
    decoder = _result_decoders.get(cls)
    if decoder is None:
        returns = message_options(cls).returns
        decoder = msgspec.msgpack.Decoder(returns) if returns is not None else msgspec.msgpack.Decoder()
        _result_decoders[cls] = decoder
    return decoder


def encode(message: Message) -> bytes:
    """The MessagePack body of a message."""
    return _encoder.encode(message)


def encode_checked(message: Message) -> bytes:
    """The body of a message whose fields match their declared types, or :class:`ValidationError`
    naming the field and its value (a msgspec Struct does not check types when it is built).

    >>> class Reading(Event):
    ...     n: int
    >>> encode_checked(Reading(n="7"))
    Traceback (most recent call last):
    ...
    choreo.errors.ValidationError: Reading.n = '7': Expected `int`, got `str`
    """
    body = _encoder.encode(message)
    try:
        decoder_for(type(message)).decode(body)
    except msgspec.ValidationError as exc:
        name = message_options(type(message)).name
        raise ValidationError(_explain(name, str(exc), lambda field: getattr(message, field, None))) from None
    return body


def _simple_types(info: Any) -> tuple[type, ...] | None | bool:
    """The exact Python types a value of this msgspec type may have for decoding to surely pass
    (None: any value passes), or False when no such short list says it (constraints, containers...)."""
    import msgspec.inspect as mi

    if isinstance(info, mi.AnyType):
        return None
    if isinstance(info, (mi.StrType, mi.BytesType)):
        if info.min_length is not None or info.max_length is not None or getattr(info, "pattern", None) is not None:
            return False
        return (str,) if isinstance(info, mi.StrType) else (bytes,)
    if isinstance(info, (mi.IntType, mi.FloatType)):
        if any(getattr(info, c) is not None for c in ("gt", "ge", "lt", "le", "multiple_of")):
            return False
        return (int,) if isinstance(info, mi.IntType) else (float,)
    if isinstance(info, mi.BoolType):
        return (bool,)
    if isinstance(info, mi.NoneType):
        return (type(None),)
    if isinstance(info, mi.UnionType):
        out: tuple[type, ...] = ()
        for t in info.types:
            sub = _simple_types(t)
            if sub is False or sub is None:
                return False
            out += sub  # type: ignore[operator]
        return out
    return False


def simple_fields(cls: type[Message]) -> tuple[tuple[str, tuple[type, ...] | None], ...] | None:
    """``(field, exact types)`` of a message type whose fields all have plain types, else None.

    When every field's value is exactly of one of its types, :func:`encode_checked`'s check of
    the body could only pass, so the compiled emit lane skips it (it runs whenever a value is of
    any other type, subclasses included, so the decision is always the check's own)::

        >>> class Reading(Event):
        ...     sensor: str
        ...     value: float | None = None
        >>> simple_fields(Reading)
        (('sensor', (<class 'str'>,)), ('value', (<class 'float'>, <class 'NoneType'>)))
    """
    import msgspec.inspect as mi

    info = mi.type_info(cls)
    out = []
    for f in info.fields:  # type: ignore[attr-defined]
        types = _simple_types(f.type)
        if types is False:
            return None
        out.append((f.name, types))
    return tuple(out)  # type: ignore[arg-type]


def _explain(name: str, error: str, value_of: Any) -> str:
    """``Type.field = value: what msgspec expected`` from msgspec's ``... - at `$.field[1]```."""
    text, _, path = error.rpartition(" - at `")
    if not text or not path.startswith("$."):
        return f"{name}: {error}"
    path = path.rstrip("`")
    field = path[2:].split("[", 1)[0].split(".", 1)[0]
    shown = repr(value_of(field))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    where = path[2:]
    return f"{name}.{where} = {shown}: {text}" if where == field else f"{name}.{where} (in {field} = {shown}): {text}"


def decode(cls: type[Message], body: bytes | memoryview) -> Message:
    """Decode and validate a body as ``cls``; raises :class:`ValidationError` naming the field."""
    try:
        return decoder_for(cls).decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        try:
            raw = msgspec.msgpack.decode(body)  # the fields as sent, to show the one that does not fit
        except msgspec.DecodeError:
            raw = None
        fields = raw if isinstance(raw, dict) else {}
        raise ValidationError(_explain(message_options(cls).name, str(exc), fields.get)) from None
    except msgspec.DecodeError as exc:
        raise ValidationError(f"{message_options(cls).name}: body is not valid MessagePack: {exc}") from None


def idempotency_id(message: Message) -> bytes | None:
    """The 16-byte identity of a message's intent, or None when its type declares no idempotency.

    It is a SHA-256 over the type's name and the chosen fields (or the whole body) in a
    canonical encoding (map keys sorted), so equal intents give equal ids on every host.
    """
    options = message.__choreo_options__
    if options.idempotency is None:
        return None
    if options.idempotency == "body":
        canonical = _sorted_encoder.encode(message)
    else:
        canonical = _sorted_encoder.encode([getattr(message, f) for f in options.idempotency])
    return hashlib.sha256(options.name.encode() + b"\0" + canonical).digest()[:16]
