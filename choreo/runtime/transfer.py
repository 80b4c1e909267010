"""A partition's state on the move: chunked, checksummed streams, and the deltas a standby keeps up with.

Everything a partition's owner knows that its next owner needs (the dedup ids of every type,
the cached command results, the handler state) travels in ``HANDOVER`` envelopes over the
acknowledged channel between two instances of the service, as messages of this module:

* a **stream** (:class:`Chunk` messages): the whole partition, cut into chunks of at most
  ``chunk_bytes`` so that neither side holds it twice in one message, with a BLAKE2b digest of
  every chunk body in the last one. ``purpose`` says why: ``"handover"`` (the receiver is the
  partition's new owner: it starts the partition only once the stream checked out) or
  ``"copy"`` (the receiver is its standby). Each chunk carries the partition's epoch on the
  sender (see :mod:`~choreo.runtime.ownership`): the receiver's copy is that old. The sender
  produces chunks only as the earlier ones are acknowledged (:class:`StreamOut`, at most
  ``in_flight`` at a time): a large partition never sits in the outbox whole;
* a **verdict** (:class:`Verdict`), back from the receiver once the last chunk came: ``ok``, or
  the reason it was refused (a chunk missing or out of order, a digest that does not match,
  a body that does not decode). Until an ``ok`` the sender keeps the partition as it was, and
  sends a fresh stream after a refusal;
* a **delta** (:class:`Delta`): one handler's committed writes, with the id of the message
  that made them (and a command's result), from an owner to its standby.

:class:`StreamIn` is the receiving side of one stream: it stages the chunks (bounded by
``max_bytes``), checks them and yields a :class:`Staged` partition to install.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import msgspec

__all__ = [
    "Chunk",
    "Verdict",
    "Delta",
    "Piece",
    "Staged",
    "StreamOut",
    "StreamIn",
    "TransferError",
    "Pump",
    "decode_transfer",
    "encode_transfer",
    "DIGEST_SIZE",
]

DIGEST_SIZE = 16
Purpose = Literal["handover", "copy"]


class Chunk(msgspec.Struct, array_like=True, tag=1):
    purpose: str  # "handover" or "copy"
    stream: int  # chosen by the sender; a new one for every attempt
    partition: int
    seq: int  # 0, 1, 2... within the stream
    now: float  # the sender's clock when it cut the chunk: times in the body are on it
    body: bytes  # an encoded Piece
    last: bool = False
    digest: bytes = b""  # the last chunk: BLAKE2b of every body, in order
    items: int = 0  # the last chunk: how many entries the stream carried
    epoch: int = 0  # the partition's epoch on the sender (see choreo.runtime.ownership): the copy's age


class Verdict(msgspec.Struct, array_like=True, tag=2):
    purpose: str
    stream: int
    partition: int
    ok: bool
    error: str = ""


class Delta(msgspec.Struct, array_like=True, tag=3):
    partition: int
    key: bytes
    writes: list[tuple[str, bytes | None]]  # (state type, body; None: deleted)
    message_type: str  # the message whose handler wrote them: its id is a dedup id of the partition
    msg_id: bytes
    now: float
    reply: bytes | None = None  # a command's result, for a retry that reaches the standby
    marked: bool = True  # False: its outputs are not all acknowledged yet (see PartitionData.ungate)
    # an unmarked delta's outputs, (type, body), as its handler made them: the standby sends them,
    # under the same ids, if it takes the partition over before the mark comes
    outputs: list[tuple[str, bytes]] = []
    trace_id: bytes = b""  # the message's trace (its outputs carry it)
    handed: bool = False  # the mark of a message handed over running (see Piece.running): for its new owner


class Piece(msgspec.Struct, array_like=True, omit_defaults=True):
    """The body of one chunk: some of a partition's dedup ids, results and state values."""

    dedup: list[tuple[str, bytes]] = []  # (message type, DedupWindow export: u32 n | n x (16s id, f64 time))
    results: list[tuple[bytes, float, float, bytes]] = []  # (command id, time, ttl, encoded reply)
    state: list[tuple[str, bytes, bytes]] = []  # (state type, key, body)
    # a hand-over's: the outputs of messages whose writes are in it but whose outputs its sender
    # has not seen acknowledged (unmarked deltas, see PartitionData.ungate). The receiver sends
    # them under their ids when it takes the partition. Not in a stream's item count, which a
    # node that predates them checks (and ignores them, as a trailing field).
    owed: list[Delta] = []
    # a hand-over's: messages its sender ran whose outputs it has not seen acknowledged yet (their
    # writes are in it). The sender marks each once they are (a marked delta without writes); the
    # receiver sends their outputs under their ids only if the sender goes before it marked them.
    running: list[Delta] = []


