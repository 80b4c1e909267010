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
from functools import partial
from typing import Any, TypeVar

import msgspec

from .. import core
from ..errors import ChoreoUsageError, MessageTooLarge, ValidationError
from ..statetypes import StateTypes

__all__ = ["StateTables", "state_view"]

T = TypeVar("T", bound=msgspec.Struct)
Writes = dict[int, "bytes | None"]  # a handler's buffered writes: type index -> value (None: delete)
_encoder = msgspec.msgpack.Encoder()


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

    def get(self, t: int, p: int, key: bytes) -> bytes | None:
        return self.tables[t][p].get(key)

    def apply(self, p: int, key: bytes, writes: Writes) -> None:
        """Apply one handler's writes to the value of ``key`` in partition ``p`` (the core's
        StateView.commit does the same for the compiled lane)."""
        for t, body in writes.items():
            table = self.tables[t][p]
            if body is None:
                table.pop(key, None)
            else:
                table[key] = body

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
            per_partition[p].clear()  # the same dict: views hold the tables, not copies

    def install(self, p: int, staged: list[dict[bytes, bytes]]) -> None:
        """Replace partition ``p`` with ``staged`` (one dict per type), received whole."""
        for t, table in enumerate(staged):
            mine = self.tables[t][p]
            mine.clear()
            mine.update(table)

    def keys(self) -> int:
        return sum(len(table) for per_partition in self.tables for table in per_partition)

    def size(self) -> int:
        """Bytes of keys and values held (what they take in memory is more: see the bench)."""
        return sum(len(k) + len(v) for per_partition in self.tables for table in per_partition for k, v in table.items())


def state_view(
    ctx: Any, tables: StateTables, limit: int, standby: list[Any] | None = None, log: Any = None
) -> Any:
    """``ctx.state`` for one handler context: the core's :class:`~choreo.core.StateView` over
    ``tables``, refusing with choreo's errors. ``standby``: the replicas' standby list (a write
    in a partition with a standby waits for a job, see :mod:`~choreo.runtime.replicas`);
    ``log(partition, key, writes)``: a durable node's journal hears of every write."""
    types = tables.types
    return core.StateView(
        ctx, tables.tables, types.index, [d.decode for d in types.decoders], _encoder.encode, limit,
        partial(_refuse, ctx, types, limit), standby, log, types.simple,
    )


def _refuse(ctx: Any, types: StateTypes, limit: int, what: str, t: Any, detail: Any) -> None:
    """Raise the error for a refused use of ``ctx.state`` (called by the core's StateView)."""
    handler = ctx.handler
    if what == "no_key":
        raise ChoreoUsageError(
            f"handler {handler.name} ({handler.where}) uses ctx.state, which belongs to a key: "
            "only keyed, competing handlers and queries have state (give the handler key=...)"
        )
    if what == "read_only":
        raise ChoreoUsageError(f"query handler {handler.name} ({handler.where}) may read state, not change it")
    if what == "undeclared":
        types.of(t)  # raises, naming what is declared
    if what == "invalid":
        if isinstance(detail, msgspec.ValidationError):
            raise ValidationError(f"state {types.names[t]}: {detail}") from None
        raise detail
    if what == "too_large":
        raise MessageTooLarge(
            f"state {types.names[t]} is {detail} bytes, above the limit of {limit} "
            "(NodeConfig.max_state_bytes): keep large data elsewhere and store a reference"
        )
    if what == "too_large_total":
        raise MessageTooLarge(
            f"the state values handler {handler.name} writes are {detail} bytes together, above {limit} "
            "(NodeConfig.max_state_bytes: one key's changes travel in one message)"
        )
    raise ChoreoUsageError(f"ctx.state refused ({what})")  # pragma: no cover - every case is above
