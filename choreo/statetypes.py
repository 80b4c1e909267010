"""The state types a service declares (``Service(..., state=[...])``): names, checks, encoding.

>>> import msgspec
>>> class Tally(msgspec.Struct):
...     n: int = 0
>>> types = StateTypes([Tally])
>>> types.encode(Tally(n=2), limit=64)
(0, b'\\x81\\xa1n\\x02')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from .errors import ChoreoUsageError, MessageTooLarge, ValidationError
from .messages import simple_fields

__all__ = ["StateTypes", "state_type_name", "check_state_type"]

_encoder = msgspec.msgpack.Encoder()


def state_type_name(cls: type) -> str:
    """The name a state type is stored and shipped under: its class name.

    >>> class Stock(msgspec.Struct):
    ...     available: int
    >>> state_type_name(Stock)
    'Stock'
    """
    return cls.__name__


class StateTypes:
    """The state types one service declares, in declaration order (their index is their id).

    >>> class Tally(msgspec.Struct):
    ...     n: int = 0
    >>> types = StateTypes([Tally])
    >>> types.names, types.index[Tally]
    (['Tally'], 0)
    """

    def __init__(self, types: Iterable[type]) -> None:
        self.types: list[type] = []
        self.names: list[str] = []
        self.index: dict[type, int] = {}
        self.by_name: dict[str, int] = {}
        self.decoders: list[msgspec.msgpack.Decoder[Any]] = []
        # per type, its fields' plain types (messages.simple_fields): a value whose fields all have
        # exactly those types needs no decoding to be checked (None: always decode it)
        self.simple: list[tuple[tuple[str, tuple[type, ...] | None], ...] | None] = []
        for cls in types:
            check_state_type(cls)
            name = state_type_name(cls)
            if name in self.by_name:
                raise ChoreoUsageError(f"two state types are named {name!r}: give one of them another class name")
            self.by_name[name] = self.index[cls] = len(self.types)
            self.types.append(cls)
            self.names.append(name)
            self.decoders.append(msgspec.msgpack.Decoder(cls))
            self.simple.append(simple_fields(cls))

    def __len__(self) -> int:
        return len(self.types)

    def of(self, cls: type) -> int:
        """The index of a declared type, or :class:`ChoreoUsageError` naming what is declared."""
        t = self.index.get(cls)
        if t is None:
            declared = ", ".join(self.names) or "none"
            raise ChoreoUsageError(
                f"{getattr(cls, '__name__', cls)!r} is not a state type of this service "
                f"(its state= declares {declared}): add it to Service(..., state=[...])"
            )
        return t

    def encode(self, value: Any, limit: int) -> tuple[int, bytes]:
        """A value's type index and its body, checked against its type and the size limit."""
        t = self.of(type(value))
        body = _encoder.encode(value)
        try:
            self.decoders[t].decode(body)  # a Struct does not check its fields when it is built
        except msgspec.ValidationError as exc:
            raise ValidationError(f"state {self.names[t]}: {exc}") from None
        if len(body) > limit:
            raise MessageTooLarge(
                f"state {self.names[t]} is {len(body)} bytes, above the limit of {limit} "
                "(NodeConfig.max_state_bytes): keep large data elsewhere and store a reference"
            )
        return t, body


def check_state_type(cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
        raise ChoreoUsageError(f"a state type must be a msgspec.Struct class, got {cls!r}")