Transfer = Chunk | Verdict | Delta
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Transfer)  # type: ignore[arg-type]
_piece_decoder = msgspec.msgpack.Decoder(Piece)


class TransferError(Exception):
    """A stream that cannot be installed: the reason goes back in a :class:`Verdict`."""


def encode_transfer(message: Transfer) -> bytes:
    return _encoder.encode(message)


def decode_transfer(payload: bytes) -> Transfer:
    """The transfer message in a HANDOVER envelope, or :class:`TransferError` saying what is wrong."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TransferError(f"not a transfer message: {exc}") from None


class StreamOut:
    """The chunks of one partition's stream, cut on demand from an iterator of entries.

    ``entries`` yields :class:`Piece` fragments (one entry each, usually); they are packed into
    chunk bodies of about ``chunk_bytes``. ``clock`` stamps each chunk.

    >>> out = StreamOut("copy", 7, 3, iter([Piece(state=[("Tally", b"k", b"v")])]), chunk_bytes=1024, clock=lambda: 0.0)
    >>> chunk = decode_transfer(out.next_chunk())
    >>> chunk.seq, chunk.last, chunk.items, out.done
    (0, True, 1, True)
    """

    def __init__(
        self, purpose: Purpose, stream: int, partition: int, entries: Iterator[Piece], *, chunk_bytes: int, clock,
        epoch: int = 0,
    ) -> None:
        self.purpose = purpose
        self.epoch = epoch
        self.stream = stream
        self.partition = partition
        self._entries = entries
        self._chunk_bytes = chunk_bytes
        self._clock = clock
        self._digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._ahead: Piece | None = None
        self.seq = 0
        self.items = 0
        self.bytes = 0
        self.done = False  # the last chunk was cut

    def next_chunk(self) -> bytes | None:
        """The next chunk, encoded (None once the last one was cut)."""
        if self.done:
            return None
        dedup: list[tuple[str, bytes]] = []
        results: list[tuple[bytes, float, float, bytes]] = []
        state: list[tuple[str, bytes, bytes]] = []
        owed: list[Delta] = []
        running: list[Delta] = []
        size = 0
        last = False
        while size < self._chunk_bytes:
            piece = self._ahead
            self._ahead = None
            if piece is None:
                piece = next(self._entries, None)
                if piece is None:
                    last = True
                    break
            weight = _weight(piece)
            if size and size + weight > self._chunk_bytes:
                self._ahead = piece  # starts the next chunk
                break
            dedup += piece.dedup
            results += piece.results
            state += piece.state
            owed += piece.owed
            running += piece.running
            self.items += len(piece.dedup) + len(piece.results) + len(piece.state)
            size += weight
        if not last and self._ahead is None:  # the chunk is full: is there anything after it?
            self._ahead = next(self._entries, None)
            last = self._ahead is None
        body = _encoder.encode(Piece(dedup, results, state, owed, running))
        self._digest.update(body)
        self.bytes += len(body)
        chunk = Chunk(self.purpose, self.stream, self.partition, self.seq, self._clock(), body, epoch=self.epoch)
        self.seq += 1
        if last:
            self.done = True
            chunk.last = True
            chunk.digest = self._digest.digest()
            chunk.items = self.items
        return _encoder.encode(chunk)


class Pump:
    """Keeps one stream moving to one receiver: the next chunks are cut as earlier ones are
    acknowledged, at most ``in_flight`` at a time. ``send(payload, on_acked)`` puts a chunk on
    the acknowledged channel to the receiver; :meth:`stop` stops it (its receiver changed).
    """

    def __init__(self, stream: StreamOut, send: Callable[[bytes, Callable[[], None]], None], in_flight: int = 4) -> None:
        self.stream = stream
        self._send = send
        self._limit = in_flight
        self._unacked = 0
        self.stopped = False

    def run(self) -> None:
        stream = self.stream
        while not self.stopped and self._unacked < self._limit and not stream.done:
            payload = stream.next_chunk()
            assert payload is not None
            self._unacked += 1
            self._send(payload, self._acked)

    def _acked(self) -> None:
        self._unacked -= 1
        self.run()

    def stop(self) -> None:
        self.stopped = True


def _weight(piece: Piece) -> int:
    return (
        sum(len(name) + len(blob) + 8 for name, blob in piece.dedup)
        + sum(len(i) + len(r) + 24 for i, _, _, r in piece.results)
        + sum(len(name) + len(k) + len(v) + 8 for name, k, v in piece.state)
        + sum(len(d.message_type) + 48 + sum(len(n) + len(b) + 8 for n, b in d.outputs)
              for d in (*piece.owed, *piece.running))
    )


class Staged:
    """A partition received whole and checked: ready to install.

    ``shift`` moves the sender's times onto the receiver's clock (each chunk's own offset is
    already applied to the dedup times; results keep the sender's times plus ``shift``).
    """

    __slots__ = ("purpose", "stream", "partition", "dedup", "results", "state", "owed", "running", "items", "bytes",
                 "epoch")

    def __init__(self, purpose: str, stream: int, partition: int) -> None:
        self.purpose = purpose
        self.stream = stream
        self.partition = partition
        self.dedup: list[tuple[str, bytes, float]] = []  # (type, export blob, shift onto our clock)
        self.results: list[tuple[bytes, float, float, bytes]] = []  # times already on our clock
        self.state: list[tuple[str, bytes, bytes]] = []
        self.owed: list[Delta] = []  # (see Piece.owed)
        self.running: list[Delta] = []  # (see Piece.running)
        self.items = 0
        self.bytes = 0
        self.epoch = 0  # the partition's epoch on the sender


class StreamIn:
    """One stream being received: its chunks checked in order and staged, bounded by ``max_bytes``.

    >>> out = StreamOut("handover", 1, 0, iter([Piece(state=[("Tally", b"k", b"v")])]), chunk_bytes=64, clock=lambda: 5.0)
    >>> inbound = StreamIn(decode_transfer(out.next_chunk()).stream, "handover", 0, max_bytes=1 << 20)
    """

    def __init__(self, stream: int, purpose: str, partition: int, *, max_bytes: int) -> None:
        self.staged = Staged(purpose, stream, partition)
        self.max_bytes = max_bytes
        self._digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._seq = 0

    @property
    def stream(self) -> int:
        return self.staged.stream

    def take(self, chunk: Chunk, now: float) -> Staged | None:
        """Stage one chunk; the whole partition once the last chunk checked out. Raises
        :class:`TransferError` when the stream cannot be installed (it is then dead)."""
        if chunk.seq != self._seq:
            raise TransferError(f"chunk {chunk.seq} came where chunk {self._seq} was due (a chunk is missing)")
        self._seq += 1
        staged = self.staged
        staged.bytes += len(chunk.body)
        if staged.bytes > self.max_bytes:
            raise TransferError(f"the stream is over {self.max_bytes} bytes (NodeConfig.max_partition_bytes)")
        self._digest.update(chunk.body)
        try:
            piece = _piece_decoder.decode(chunk.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransferError(f"chunk {chunk.seq} does not decode: {exc}") from None
        shift = now - chunk.now
        staged.dedup += [(name, blob, shift) for name, blob in piece.dedup]
        staged.results += [(i, t + shift, ttl, reply) for i, t, ttl, reply in piece.results]
        staged.state += piece.state
        staged.owed += piece.owed
        staged.running += piece.running
        staged.items += len(piece.dedup) + len(piece.results) + len(piece.state)
        if not chunk.last:
            return None
        if chunk.digest != self._digest.digest():
            raise TransferError("the stream's digest does not match its chunks (corrupt in transit)")
        if chunk.items != staged.items:
            raise TransferError(f"the stream carried {staged.items} entries, its sender counted {chunk.items}")
        staged.epoch = chunk.epoch
        return staged


def pieces(
    dedup: Iterable[tuple[str, bytes]],
    results: Iterable[tuple[bytes, float, float, bytes]],
    state: Iterable[tuple[str, bytes, bytes]],
) -> Iterator[Piece]:
    """One :class:`Piece` per entry, for :class:`StreamOut` (lazily: state is read as it goes)."""
    for d in dedup:
        yield Piece(dedup=[d])
    for r in results:
        yield Piece(results=[r])
    for s in state:
        yield Piece(state=[s])
