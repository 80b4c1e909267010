"""Handler state: values of declared types, per key, held by the partition that key belongs to.

A service declares the types of its state (``Service("inventory", state=[Stock])``); a keyed
handler reads and writes the values of its message's key through ``ctx.state``
(:class:`StateView`), and a query of the same service reads them the same way.

How this works. Values live encoded (msgpack) in :class:`StateTables`: one dict per declared
type and partition, from key to bytes. Encoded, because every value must be checked against
its type when it is written, sized, shipped to a standby, written to a store and streamed to a
new owner anyway, and because a decoded value handed to a handler could be changed in place by
a handler that then raises. A handler's writes are *buffered* in its context (type index ->
bytes, or None for a delete), read back by its own later reads, and applied by
:meth:`StateTables.apply` only once the handler returned without raising, in the same step as
its dedup mark is kept and its emitted messages are handed to the outbox: a handler that raises
leaves no change, and a duplicate, never run, never applies twice.

Everything of one partition can be exported (:meth:`StateTables.entries`) and installed whole
(:meth:`StateTables.install`): that is how a partition's state moves (see
:mod:`choreo.runtime.transfer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import msgspec

from ..errors import ChoreoUsageError, MessageTooLarge
from ..statetypes import StateTypes

__all__ = ["StateTables", "StateView"]

T = TypeVar("T", bound=msgspec.Struct)
Writes = dict[int, "bytes | None"]  # a handler's buffered writes: type index -> value (None: delete)


class StateTables:
    """The state of one service's partitions held here: ``tables[type][partition][key] = body``.

    >>> class Tally(msgspec.Struct):
    ...     n: int = 0
    >>> tables = StateTables(StateTypes([Tally]), partitions=4)
    >>> tables.apply(2, b"k", {0: msgspec.msgpack.encode(Tally(3))})
    >>> tables.get(0, 2, b"k")
    b'\\x81\\xa1n\\x03'
    >>> tables.keys(), tables.apply(2, b"k", {0: None}), tables.keys()
    (1, None, 0)
    """

    def __init__(self, types: StateTypes, partitions: int) -> None:
        self.types = types
        self.partitions = partitions
        self.tables: list[list[dict[bytes, bytes]]] = [[{} for _ in range(partitions)] for _ in types.types]
        self.bytes = 0  # keys and bodies held, all partitions

    def get(self, t: int, p: int, key: bytes) -> bytes | None:
        return self.tables[t][p].get(key)

    def apply(self, p: int, key: bytes, writes: Writes) -> None:
        """Apply one handler's writes to the value of ``key`` in partition ``p``."""
        for t, body in writes.items():
            table = self.tables[t][p]
            old = table.get(key)
            if old is not None:
                self.bytes -= len(key) + len(old)
            if body is None:
                if old is not None:
                    del table[key]
            else:
                table[key] = body
                self.bytes += len(key) + len(body)

    def scan(self, t: int, p: int, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The keys of type ``t`` in partition ``p`` that start with ``prefix``, in key order."""
        table = self.tables[t][p]
        for key in sorted(k for k in table if k.startswith(prefix)):
            yield key, table[key]

    # -- a partition as a whole -----------------------------------------------------------------

    def entries(self, p: int) -> Iterator[tuple[int, bytes, bytes]]:
        """Every value of partition ``p`` as ``(type, key, body)`` (a snapshot of its keys: values
        written while this runs are seen as they are when their key comes)."""
        for t, per_partition in enumerate(self.tables):
            table = per_partition[p]
            for key in list(table):
                body = table.get(key)
                if body is not None:
                    yield t, key, body

    def count(self, p: int) -> int:
        return sum(len(per_partition[p]) for per_partition in self.tables)

    def drop(self, p: int) -> None:
        """Forget partition ``p`` (it moved away)."""
        for per_partition in self.tables:
            table = per_partition[p]
            self.bytes -= sum(len(k) + len(v) for k, v in table.items())
            per_partition[p] = {}

    def install(self, p: int, staged: list[dict[bytes, bytes]]) -> None:
        """Replace partition ``p`` with ``staged`` (one dict per type), received whole."""
        self.drop(p)
        for t, table in enumerate(staged):
            self.tables[t][p] = table
            self.bytes += sum(len(k) + len(v) for k, v in table.items())

    def keys(self) -> int:
        return sum(len(table) for per_partition in self.tables for table in per_partition)


class StateView:
    """``ctx.state``: the state of the message's key (see :class:`choreo.State`).

    Writes are buffered in the handler's context and applied only if the handler returns
    without raising; reads see the handler's own earlier writes.
    """

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def _where(self) -> tuple[StateTables, int, bytes]:
        ctx = self._ctx
        tables = ctx._tables
        handler = ctx.handler
        if tables is None:
            raise ChoreoUsageError(
                f"handler {handler.name} ({handler.where}) uses ctx.state, but service {handler.service} "
                "declares no state types: Service(..., state=[YourType])"
            )
        env = ctx.envelope
        if handler.broadcast or handler.key is None or not env.key:
            raise ChoreoUsageError(
                f"handler {handler.name} ({handler.where}) uses ctx.state, which belongs to a key: "
                "only keyed, competing handlers and queries have state (give the handler key=...)"
            )
        return tables, env.partition, env.key

    def get(self, cls: type[T], default: T | None = None) -> T | None:
        """The value of type ``cls`` for this message's key, or ``default``.

        >>> # stock = ctx.state.get(Stock) or Stock(sku=event.sku)
        """
        tables, p, key = self._where()
        t = tables.types.of(cls)
        writes = self._ctx.writes
        if writes is not None and t in writes:
            body = writes[t]
        else:
            body = tables.tables[t][p].get(key)
        if body is None:
            return default
        return tables.types.decoders[t].decode(body)  # type: ignore[no-any-return]

    def put(self, value: msgspec.Struct) -> None:
        """Set this key's value of ``type(value)`` (applied when the handler succeeds)."""
        tables, _, _ = self._where()
        ctx = self._ctx
        self._writable()
        t, body = tables.types.encode(value, ctx.state_limit)
        writes = ctx.writes
        if writes is None:
            writes = ctx.writes = {}
        writes[t] = body
        if len(writes) > 1 and sum(len(b) for b in writes.values() if b) > ctx.state_limit:
            del writes[t]
            raise MessageTooLarge(
                f"the state values handler {ctx.handler.name} writes are over {ctx.state_limit} bytes together "
                "(NodeConfig.max_state_bytes: one key's changes travel in one message)"
            )

    def delete(self, cls: type) -> None:
        """Remove this key's value of type ``cls`` (applied when the handler succeeds)."""
        tables, _, _ = self._where()
        ctx = self._ctx
        self._writable()
        t = tables.types.of(cls)
        writes = ctx.writes
        if writes is None:
            writes = ctx.writes = {}
        writes[t] = None

    def items(self, cls: type[T], prefix: str | bytes = "") -> list[tuple[str, T]]:
        """``(key, value)`` of type ``cls`` for every key of this partition that starts with
        ``prefix``, in key order (only this partition: keys elsewhere live on their owners)."""
        tables, p, key = self._where()
        t = tables.types.of(cls)
        raw = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        found = dict(tables.scan(t, p, raw))
        writes = self._ctx.writes
        if writes is not None and t in writes and key.startswith(raw):
            body = writes[t]
            if body is None:
                found.pop(key, None)
            else:
                found[key] = body
        decode = tables.types.decoders[t].decode
        return [(k.decode("utf-8", "surrogateescape"), decode(found[k])) for k in sorted(found)]

    def _writable(self) -> None:
        handler = self._ctx.handler
        if handler.kind == "query":
            raise ChoreoUsageError(f"query handler {handler.name} ({handler.where}) may read state, not change it")
