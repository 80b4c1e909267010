"""The dead-letter store: messages whose handler kept failing, kept on the node that failed them.

A message lands here after its retries (or at once, for a failure no retry can fix), with its
payload, the error and its traceback, and is acknowledged to its sender, so one poison message
cannot wedge a channel. Letters are listed, shown and replayed through the node's system queries
(``choreo dlq``; a replay runs the letter, dressed as a :class:`ReplayEnvelope`, through the
dispatcher again); the store keeps the newest ``limit`` letters and at most ``max_bytes`` of them
(payload, error and traceback), evicting the oldest first and counting what it evicted::

    >>> store = DeadLetters(limit=2)
    >>> for n in range(3):
    ...     _ = store.add(DeadLetter(0, "T", "svc", "h", bytes(16), bytes(16), b"", 0, b"", "boom", "E", "", 1, 0.0, 0.0))
    >>> [letter.id for letter in store], store.evicted
    ([2, 3], 1)
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import msgspec

from ..service import Handler
from ..wire import FLAG_REPLAY, FLAG_UNKEYED

__all__ = ["DeadLetter", "DeadLetters", "LetterJournal", "ReplayEnvelope"]

_encoder = msgspec.msgpack.Encoder()


class LetterJournal(Protocol):
    """Where a durable node's dead letters are kept (:class:`~choreo.runtime.journal.Journal`)."""

    def letter(self, letter_id: int, encoded: bytes) -> None: ...

    def letter_gone(self, letter_id: int) -> None: ...


@dataclass
class DeadLetter:
    """A message whose handler kept failing: kept on the node that failed it, replayable."""

    id: int
    message_type: str
    service: str
    handler: str
    msg_id: bytes
    trace_id: bytes
    key: bytes
    partition: int
    payload: bytes
    error: str
    error_type: str
    traceback: str
    attempts: int
    first_failed: float
    last_failed: float
    replays: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.message_type,
            "service": self.service,
            "handler": self.handler,
            "msg_id": self.msg_id.hex(),
            "trace_id": self.trace_id.hex(),
            "key": self.key.decode("utf-8", "replace"),
            "partition": self.partition,
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "replays": self.replays,
            "failed_at": self.last_failed,
        }

    def encode(self) -> bytes:
        """The letter as bytes (a durable node's store keeps it so)."""
        return _encoder.encode(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        """A letter from :meth:`encode`'s bytes (msgspec errors or TypeError if they are not one)."""
        return cls(**msgspec.msgpack.decode(data, type=dict[str, Any]))


class DeadLetters:
    """The newest dead letters of one node, by id (ids are never reused), within ``limit`` letters
    and ``max_bytes`` bytes."""

    def __init__(self, limit: int = 10_000, max_bytes: int = 64 << 20, journal: LetterJournal | None = None) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.journal = journal  # a durable node keeps its letters in its store
        self._letters: OrderedDict[int, DeadLetter] = OrderedDict()
        self._next = 1
        self.bytes = 0  # what the stored letters hold (payloads, errors, tracebacks)
        self.added = 0  # letters ever stored (a counter)
        self.evicted = 0  # letters dropped to stay within the limits

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store a new letter under a fresh id (the id it carries is replaced)."""
        letter.id = self._next
        self._next += 1
        self.put_back(letter)
        self.added += 1
        return letter

    def failed(
        self, env: Any, handler: Handler, exc: BaseException, attempts: int, now: float,
        replay_of: DeadLetter | None = None,
    ) -> DeadLetter:
        """``handler`` failed for good on the envelope ``env`` (after ``attempts``; ``now``: the wall
        clock): a new letter, or, for a replay, its letter put back with the new attempts and error."""
        if replay_of is not None:
            letter = replay_of
            letter.attempts += attempts
            letter.error, letter.error_type = str(exc), type(exc).__name__
            letter.last_failed = now
            self.put_back(letter)
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
                attempts=attempts,
                first_failed=now,
                last_failed=now,
            )
            self.add(letter)
        return letter

    def put_back(self, letter: DeadLetter) -> None:
        """Store ``letter`` under its id (a replayed letter that failed again comes back as the newest)."""
        old = self._letters.pop(letter.id, None)
        if old is not None:
            self.bytes -= _size(old)
        self._letters[letter.id] = letter
        self.bytes += _size(letter)
        if self.journal is not None:
            self.journal.letter(letter.id, letter.encode())
        while len(self._letters) > self.limit or (self.bytes > self.max_bytes and len(self._letters) > 1):
            gone, dropped = self._letters.popitem(last=False)
            self.bytes -= _size(dropped)
            self.evicted += 1
            if self.journal is not None:
                self.journal.letter_gone(gone)

    def restore(self, letter: DeadLetter) -> None:
        """A letter from a durable node's store, under its own id (ids stay unique)."""
        self._letters[letter.id] = letter
        self.bytes += _size(letter)
        self._next = max(self._next, letter.id + 1)

    def take(self, letter_id: int) -> DeadLetter:
        """Remove and return one letter (KeyError naming the id if there is none)."""
        try:
            letter = self._letters.pop(letter_id)
        except KeyError:
            raise KeyError(f"no dead letter #{letter_id} on this node") from None
        self.bytes -= _size(letter)
        return letter

    def get(self, letter_id: int) -> DeadLetter | None:
        return self._letters.get(letter_id)

    def __getitem__(self, letter_id: int) -> DeadLetter:
        try:
            return self._letters[letter_id]
        except KeyError:
            raise KeyError(f"no dead letter #{letter_id} on this node") from None

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(list(self._letters.values()))

    def __len__(self) -> int:
        return len(self._letters)


def _size(letter: DeadLetter) -> int:
    return len(letter.payload) + len(letter.error) + len(letter.traceback) + len(letter.key) + 256


class ReplayEnvelope:
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
