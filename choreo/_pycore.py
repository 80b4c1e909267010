"""The delivery core in plain Python: the reference model of the compiled ``choreo._core``.

Same classes, same methods, same results; only slower. The property tests drive both with the
same operation sequences and require them to agree, so this file is also the readable
specification of the core. ``CHOREO_PURE=1`` selects it on purpose (see ``choreo.core``).

Sans-IO: bytes, integers and times in, decisions out. Nothing here reads a clock, sleeps or
touches a socket; the caller passes ``now`` (seconds, any monotonic origin).

Envelope layout (little-endian), the unit the core sequences, acknowledges and deduplicates::

    0  u64 seq          8  u32 payload_len   12 u16 key_len   14 u16 partition
    16 u8  kind         17 u8  flags         18 u8  type_len  19 u8  (zero)
    20 16s msg_id       36 16s trace_id      52 16s cause_id
    68 type (type_len bytes) | key (key_len bytes) | payload (payload_len bytes)

A batch body is envelopes back to back. An ack is
``u64 cumulative | u64 received | u16 n | n x (u64 lo, u64 hi)``: every seq <= cumulative is
done, every seq <= received has arrived, and each inclusive range [lo, hi] is done as well.
"""

from __future__ import annotations

import math
import struct
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

__all__ = [
    "IMPLEMENTATION",
    "ACCEPTED",
    "DUPLICATE",
    "BEYOND_WINDOW",
    "HEADER_SIZE",
    "MAX_ACK_RANGES",
    "MalformedFrame",
    "Envelope",
    "WindowStats",
    "ReorderStats",
    "DedupStats",
    "OutboundWindow",
    "InboundReorder",
    "DedupWindow",
    "KeyedDispatch",
    "pack_envelope",
    "parse_envelopes",
    "encode_ack",
    "decode_ack",
    "decode_replies",
    "hash64",
    "hash128",
    "derive_id",
    "partition_of",
    "rendezvous_owner",
    "assign_partitions",
    "IdSource",
    "EmitLane",
    "FastLane",
    "StateView",
    "KIND_EVENT",
    "FLAG_UNKEYED",
    "FLAG_BROADCAST",
    "FLAG_REPLAY",
    "SPAN_KEY_BYTES",
    "LANE_END",
    "LANE_SLOW",
    "LANE_DUPLICATE",
    "LANE_BAD",
    "LANE_FAILED",
    "LANE_EFFECTS",
    "LANE_BATCH_FAILED",
    "LANE_RESULT",
    "LANE_LATE",
    "SpanRing",
    "EMIT_END",
    "EMIT_OTHER",
    "EMIT_BLOCKED",
    "EMIT_INVALID",
]

IMPLEMENTATION = "pure"

ACCEPTED = 0
DUPLICATE = 1
BEYOND_WINDOW = 2

HEADER = struct.Struct("<QIHHBBBx16s16s16s")
HEADER_SIZE = HEADER.size  # 68
ACK_HEAD = struct.Struct("<QQH")
ACK_RANGE = struct.Struct("<QQ")
MAX_ACK_RANGES = 32
MAX_KIND = 15
ID_SIZE = 16
_ZERO_ID = bytes(ID_SIZE)
_U64 = (1 << 64) - 1
MAX_PARTITIONS = 1 << 16  # the envelope's partition field is a u16
DEDUP_RECORD = struct.Struct("<16sd")


def _as_bytes(value: Any) -> bytes:
    """``value`` as bytes if it is a bytes-like object; TypeError otherwise (``bytes(5)`` is not an id)."""
    return value if type(value) is bytes else bytes(memoryview(value))


def _u64(value: int, what: str) -> int:
    """Sequence numbers travel as u64: outside 0..2**64-1 is a caller error (as in the compiled core)."""
    if not 0 <= value <= _U64:
        raise OverflowError(f"{what} must be in 0..2**64-1, got {value}")
    return value


def _check_partition(partition: int) -> int:
    if not 0 <= partition < MAX_PARTITIONS:
        raise ValueError(f"partition must be in 0..{MAX_PARTITIONS - 1}, got {partition}")
    return partition


class MalformedFrame(ValueError):
    """A batch or ack does not follow the layout; nothing from it was accepted.

    ``reason`` is a short token for counters (``"truncated"``, ``"bad_kind"``, ...).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class WindowStats(NamedTuple):
    next_seq: int
    in_flight: int
    in_flight_bytes: int
    window: int
    max_bytes: int
    peak_in_flight: int
    sent: int
    acked: int
    retransmitted: int
    bogus_acks: int


class ReorderStats(NamedTuple):
    released_upto: int
    done_upto: int
    buffered: int
    window: int
    accepted: int
    duplicates: int
    beyond_window: int
    released: int
    completed: int


class DedupStats(NamedTuple):
    entries: int
    max_entries: int
    ttl: float
    inserted: int
    duplicates: int
    expired: int
    evicted: int


# ---------------------------------------------------------------------------------------------
# Hashes: identical on every host and every run (Python's hash() is salted per process).
# FNV-1a over the bytes from a seeded basis, finished with MurmurHash3's fmix64.

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_GOLDEN = 0x9E3779B97F4A7C15


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _U64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _U64
    h ^= h >> 33
    return h


def hash64(data: bytes, seed: int = 0) -> int:
    """A stable 64-bit hash of ``data`` (the same on every host and Python run)."""
    h = _FNV_OFFSET ^ ((seed * _GOLDEN) & _U64)
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _U64
    return _fmix64(h)


def hash128(data: bytes) -> bytes:
    """A stable 16-byte digest of ``data`` (two seeded :func:`hash64`)."""
    return hash64(data, 1).to_bytes(8, "little") + hash64(data, 2).to_bytes(8, "little")


def derive_id(parent: bytes, handler: bytes, position: int) -> bytes:
    """The id of the ``position``-th message a handler emitted while handling ``parent``.

    Deterministic, so reprocessing after a crash emits the same ids and downstream dedup
    recognises them.
    """
    if not 0 <= position < 1 << 32:
        raise ValueError(f"position must be in [0, 2**32), got {position}")
    return hash128(_as_bytes(parent) + b"\x00" + _as_bytes(handler) + position.to_bytes(4, "little"))


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a key among ``partitions`` (multiply-shift of its :func:`hash64`).

    ``partitions`` is 1..65536: the envelope carries the partition in 16 bits.
    """
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    return (hash64(key) * partitions) >> 64


def rendezvous_owner(partition: int, instances: Sequence[bytes]) -> int:
    """Index of the instance that owns ``partition`` (highest random weight), -1 if none.

    Adding or removing an instance moves only the partitions it wins or held.
    """
    best, best_weight, best_id = -1, -1, b""
    for i, inst in enumerate(instances):
        inst = _as_bytes(inst)
        w = hash64(inst, partition + 1)
        if w > best_weight or (w == best_weight and inst < best_id):
            best, best_weight, best_id = i, w, inst
    return best


def assign_partitions(partitions: int, instances: Sequence[bytes]) -> list[int]:
    """Owner index of every partition ``0..partitions-1`` by :func:`rendezvous_owner`."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    insts = [_as_bytes(i) for i in instances]
    return [rendezvous_owner(p, insts) for p in range(partitions)]


# ---------------------------------------------------------------------------------------------
# Envelopes


def _check_id(value: bytes, what: str) -> bytes:
    if len(value) != ID_SIZE:
        raise ValueError(f"{what} must be {ID_SIZE} bytes, got {len(value)}")
    return value


def pack_envelope(
    seq: int,
    kind: int,
    flags: int,
    type: bytes,
    key: bytes,
    partition: int,
    msg_id: bytes,
    trace_id: bytes,
    cause_id: bytes,
    payload: bytes,
) -> bytes:
    """One encoded envelope (see the module docstring for the layout)."""
    _u64(seq, "seq")
    if not 1 <= kind <= MAX_KIND:
        raise ValueError(f"kind must be in 1..{MAX_KIND}, got {kind}")
    if not 0 <= flags <= 255:
        raise ValueError(f"flags must fit in one byte, got {flags}")
    if not 1 <= len(type) <= 255:
        raise ValueError(f"type must be 1 to 255 bytes, got {len(type)}")
    if len(key) > 0xFFFF:
        raise ValueError(f"key must be at most 65535 bytes, got {len(key)}")
    if not 0 <= partition <= 0xFFFF:
        raise ValueError(f"partition must be in 0..65535, got {partition}")
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("payload must be under 4 GiB")
    head = HEADER.pack(
        seq,
        len(payload),
        len(key),
        partition,
        kind,
        flags,
        len(type),
        _check_id(msg_id, "msg_id"),
        _check_id(trace_id, "trace_id"),
        _check_id(cause_id, "cause_id"),
    )
    return b"".join((head, type, key, payload))


class Envelope:
    """One received envelope. ``raw`` is the whole encoded envelope (for reroute or DLQ).

    ``Envelope(raw)`` decodes exactly one encoded envelope (:class:`MalformedFrame` otherwise).
    """

    __slots__ = ("seq", "kind", "flags", "partition", "type", "key", "msg_id", "trace_id", "cause_id", "payload", "raw")

    def __init__(self, raw: bytes | bytearray | memoryview) -> None:
        self._fill(_one_envelope(raw))

    @classmethod
    def _from_valid(cls, raw: bytes) -> Envelope:
        env = cls.__new__(cls)
        env._fill(raw)
        return env

    def _fill(self, raw: bytes) -> None:
        (
            self.seq,
            plen,
            klen,
            self.partition,
            self.kind,
            self.flags,
            tlen,
            self.msg_id,
            self.trace_id,
            self.cause_id,
        ) = HEADER.unpack_from(raw, 0)
        t0 = HEADER_SIZE
        self.type = raw[t0 : t0 + tlen].decode("utf-8", "replace")
        self.key = raw[t0 + tlen : t0 + tlen + klen]
        self.payload = raw[t0 + tlen + klen : t0 + tlen + klen + plen]
        self.raw = raw

    @property
    def size(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Envelope(seq={self.seq}, kind={self.kind}, type={self.type!r}, key={self.key!r}, {len(self.payload)} B)"


def _split(frame: bytes | bytearray | memoryview, offset: int) -> list[bytes]:
    """Cut a batch body into raw envelopes, validating the whole frame before returning any."""
    view = memoryview(frame)
    end = len(view)
    out: list[bytes] = []
    pos = offset
    if pos > end or pos < 0:
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {end} bytes")
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise MalformedFrame("truncated", f"{end - pos} bytes left at {pos}, an envelope header needs {HEADER_SIZE}")
        _seq, plen, klen, _part, kind, _flags, tlen = struct.unpack_from("<QIHHBBB", view, pos)
        if not 1 <= kind <= MAX_KIND:
            raise MalformedFrame("bad_kind", f"envelope at {pos} has kind {kind}")
        if tlen == 0:
            raise MalformedFrame("bad_type", f"envelope at {pos} has an empty type name")
        size = HEADER_SIZE + tlen + klen + plen
        if size > end - pos:
            raise MalformedFrame("truncated", f"envelope at {pos} claims {size} bytes, {end - pos} left")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    return out


def _one_envelope(raw: bytes | bytearray | memoryview) -> bytes:
    """``raw`` as bytes if it holds exactly one valid envelope, else :class:`MalformedFrame`."""
    raw = _as_bytes(raw)
    envs = _split(raw, 0)
    if not envs:
        raise MalformedFrame("truncated", f"0 bytes left at 0, an envelope header needs {HEADER_SIZE}")
    if len(envs) > 1:
        size = len(envs[0])
        raise MalformedFrame("truncated", f"envelope of {size} bytes followed by {len(raw) - size} more")
    return raw


def parse_envelopes(frame: bytes | bytearray | memoryview, offset: int = 0) -> list[Envelope]:
    """Every envelope of a batch body, or :class:`MalformedFrame` (then none is returned)."""
    return [Envelope._from_valid(raw) for raw in _split(frame, offset)]


# ---------------------------------------------------------------------------------------------
# Acks


def encode_ack(cumulative: int, received: int, ranges: Iterable[tuple[int, int]] = ()) -> bytes:
    """Encode an ack; at most :data:`MAX_ACK_RANGES` ranges are kept (the lowest)."""
    _u64(cumulative, "cumulative")
    _u64(received, "received")
    rs = list(ranges)[:MAX_ACK_RANGES]
    for lo, hi in rs:
        _u64(lo, "ack range bound")
        _u64(hi, "ack range bound")
    return ACK_HEAD.pack(cumulative, received, len(rs)) + b"".join(ACK_RANGE.pack(lo, hi) for lo, hi in rs)


def decode_ack(frame: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, list[tuple[int, int]]]:
    """``(cumulative, received, ranges)`` of an encoded ack, or :class:`MalformedFrame`."""
    view = memoryview(frame)
    if offset < 0 or offset > len(view):
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {len(view)} bytes")
    if len(view) - offset < ACK_HEAD.size:
        raise MalformedFrame("truncated", f"an ack needs {ACK_HEAD.size} bytes, got {len(view) - offset}")
    cumulative, received, n = ACK_HEAD.unpack_from(view, offset)
    if n > MAX_ACK_RANGES:
        raise MalformedFrame("bad_ack", f"ack carries {n} ranges, at most {MAX_ACK_RANGES} allowed")
    need = ACK_HEAD.size + n * ACK_RANGE.size
    if len(view) - offset != need:
        raise MalformedFrame("truncated", f"ack with {n} ranges needs {need} bytes, got {len(view) - offset}")
    ranges = [ACK_RANGE.unpack_from(view, offset + ACK_HEAD.size + i * ACK_RANGE.size) for i in range(n)]
    for lo, hi in ranges:
        if lo > hi:
            raise MalformedFrame("bad_ack", f"ack range [{lo}, {hi}] is reversed")
    return cumulative, received, ranges


_REPLY_ENTRY = struct.Struct("<16sB")
_REPLY_LEN = struct.Struct("<I")


def decode_replies(frame: bytes | bytearray | memoryview, offset: int = 0) -> list[tuple[bytes, str, bytes]]:
    """The ``(msg_id, type, body)`` entries of a REPLY frame's body at ``offset``, or :class:`MalformedFrame`.

    An entry is the 16-byte message id, the type name's length (one byte) and name (UTF-8), the
    body's length (four bytes, little-endian) and body.

    >>> decode_replies(b"i" * 16 + b"\x04Echo" + b"\x02\x00\x00\x00" + b"\x01\xc0")
    [(b'iiiiiiiiiiiiiiii', 'Echo', b'\x01\xc0')]
    """
    view = memoryview(frame)
    end = len(view)
    if offset < 0 or offset > end:
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {end} bytes")
    out = []
    while offset < end:
        if end - offset < _REPLY_ENTRY.size:
            raise MalformedFrame("truncated", "a reply entry is cut short")
        msg_id, tlen = _REPLY_ENTRY.unpack_from(view, offset)
        offset += _REPLY_ENTRY.size
        if end - offset < tlen + _REPLY_LEN.size:
            raise MalformedFrame("truncated", "a reply entry is cut short")
        type_name = bytes(view[offset : offset + tlen]).decode("utf-8", "replace")
        offset += tlen
        (n,) = _REPLY_LEN.unpack_from(view, offset)
        offset += _REPLY_LEN.size
        if end - offset < n:
            raise MalformedFrame("truncated", "a reply body overruns the frame")
        out.append((msg_id, type_name, bytes(view[offset : offset + n])))
        offset += n
    return out


def _column(values: Any, n: int, name: str) -> Sequence[Any]:
    """``values`` as a list or tuple of ``n`` items (``n`` < 0: any count); other iterables are copied."""
    if isinstance(values, (bytes, str, bytearray)):
        raise TypeError(f"{name} must be a sequence with one item per envelope, not {type(values).__name__}")
    if type(values) is not list and type(values) is not tuple:
        values = list(values)
    if n >= 0 and len(values) != n:
        raise ValueError(f"{name} has {len(values)} items for {n} payloads")
    return values


def _bytes_item(column: Sequence[Any], name: str, i: int, exact: int) -> None:
    if not isinstance(column[i], bytes):
        raise TypeError(f"{name}[{i}] must be bytes, got {type(column[i]).__name__}")
    if exact >= 0 and len(column[i]) != exact:
        raise ValueError(f"{name}[{i}] must be {exact} bytes, got {len(column[i])}")


# ---------------------------------------------------------------------------------------------
# Outbound window: sender side of one channel

_IN_FLIGHT, _RECEIVED = 1, 2


class OutboundWindow:
    """Sequence numbers, in-flight tracking, credit and retransmission for one channel.

    >>> w = OutboundWindow(max_messages=2, rto=1.0)
    >>> w.append(1, 0, b"T", b"k", 0, bytes(16), bytes(16), bytes(16), b"body", now=0.0)
    1
    >>> body = w.flush()          # one batch body holding envelope 1
    >>> w.on_ack(1, 1, [], now=0.1)
    1
    >>> w.in_flight
    0

    Credit is a *span*: at most ``max_messages`` sequence numbers from the oldest unfinished
    one, and at most ``max_bytes`` of unfinished envelopes (one envelope is always allowed when
    nothing is in flight, so a large message cannot stall forever). ``has_credit()`` false is
    the backpressure signal.
    """

    def __init__(
        self,
        max_messages: int = 1024,
        max_bytes: int = 16 << 20,
        rto: float = 0.2,
        rto_max: float = 5.0,
        backoff: float = 2.0,
        first_seq: int = 1,
    ) -> None:
        if max_messages < 1:
            raise ValueError(f"window must be >= 1, got {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not 0 < rto <= rto_max:
            raise ValueError(f"need 0 < rto <= rto_max, got rto={rto}, rto_max={rto_max}")
        if backoff < 1.0:
            raise ValueError(f"backoff must be >= 1.0, got {backoff}")
        if first_seq < 1:
            raise ValueError(f"first_seq must be >= 1, got {first_seq}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.rto = rto
        self.rto_max = rto_max
        self.backoff = backoff
        self.next_seq = first_seq
        self._base = first_seq  # every seq below is finished
        # seq -> [raw, state, deadline, retries]
        self._entries: dict[int, list[Any]] = {}
        self._pending: list[tuple[int, bytes]] = []
        self._pending_since = 0.0
        self.held = False  # set by the runtime while envelopes wait before this window: lanes stay out
        self.in_flight_bytes = 0
        self._peak = 0
        self._sent = 0
        self._acked = 0
        self._retransmitted = 0
        self._bogus = 0

    # -- credit --------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._entries)

    def has_credit(self, nbytes: int = 0) -> bool:
        """Whether one more envelope of ``nbytes`` may be appended now."""
        if self.next_seq - self._base >= self.max_messages:
            return False
        return not self._entries or self.in_flight_bytes + nbytes <= self.max_bytes

    def _admit(self, raw: bytes, now: float) -> int:
        if not self.has_credit(len(raw)):
            raise OverflowError(
                f"window full: {self.next_seq - self._base}/{self.max_messages} sequence numbers, "
                f"{self.in_flight_bytes}/{self.max_bytes} bytes in flight; check has_credit() first"
            )
        seq = self.next_seq
        self.next_seq += 1
        self._entries[seq] = [raw, _IN_FLIGHT, now + self.rto, 0]
        self.in_flight_bytes += len(raw)
        if not self._pending:
            self._pending_since = now
        self._pending.append((seq, raw))
        self._sent += 1
        if len(self._entries) > self._peak:
            self._peak = len(self._entries)
        return seq

    # -- packing -------------------------------------------------------------------------------

    def append(
        self,
        kind: int,
        flags: int,
        type: bytes,
        key: bytes,
        partition: int,
        msg_id: bytes,
        trace_id: bytes,
        cause_id: bytes,
        payload: bytes,
        now: float,
    ) -> int:
        """Sequence and queue one envelope for the next :meth:`flush`; returns its seq."""
        raw = pack_envelope(self.next_seq, kind, flags, type, key, partition, msg_id, trace_id, cause_id, payload)
        return self._admit(raw, now)

    def append_many(
        self,
        type: bytes,
        keys: Sequence[bytes] | None,
        msg_ids: Sequence[bytes],
        payloads: Sequence[bytes],
        now: float,
        *,
        kind: int = 1,
        flags: int = 0,
        partitions: int | Sequence[int] = 0,
        trace_ids: Sequence[bytes] | None = None,
        cause_ids: Sequence[bytes] | None = None,
    ) -> int:
        """Sequence and queue a batch of envelopes of one type, in order; returns how many went in.

        The batch crosses into the core once: a sender packs what it has gathered in one call
        rather than one :meth:`append` per envelope. Envelope ``i`` is built from ``keys[i]``,
        ``msg_ids[i]`` and ``payloads[i]``; every column has one item per payload.

        - ``keys`` None: every envelope is unkeyed (empty key).
        - ``partitions``: one int for all, or one per envelope.
        - ``trace_ids`` None: each envelope starts its own trace (trace id = its msg id).
        - ``cause_ids`` None: no cause (zeros).

        Every field is checked first: an invalid one (ValueError, TypeError naming the column
        and index) refuses the whole batch, and nothing goes in. Envelopes then go in, in order,
        while credit allows; the return value ``n`` says how many did. Those have the sequence
        numbers ``next_seq`` (read before the call) onwards. The rest did not fit: that is the
        backpressure signal, so append them once acks free credit.

        >>> w = OutboundWindow(max_messages=2)
        >>> ids = [bytes([i]) * 16 for i in range(3)]
        >>> w.append_many(b"T", [b"a", b"b", b"c"], ids, [b"1", b"2", b"3"], now=0.0)
        2
        >>> w.next_seq
        3
        """
        pack_envelope(0, kind, flags, type, b"", 0, _ZERO_ID, _ZERO_ID, _ZERO_ID, b"")  # kind, flags, type
        payloads = _column(payloads, -1, "payloads")
        n = len(payloads)
        msg_ids = _column(msg_ids, n, "msg_ids")
        keys = [b""] * n if keys is None else _column(keys, n, "keys")
        if isinstance(partitions, int):
            if not 0 <= partitions <= 0xFFFF:
                raise ValueError(f"partition must be in 0..65535, got {partitions}")
            parts: Sequence[int] = [partitions] * n
        else:
            parts = _column(partitions, n, "partitions")
        traces = msg_ids if trace_ids is None else _column(trace_ids, n, "trace_ids")
        causes = [_ZERO_ID] * n if cause_ids is None else _column(cause_ids, n, "cause_ids")
        raws = []
        for i in range(n):
            _bytes_item(payloads, "payloads", i, -1)
            _bytes_item(msg_ids, "msg_ids", i, ID_SIZE)
            _bytes_item(keys, "keys", i, -1)
            if len(keys[i]) > 0xFFFF:
                raise ValueError(f"key must be at most 65535 bytes, got {len(keys[i])}")
            if not isinstance(parts[i], int):
                raise TypeError(f"partitions[{i}] must be an int, got {parts[i].__class__.__name__}")
            if not 0 <= parts[i] <= 0xFFFF:
                raise ValueError(f"partitions[{i}] must be in 0..65535, got {parts[i]}")
            _bytes_item(traces, "trace_ids", i, ID_SIZE)
            _bytes_item(causes, "cause_ids", i, ID_SIZE)
            raws.append(pack_envelope(0, kind, flags, type, keys[i], parts[i], msg_ids[i], traces[i], causes[i],
                                      payloads[i]))
        for i, raw in enumerate(raws):
            if not self.has_credit(len(raw)):
                return i
            self._admit(self.next_seq.to_bytes(8, "little") + raw[8:], now)
        return n

    def append_raw(self, envelope: bytes | bytearray | memoryview, now: float) -> int:
        """Sequence an already encoded envelope (from another channel) under this window's next seq.

        ``envelope`` must hold exactly one valid envelope (:class:`MalformedFrame` otherwise).
        """
        raw = _one_envelope(envelope)
        return self._admit(self.next_seq.to_bytes(8, "little") + raw[8:], now)

    @property
    def pending(self) -> int:
        """Envelopes appended since the last :meth:`flush`."""
        return len(self._pending)

    @property
    def pending_since(self) -> float | None:
        """The ``now`` of the first envelope appended since the last :meth:`flush` (None: none was)."""
        return self._pending_since if self._pending else None

    @property
    def pending_bytes(self) -> int:
        """Bytes appended since the last :meth:`flush` (the size of the next batch body)."""
        return sum(len(raw) for _, raw in self._pending)

    def flush(self) -> bytes | None:
        """The batch body of every envelope appended since the last flush, or None."""
        if not self._pending:
            return None
        body = b"".join(raw for _, raw in self._pending)
        self._pending = []
        return body

    # -- acks ----------------------------------------------------------------------------------

    def _finish(self, seq: int) -> None:
        entry = self._entries.pop(seq)
        self.in_flight_bytes -= len(entry[0])
        self._acked += 1

    def on_ack(self, cumulative: int, received: int, ranges: Iterable[tuple[int, int]], now: float) -> int:
        """Apply an ack; returns how many envelopes it finished (freeing their credit).

        Acks of sequence numbers never sent are ignored and counted in ``bogus_acks``; stale
        and duplicate acks are harmless.
        """
        _u64(cumulative, "cumulative")
        _u64(received, "received")
        ranges = list(ranges)
        for lo, hi in ranges:
            _u64(lo, "ack range bound")
            _u64(hi, "ack range bound")
        last = self.next_seq - 1
        freed = 0
        if cumulative > last or received > last or any(hi > last for _, hi in ranges):
            self._bogus += 1
        cumulative = min(cumulative, last)
        received = min(received, last)
        for seq in range(self._base, cumulative + 1):
            if seq in self._entries:
                self._finish(seq)
                freed += 1
        for lo, hi in ranges:
            for seq in range(max(lo, self._base), min(hi, last) + 1):
                if seq in self._entries:
                    self._finish(seq)
                    freed += 1
        for seq in range(self._base, received + 1):
            entry = self._entries.get(seq)
            if entry is not None:
                entry[1] = _RECEIVED
        while self._base < self.next_seq and self._base not in self._entries:
            self._base += 1
        return freed

    def on_ack_frame(self, frame: bytes | bytearray | memoryview, offset: int, now: float) -> int:
        """Decode an encoded ack (see :func:`encode_ack`) and apply it."""
        cumulative, received, ranges = decode_ack(frame, offset)
        return self.on_ack(cumulative, received, ranges, now)

    # -- retransmission ------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time a retransmission may be due (``inf`` when none can be)."""
        unflushed = {seq for seq, _ in self._pending}
        deadlines = [e[2] for s, e in self._entries.items() if e[1] == _IN_FLIGHT and s not in unflushed]
        return min(deadlines) if deadlines else float("inf")

    def due(self, now: float) -> bytes | None:
        """A batch body of every envelope whose ack is overdue at ``now``, in seq order, or None.

        Each is rescheduled after ``rto * backoff**retries`` seconds, capped at ``rto_max``.
        Envelopes the receiver reported as arrived are not resent (their credit stays held
        until they are done), nor are envelopes not yet flushed.
        """
        out = []
        unflushed = {seq for seq, _ in self._pending}
        for seq in sorted(self._entries):
            entry = self._entries[seq]
            if entry[1] == _IN_FLIGHT and entry[2] <= now and seq not in unflushed:
                entry[3] += 1
                entry[2] = now + self._backoff_wait(entry[3])
                out.append(entry[0])
                self._retransmitted += 1
        return b"".join(out) if out else None

    def _backoff_wait(self, retries: int) -> float:
        """``min(rto * backoff**retries, rto_max)``; the power saturates instead of overflowing."""
        try:
            wait = self.rto * self.backoff**retries
        except OverflowError:
            return self.rto_max
        return min(wait, self.rto_max)

    def unacked(self) -> list[bytes]:
        """Every unfinished envelope, in seq order (to resend elsewhere when the receiver died)."""
        return [self._entries[s][0] for s in sorted(self._entries)]

    def take(self, seq: int) -> bytes | None:
        """Remove one flushed, unfinished envelope (to reroute it) and return it, or None.

        An envelope not yet flushed is left alone (None): it has not reached anyone to refuse it.
        """
        entry = self._entries.get(_u64(seq, "seq"))
        if entry is None or any(s == seq for s, _ in self._pending):
            return None
        self._entries.pop(seq)
        self.in_flight_bytes -= len(entry[0])
        while self._base < self.next_seq and self._base not in self._entries:
            self._base += 1
        return bytes(entry[0])

    def stats(self) -> WindowStats:
        return WindowStats(
            next_seq=self.next_seq,
            in_flight=len(self._entries),
            in_flight_bytes=self.in_flight_bytes,
            window=self.max_messages,
            max_bytes=self.max_bytes,
            peak_in_flight=self._peak,
            sent=self._sent,
            acked=self._acked,
            retransmitted=self._retransmitted,
            bogus_acks=self._bogus,
        )


# ---------------------------------------------------------------------------------------------
# Inbound reorder: receiver side of one channel

_BUFFERED, _RELEASED, _DONE = 1, 2, 3


class InboundReorder:
    """Releases a channel's envelopes strictly in sequence and says what to acknowledge.

    Arrivals may come in any order and more than once. An arrival more than ``window``
    sequence numbers past the last finished one is refused (``BEYOND_WINDOW``), so memory is
    bounded whatever the sender does.

    >>> r = InboundReorder(window=8)
    >>> r.accept(2, "b"), r.accept(1, "a"), r.accept(1, "a")
    (0, 0, 1)
    >>> r.release()
    ['a', 'b']
    >>> r.complete(2); r.ack()
    True
    (0, 2, [(2, 2)])
    """

    def __init__(self, window: int = 1024, first_seq: int = 1) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if first_seq < 1:
            raise ValueError(f"first_seq must be >= 1, got {first_seq}")
        self.window = window
        self.done_upto = first_seq - 1
        self.released_upto = first_seq - 1
        self._state: dict[int, int] = {}
        self._items: dict[int, Any] = {}
        self._accepted = self._duplicates = self._beyond = self._released = self._completed = 0
        self._ack_dirty = False
        self._ranges_from = 0  # where the next ack's ranges start (0: just above cumulative)

    def accept(self, seq: int, item: Any) -> int:
        """Offer one arrival; returns ACCEPTED, DUPLICATE or BEYOND_WINDOW."""
        _u64(seq, "seq")
        if seq <= self.done_upto or seq in self._state:
            self._duplicates += 1
            self._ack_dirty = True  # the sender missed our ack: say it again
            return DUPLICATE
        if seq > self.done_upto + self.window:
            self._beyond += 1
            return BEYOND_WINDOW
        self._state[seq] = _BUFFERED
        self._items[seq] = item
        self._accepted += 1
        return ACCEPTED

    def release(self) -> list[Any]:
        """The arrivals that are next in sequence, in order; each is released once."""
        out = []
        seq = self.released_upto + 1
        while self._state.get(seq) == _BUFFERED:
            self._state[seq] = _RELEASED
            out.append(self._items.pop(seq))
            seq += 1
        if out:
            self.released_upto = seq - 1
            self._released += len(out)
            self._ack_dirty = True
        return out

    def feed(self, frame: bytes | bytearray | memoryview, offset: int = 0) -> list[Envelope]:
        """Accept every envelope of a batch body and return those now released, in order.

        A malformed body raises :class:`MalformedFrame` and accepts nothing.
        """
        for env in parse_envelopes(frame, offset):
            self.accept(env.seq, env)
        return self.release()

    def complete(self, seq: int) -> bool:
        """Mark a released seq as done (handled, and its effects safe). False if not applicable."""
        if self._state.get(_u64(seq, "seq")) != _RELEASED:
            return False
        self._state[seq] = _DONE
        self._completed += 1
        self._ack_dirty = True
        while self._state.get(self.done_upto + 1) == _DONE:
            del self._state[self.done_upto + 1]
            self.done_upto += 1
        return True

    def complete_many(self, seqs: Iterable[int]) -> int:
        """Complete several seqs; returns how many changed state."""
        return sum(1 for s in seqs if self.complete(s))

    def complete_envelopes(self, envelopes: Iterable[Envelope]) -> int:
        """Complete the seq of each envelope (as returned by :meth:`feed`); returns how many changed state."""
        return sum(1 for e in envelopes if self.complete(e.seq))

    def ack(self) -> tuple[int, int, list[tuple[int, int]]]:
        """``(cumulative done, received, done ranges above cumulative)``, at most MAX_ACK_RANGES.

        When more ranges are done than an ack carries, successive acks take turns: each
        :meth:`ack_frame` starts where the last one stopped, then from the bottom again. Always
        the lowest ones, a sender would never hear of the envelopes done above them (one whose
        partition waits for a hand-over can hold the cumulative ack for seconds) and would send
        them all again, to be run twice, should either end start a new life meanwhile."""
        return self._ack(advance=False)

    def _ack(self, advance: bool) -> tuple[int, int, list[tuple[int, int]]]:
        ranges: list[tuple[int, int]] = []
        lo = None
        for seq in range(max(self.done_upto + 1, self._ranges_from), self.released_upto + 2):
            if self._state.get(seq) == _DONE:
                if lo is None:
                    lo = seq
            elif lo is not None:
                ranges.append((lo, seq - 1))
                lo = None
                if len(ranges) == MAX_ACK_RANGES:
                    break
        if advance:
            self._ranges_from = ranges[-1][1] + 1 if len(ranges) == MAX_ACK_RANGES else 0
        return self.done_upto, self.released_upto, ranges

    @property
    def ack_pending(self) -> bool:
        """Whether something changed since the last :meth:`ack_frame`."""
        return self._ack_dirty

    def ack_frame(self) -> bytes:
        """The encoded :meth:`ack`; clears :attr:`ack_pending` (unless it filled its ranges: then
        more may be done above them, and the next ack says so)."""
        cumulative, received, ranges = self._ack(advance=True)
        self._ack_dirty = len(ranges) == MAX_ACK_RANGES
        return encode_ack(cumulative, received, ranges)

    @property
    def buffered(self) -> int:
        return sum(1 for s in self._state.values() if s == _BUFFERED)

    @property
    def in_progress(self) -> int:
        """Released but not yet done."""
        return sum(1 for s in self._state.values() if s == _RELEASED)

    def stats(self) -> ReorderStats:
        return ReorderStats(
            released_upto=self.released_upto,
            done_upto=self.done_upto,
            buffered=self.buffered,
            window=self.window,
            accepted=self._accepted,
            duplicates=self._duplicates,
            beyond_window=self._beyond,
            released=self._released,
            completed=self._completed,
        )


# ---------------------------------------------------------------------------------------------
# Dedup window


def _dedup_key(value: bytes) -> bytes:
    value = _as_bytes(value)
    return value if len(value) == ID_SIZE else hash128(value)


class DedupWindow:
    """Remembers ids for ``ttl`` seconds and at most ``max_entries``; forgets the oldest first.

    An id inserted at ``t`` is a duplicate while ``now < t + ttl`` (compared exactly so, in
    floating point), and new again from ``now == t + ttl``. Ids of 16 bytes are kept as they
    are; other lengths (idempotency keys) are reduced with :func:`hash128`. Entries carry the
    partition (0..65535) they belong to, so they can be exported with it.

    >>> d = DedupWindow(ttl=10.0, max_entries=1000)
    >>> d.insert(b"a" * 16, now=0.0), d.insert(b"a" * 16, now=5.0), d.insert(b"a" * 16, now=10.0)
    (True, False, True)
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        # key -> (time, partition), in insertion order: the oldest first. An OrderedDict, not a
        # dict: next(iter(dict)) walks past every slot deleted at the front since the last resize,
        # which makes expiring oldest-first quadratic; the OrderedDict's linked list does not.
        self._entries: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        self._inserted = self._duplicates = self._expired = self._evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: bytes, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and now < entry[0] + self.ttl

    def insert(self, id: bytes, now: float, partition: int = 0) -> bool:
        """Check and insert: True if ``id`` is new (now remembered), False if a duplicate."""
        _check_partition(partition)
        key = _dedup_key(id)
        self.expire(now)
        if self._live(key, now):
            self._duplicates += 1
            return False
        self._entries.pop(key, None)  # an expired leftover: forget it, then insert anew
        self._add(key, now, partition)
        return True

    def _add(self, key: bytes, t: float, partition: int) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            self._evicted += 1
        self._entries[key] = (t, partition)
        self._inserted += 1

    def insert_many(self, ids: Iterable[bytes], now: float, partition: int = 0) -> list[bool]:
        """:meth:`insert` for each id, in order."""
        _check_partition(partition)
        return [self.insert(i, now, partition) for i in ids]

    def insert_envelopes(self, envelopes: Iterable[Envelope], now: float) -> list[bool]:
        """:meth:`insert` of each envelope's ``msg_id`` under its partition."""
        return [self.insert(e.msg_id, now, e.partition) for e in envelopes]

    def contains(self, id: bytes, now: float) -> bool:
        """Whether ``id`` is remembered at ``now`` (does not insert)."""
        return self._live(_dedup_key(id), now)

    def remove(self, id: bytes) -> bool:
        """Forget one id (a failed attempt that must be allowed again). False if absent."""
        return self._entries.pop(_dedup_key(id), None) is not None

    def expire(self, now: float) -> int:
        """Forget entries older than ``ttl`` from the oldest; returns how many."""
        n = 0
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if now < entries[key][0] + self.ttl:
                break
            del entries[key]
            n += 1
        self._expired += n
        return n

    def export_partition(self, partition: int) -> bytes:
        """The entries of one partition, encoded, so they can move with the partition.

        ``u32 count | count x (16s id, f64 time)``, oldest first.
        """
        _check_partition(partition)
        records = [DEDUP_RECORD.pack(k, t) for k, (t, p) in self._entries.items() if p == partition]
        return len(records).to_bytes(4, "little") + b"".join(records)

    def import_entries(self, blob: bytes | bytearray | memoryview, partition: int) -> int:
        """Add exported entries under ``partition`` (keeping their times); returns how many were new.

        An id already present (even expired) is kept as it is. The import may evict the oldest
        entries when ``max_entries`` is reached; it does not expire anything by itself.
        """
        _check_partition(partition)
        view = memoryview(blob)
        if len(view) < 4:
            raise MalformedFrame("truncated", "a dedup export needs at least 4 bytes")
        n = int.from_bytes(view[:4], "little")
        if len(view) != 4 + n * DEDUP_RECORD.size:
            raise MalformedFrame("truncated", f"dedup export of {n} entries needs {4 + n * DEDUP_RECORD.size} bytes")
        added = 0
        for i in range(n):
            key, t = DEDUP_RECORD.unpack_from(view, 4 + i * DEDUP_RECORD.size)
            if key not in self._entries:
                self._add(key, t, partition)
                added += 1
        return added

    def drop_partition(self, partition: int) -> int:
        """Forget every entry of one partition (it moved away); returns how many."""
        _check_partition(partition)
        gone = [k for k, (_, p) in self._entries.items() if p == partition]
        for k in gone:
            del self._entries[k]
        return len(gone)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the entries (the dict, its keys and values): an estimate, for comparison."""
        size = sys.getsizeof(self._entries)
        for k, v in self._entries.items():
            size += sys.getsizeof(k) + sys.getsizeof(v) + sys.getsizeof(v[0])
        return size

    def stats(self) -> DedupStats:
        return DedupStats(
            entries=len(self._entries),
            max_entries=self.max_entries,
            ttl=self.ttl,
            inserted=self._inserted,
            duplicates=self._duplicates,
            expired=self._expired,
            evicted=self._evicted,
        )


# ---------------------------------------------------------------------------------------------
# Keyed dispatch


class KeyedDispatch:
    """At most one message per key in progress; the others wait in arrival order.

    >>> d = KeyedDispatch()
    >>> d.admit(b"k", "m1"), d.admit(b"k", "m2"), d.admit(b"j", "m3")
    (True, False, True)
    >>> d.done(b"k")     # m1 finished: m2 is next for b"k"
    'm2'
    >>> d.done(b"k") is None
    True
    """

    def __init__(self) -> None:
        self._waiting: dict[bytes, deque[Any]] = {}
        self.queued = 0

    def admit(self, key: bytes, item: Any) -> bool:
        """True: the key was idle and ``item`` may run now. False: it waits behind the key's current one."""
        if item is None:
            raise ValueError("item must not be None")
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = deque()
            return True
        waiting.append(item)
        self.queued += 1
        return False

    def done(self, key: bytes) -> Any:
        """The key's current item finished: returns its next item (now in progress) or None (idle)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            raise KeyError(f"key {key!r} has nothing in progress")
        if waiting:
            self.queued -= 1
            return waiting.popleft()
        del self._waiting[key]
        return None

    def busy(self, key: bytes) -> bool:
        return key in self._waiting

    @property
    def busy_keys(self) -> int:
        return len(self._waiting)

    def drain_keys(self, keys: Iterable[bytes]) -> list[Any]:
        """Remove and return the waiting items of some keys (their partition moved away)."""
        out: list[Any] = []
        for k in keys:
            waiting = self._waiting.get(k)
            if waiting:
                out.extend(waiting)
                self.queued -= len(waiting)
                waiting.clear()
        return out


# ---------------------------------------------------------------------------------------------
# Lanes: the runtime's per-message loops as core entry points, so that emitting an event and
# handling a received batch cross into the compiled core once. They call Python only for what
# must be Python: the codec, the handler, the clock the caller passes in.


class IdSource:
    """Message ids of one node: an 8-byte random prefix and a counter (16 bytes, unique).

    >>> ids = IdSource(bytes(8))
    >>> ids.next().hex()
    '00000000000000000100000000000000'
    """

    def __init__(self, prefix: bytes) -> None:
        if len(prefix) != 8:
            raise ValueError(f"prefix must be 8 bytes, got {len(prefix)}")
        self._prefix = bytes(prefix)
        self._n = 0

    def next(self) -> bytes:
        """A new id."""
        self._n += 1
        return self._prefix + self._n.to_bytes(8, "little")


EMIT_END = 0  # every event from ``start`` on went in
EMIT_OTHER = 1  # events[index] is of another type (the caller takes it to its own lane)
EMIT_BLOCKED = 2  # events[index] did not go in (no credit, a held window, too large): the caller waits
EMIT_INVALID = 3  # events[index] fails its type's check: nothing of this call went in


# The lanes' part of the wire contract (choreo.wire takes its constants from here): an event's
# envelope kind, the flags of envelopes that wait on no key, and the flag of a replayed dead
# letter (set by its own node only: the lane leaves one from the wire to the caller, who refuses it).
KIND_EVENT = 1
FLAG_UNKEYED = 0x01
FLAG_BROADCAST = 0x02
FLAG_REPLAY = 0x04
SPAN_KEY_BYTES = 128  # bytes of a message's key a span keeps (keys may be 64 KiB; the span ring is not)


def fields_fit(obj: Any, fields: tuple[tuple[str, tuple[type, ...] | None], ...]) -> bool:
    """Every field's value is of exactly one of its declared simple types (``fields``:
    ``messages.simple_fields``), so decoding ``obj``'s encoding could only pass; False: check it
    in full (the emit lane's check of an event, ``StateView.put``'s of a value)."""
    for name, types in fields:
        if types is not None and type(getattr(obj, name)) not in types:
            return False
    return True


class EmitLane:
    """Where one event type goes from this producer: key, partition, window, envelope.

    ``windows`` holds the window of each partition's owner when the type is keyed by
    ``key_name`` (one per partition), or the candidate instances' windows when it is not (the
    one with the fewest envelopes in flight is chosen). :meth:`emit` encodes the event and
    writes its envelope straight into that window's pending batch; it returns None instead
    when the window lacks credit, is ``held`` by the runtime, the body exceeds ``max_bytes`` or
    ``check(body)`` raises (the body does not match its type: the caller then takes its slow
    path, which waits or explains). After an emit, ``last`` is the index of the window used,
    ``full`` whether its batch should be flushed now, and ``emitted`` counts what went in.

    The runtime's side, all optional: with ``channels`` (one per window), the lane also does
    what follows a write: a full batch goes to ``send_full(channel)`` at once; a window's first
    pending envelope puts its channel in the ``dirty`` dict, calling ``schedule()`` first when
    the dict was empty (a flush is due). ``clock()`` gives the time when :meth:`emit` is not
    given one, read once per batch: an envelope that joins a window's pending batch takes the
    time of the batch's first (the batch leaves at the next flush, so its retransmission timers
    count from its start, not from each write; one clock reading per batch instead of per event,
    on the path an application calls most); ``cls`` is the lane's message class (for :meth:`emit_many`); ``idempotency(event)``
    gives the id of an event whose type declares an idempotency key. ``fields`` (``(name, types)``
    pairs, ``types`` None for a field of any type) lets the lane skip ``check``: when every field's
    value is exactly of one of its types, the check could only pass; otherwise it runs.

    ``encode_into(message, buffer, offset)``, optional, is ``encode`` into a bytearray from
    ``offset`` (msgspec's ``Encoder.encode_into``): the compiled lane encodes every body into one
    buffer it keeps (no bytes object per message; ``emit_many``'s bodies one after another) and
    copies it into the window from there; this twin makes bytes with ``encode`` either way.

    A lane of another ``kind`` (a command or query type) writes with :meth:`request`: the caller's
    ids (the message's, its trace's and its cause's), ``on_done`` put in the channel's ``watch``
    under the envelope's seq (called when it is acknowledged), and the channel's ``urgent`` flag
    set (its batch's frame tells the receiver to take it first).
    """

    def __init__(
        self,
        tname: bytes,
        key_name: str | None,
        partitions: int,
        windows: list[OutboundWindow],
        encode: Any,
        key_bytes: Any,
        ids: IdSource,
        max_batch: int,
        max_batch_bytes: int,
        max_bytes: int,
        check: Any = None,
        channels: list[Any] | None = None,
        dirty: dict[Any, None] | None = None,
        schedule: Any = None,
        send_full: Any = None,
        clock: Any = None,
        cls: type | None = None,
        idempotency: Any = None,
        fields: tuple[tuple[str, tuple[type, ...] | None], ...] | None = None,
        kind: int = KIND_EVENT,
        encode_into: Any = None,
    ) -> None:
        if not windows:
            raise ValueError("an emit lane needs at least one window")
        if key_name is not None and len(windows) != partitions:
            raise ValueError(f"a keyed lane needs one window per partition: {len(windows)} for {partitions}")
        if not 1 <= len(tname) <= 255:
            raise ValueError("type must be 1 to 255 bytes")
        if channels is not None and (len(channels) != len(windows) or dirty is None or schedule is None
                                     or send_full is None):
            raise ValueError("channels need one per window, and dirty, schedule and send_full")
        self._tname = tname
        self._key_name = key_name
        self._partitions = partitions
        self._windows = windows
        self._encode = encode
        self._key_bytes = key_bytes
        self._ids = ids
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._max_bytes = max_bytes
        self._check = check
        self._channels = channels
        self._dirty = dirty
        self._schedule = schedule
        self._send_full = send_full
        self._clock = clock
        self._cls = cls
        self._idempotency = idempotency
        if fields is not None:
            for f in fields:
                if type(f) is not tuple or len(f) != 2 or type(f[0]) is not str or (
                        f[1] is not None and type(f[1]) is not tuple):
                    raise TypeError("fields must be (name, tuple of types or None) pairs")
        self._fields = fields
        self._kind = kind
        self.last = -1
        self.full = False
        self.emitted = 0
        self._rr = 0

    def _fields_fit(self, event: Any) -> bool:
        """Every field's value is of exactly one of its declared simple types (then the check of the
        body could only pass); False sends the body to the full check."""
        return fields_fit(event, self._fields)  # type: ignore[arg-type]

    def _valid(self, event: Any, payload: bytes) -> bool:
        if len(payload) > self._max_bytes:
            return False
        if self._fields is not None and self._fields_fit(event):
            return True
        if self._check is not None:
            try:
                self._check(payload)
            except Exception:
                return False  # the slow path names the field that does not match its type
        return True

    def _write(
        self, event: Any, payload: bytes, now: float | None, msg_id: bytes | None, trace_id: bytes | None = None,
        cause_id: bytes | None = None, on_done: Any = None,
    ) -> bytes | None:
        """Route and write one encoded message; its id, or None (it did not go in). ``now``
        None: the time its window's batch began, or the clock's when this one begins it."""
        if self._key_name is not None:
            value = getattr(event, self._key_name)
            kb = value.encode() if type(value) is str else self._key_bytes(value)
            if len(kb) > 0xFFFF:
                return None
            partition = partition_of(kb, self._partitions)
            index, flags = partition, 0
            w = self._windows[index]
        else:
            kb, partition, flags = b"", 0, FLAG_UNKEYED
            index, w = -1, None
            self._rr += 1  # equally loaded candidates take turns
            for j in range(len(self._windows)):
                i = (j + self._rr) % len(self._windows)
                cand = self._windows[i]
                if not cand.held and (w is None or cand.in_flight < w.in_flight):
                    index, w = i, cand
            if w is None:
                return None
        size = HEADER_SIZE + len(self._tname) + len(kb) + len(payload)
        if w.held or not w.has_credit(size):
            return None
        if msg_id is None:
            msg_id = self._ids.next()
        elif type(msg_id) is not bytes or len(msg_id) != ID_SIZE:
            raise ValueError("msg_id must be 16 bytes")
        for name, value in (("trace_id", trace_id), ("cause_id", cause_id)):
            if value is not None and (type(value) is not bytes or len(value) != ID_SIZE):
                raise ValueError(f"{name} must be 16 bytes")
        if now is None:
            now = w.pending_since if w.pending else self._clock()
        seq = w.append(self._kind, flags, self._tname, kb, partition, msg_id, trace_id or msg_id, cause_id or _ZERO_ID,
                       payload, now)
        self.last = index
        self.full = w.pending >= self._max_batch or w.pending_bytes >= self._max_batch_bytes
        self.emitted += 1
        if self._channels is not None:
            ch = self._channels[index]
            if self._kind != KIND_EVENT:
                ch.urgent = True  # its batch's frame says so: the receiver takes it first
            if on_done is not None:
                ch.watch[seq] = on_done  # called when its receiver acknowledges it
            if self.full:
                self._send_full(ch)  # the batch leaves now
            elif w.pending == 1:  # the window's first pending envelope: its channel joins the dirty set
                if not self._dirty:
                    self._schedule()  # nothing was waiting for a flush: one is due
                self._dirty[ch] = None  # type: ignore[index]
        return msg_id

    def emit(self, event: Any, now: float | None = None, msg_id: bytes | None = None) -> bytes | None:
        """Write one event into its window; returns its id, or None (caller: take the slow path)."""
        payload = self._encode(event)
        if not self._valid(event, payload):
            return None
        if msg_id is None and self._idempotency is not None:
            msg_id = self._idempotency(event)
        return self._write(event, payload, now, msg_id)

    def request(
        self, message: Any, msg_id: bytes | None, trace_id: bytes | None = None, cause_id: bytes | None = None,
        on_done: Any = None,
    ) -> bytes | None:
        """Write one command or query (see the class docstring); its id, or None (caller: take the slow path)."""
        if self._channels is None or self._clock is None:
            raise ValueError("request needs the lane's channels and clock")
        payload = self._encode(message)
        if not self._valid(message, payload):
            return None
        return self._write(message, payload, None, msg_id, trace_id, cause_id, on_done)

    def emit_many(self, events: list[Any], start: int, ids: list[bytes]) -> tuple[int, int]:
        """Write ``events[start:]`` in order while they are of this lane's type and go in.

        Every event of the lane's type from ``start`` on is checked first: if one fails, nothing
        is written. Returns ``(index, status)`` (``EMIT_*``): where it stopped and why; the id of
        every event written is appended to ``ids``.
        """
        if self._cls is None or self._clock is None:
            raise ValueError("emit_many needs the lane's message class (cls=) and clock")
        n = len(events)
        end = start
        payloads = []
        while end < n and type(events[end]) is self._cls:
            payload = self._encode(events[end])
            if not self._valid(events[end], payload):
                return end, EMIT_INVALID
            payloads.append(payload)
            end += 1
        now = self._clock()
        for i in range(start, end):
            msg_id = self._idempotency(events[i]) if self._idempotency is not None else None
            out_id = self._write(events[i], payloads[i - start], now, msg_id)
            if out_id is None:
                return i, EMIT_BLOCKED
            ids.append(out_id)
        return end, EMIT_END if end == n else EMIT_OTHER


class EmitTable:
    """A sender's fast path in one call: the lane of the event's type, while nothing it depends on
    changed (``node.try_emit`` calls :meth:`emit` and nothing else when it succeeds).

    :meth:`put` registers the lane of an event class (until :meth:`clear`: the router clears
    the table whenever the membership changes). :meth:`emit` writes an event through its
    class's lane (:meth:`EmitLane.emit`, at the lane's clock, with the event's idempotency id)
    and returns the lane's answer: its id, or None. It also returns None, writing nothing, when
    no lane is registered for ``type(event)``, while ``holds`` (a dict: messages held per key)
    is not empty, or once ``life.fatal`` is set. None always means: take the general path,
    which knows why. :meth:`try_emit` is ``node.try_emit`` itself once the node runs: the id
    :meth:`emit` returns, else (and always with a ``traceparent``) what ``fallback(event,
    traceparent)`` returns, the general path (which raises when the event cannot go).

    >>> class Life: fatal = None
    >>> table = EmitTable({}, Life())
    >>> table.emit(object()) is None  # no lane for it
    True
    """

    def __init__(self, holds: dict[Any, Any], life: Any) -> None:
        if type(holds) is not dict:
            raise TypeError("holds must be a dict")
        self._lanes: dict[type, EmitLane] = {}
        self._holds, self._life = holds, life
        self.fallback: Callable[[Any, str | None], bytes] | None = None

    def put(self, cls: type, lane: EmitLane | None) -> None:
        """``cls``'s events go through ``lane`` (None: never here) until :meth:`clear`."""
        if not isinstance(cls, type):
            raise TypeError("cls must be a class")
        if lane is not None and type(lane) is not EmitLane:
            raise TypeError("lane must be an EmitLane or None")
        if lane is None:
            self._lanes.pop(cls, None)
        else:
            self._lanes[cls] = lane

    def clear(self) -> None:
        self._lanes.clear()

    def __len__(self) -> int:
        return len(self._lanes)

    def emit(self, event: Any) -> bytes | None:
        """Write ``event`` through its type's lane; its id, or None: take the general path."""
        lane = self._lanes.get(type(event))
        if lane is None or self._holds or self._life.fatal is not None:
            return None
        return lane.emit(event)

    def try_emit(self, event: Any, *, traceparent: str | None = None) -> bytes:
        """:meth:`emit`'s id, else (and with a ``traceparent``) what ``fallback`` returns."""
        if traceparent is None:
            msg_id = self.emit(event)
            if msg_id is not None:
                return msg_id
        if self.fallback is None:
            raise ValueError("try_emit needs the table's fallback")
        return self.fallback(event, traceparent)


class SpanRing:
    """The ``maxlen`` most recent spans, oldest first, read like a ``deque`` of span tuples.

    ``append(span)`` keeps a tuple in :mod:`choreo.tracing`'s layout as the newest (the oldest
    goes when the ring is full); ``record(env, type_name, name, received, started, finished)``
    keeps what the fast lane records of a handled envelope (outcome ``"ok"``, attempt 1, the
    ids as one 48-byte string, at most ``SPAN_KEY_BYTES`` of the key). Reading (``len``, an
    index, iteration either way) gives tuples; reading one twice gives the same object (the
    compiled ring builds a recorded span's tuple at its first read and keeps it). ``total``
    counts every span ever kept.

    >>> ring = SpanRing(2)
    >>> for n in range(3):
    ...     ring.append((n,))
    >>> list(ring), ring[-1], ring.total
    ([(1,), (2,)], (2,), 3)
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self.total = 0
        self._spans: deque[tuple[Any, ...]] = deque(maxlen=maxlen)

    def append(self, span: tuple[Any, ...]) -> None:
        if type(span) is not tuple:
            raise TypeError(f"a span is a tuple, got {type(span).__name__}")
        self._spans.append(span)
        self.total += 1

    def record(self, env: Envelope, type_name: str, name: str, received: float, started: float, finished: float) -> None:
        self.append((env.msg_id + env.trace_id + env.cause_id, type_name, name, float(received), float(started),
                     float(finished), "ok", None, 1, env.key[:SPAN_KEY_BYTES], env.partition))

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        if not -len(self._spans) <= i < len(self._spans):
            raise IndexError("span ring index out of range")
        return self._spans[i]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._spans)

    def __reversed__(self) -> Iterator[tuple[Any, ...]]:
        return reversed(self._spans)

    def clear(self) -> None:
        self._spans.clear()


LANE_END = 0  # every envelope handled
LANE_SLOW = 1  # envs[index] is not for the lane: the caller takes it
LANE_DUPLICATE = 2  # envs[index] is a duplicate (its id was seen): the caller answers it
LANE_BAD = 3  # envs[index]'s body failed to decode (its id is now remembered)
LANE_FAILED = 4  # envs[index]'s handler raised: (message, error, started) come back
LANE_EFFECTS = 5  # envs[index]'s handler emitted or sent: (message, ctx, started) come back
LANE_BATCH_FAILED = 6  # a batch handler raised on envs[index:index + len(messages)]: (messages, error, started)
LANE_RESULT = 7  # envs[index]'s command or query returned, and its answer needs the caller: (message, (ctx, result), started)
LANE_LATE = 8  # the clock passed ``until`` before envs[index]'s handler: the caller looks at the time first; started is that reading


class FastLane:
    """Runs received messages whose handler is a plain function, in one loop.

    An entry per type says how: its decoder, its :class:`DedupWindow` (or None), the handler
    function and whether it takes a context, or is a *batch* handler (it takes a list of
    messages, never a context), and the envelope kind it takes (events by default). :meth:`run`
    goes through a released batch in order and stops at the first envelope that needs the
    caller (not of a registered type and kind, flagged as a replay, a keyed one whose partition
    is not routed here (``gate``) or whose key is busy in ``keyed``, a duplicate, a body that
    fails to decode, a handler that raised or emitted), returning where and why. A command's or
    query's result goes to ``answer(channel, env, result)``, which answers its caller (True) or
    says it cannot travel as it is (False, nothing done); one that emitted, sent or wrote state,
    or whose answer cannot travel, comes back as ``LANE_RESULT``. A batch handler is called once per run of consecutive envelopes of its type that
    the lane can take (each one deduplicated and decoded first; the run ends before the first
    that cannot go); if it raises, the whole run comes back (``LANE_BATCH_FAILED``) for the
    caller to run one by one. Each handled message is completed in ``reorder`` and, when
    ``spans_append`` is given, recorded as a span tuple.
    """

    ok = "ok"

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, ...]] = {}

    def set(
        self, type_name: str, decode: Any, window: DedupWindow | None, fn: Any, name: str, takes_context: bool,
        handler: Any = None, batch: bool = False, kind: int = KIND_EVENT,
    ) -> None:
        """Let the lane handle ``type_name``; ``window`` is its DedupWindow (None: no dedup);
        ``batch``: ``fn`` takes a list of messages (every run of them), never a context;
        ``kind``: the envelope kind it takes (a command's or query's result goes to ``run``'s ``answer``)."""
        if window is not None and not isinstance(window, DedupWindow):
            raise TypeError("window must be a DedupWindow or None")
        if batch and takes_context:
            raise ValueError("a batch handler takes no context")
        if batch and kind != KIND_EVENT:
            raise ValueError("only an event handler takes batches")
        self._entries[type_name] = (decode, window, fn, name, takes_context, handler, batch, kind)

    def forget(self, type_name: str) -> None:
        self._entries.pop(type_name, None)

    def handles(self, type_name: str) -> bool:
        return type_name in self._entries

    @staticmethod
    def _admissible(env: Any, gate: bytearray | None, keyed: KeyedDispatch) -> bool:
        if env.flags & FLAG_REPLAY:
            return False
        if not env.flags & (FLAG_UNKEYED | FLAG_BROADCAST):
            if gate is not None and (env.partition >= len(gate) or not gate[env.partition]):
                return False
            if keyed.busy_keys and keyed.busy(env.key):
                return False
        return True

    def _done(self, env: Any, name: str, reorder: InboundReorder, spans_append: Any, received: float,
              t0: float, t1: float) -> None:
        if isinstance(spans_append, SpanRing):
            spans_append.record(env, env.type, name, received, t0, t1)
        elif spans_append is not None:
            # choreo.tracing's span layout; the three ids as one bytes object (msg_id | trace_id |
            # cause_id, as on the wire), split when the span is read
            spans_append(
                (env.msg_id + env.trace_id + env.cause_id, env.type, name, received, t0, t1, self.ok, None, 1,
                 env.key[:SPAN_KEY_BYTES], env.partition)
            )
        reorder.complete(env.seq)

    def run(
        self,
        envs: list[Any],
        start: int,
        reorder: InboundReorder,
        now: float,
        clock: Any,
        received: float,
        gate: bytearray | None,
        keyed: KeyedDispatch,
        spans_append: Any,
        ctx: Any,
        answer: Any = None,
        channel: Any = None,
        until: float = math.inf,
    ) -> tuple[int, int, int, Any, Any, float]:
        """Handle ``envs[start:]`` in order until one needs the caller (see the class docstring).

        Returns ``(handled, index, status, a, b, started)``: how many were handled here, where it
        stopped and why (``LANE_*``), and for FAILED/EFFECTS/RESULT the decoded message, the error
        (FAILED), the context (EFFECTS) or ``(context, result)`` (RESULT), and when the handler
        started (for BATCH_FAILED the messages of the batch that raised). ``clock()`` is read once
        per message; the compiled lane also takes the clock as a C function in a capsule
        (``choreo.core.lane_clock``). Once the clock reads ``until`` or later, no handler starts:
        ``LANE_LATE``, with that reading (a process stopped and continued: what it held may be void).
        """
        handled = 0
        n = len(envs)
        i = start
        t1 = clock()  # one reading per message: each one's start is the previous one's end
        while i < n:
            if t1 >= until:
                return handled, i, LANE_LATE, None, None, t1
            env = envs[i]
            entry = self._entries.get(env.type)
            if entry is None:
                return handled, i, LANE_SLOW, None, None, 0.0
            decode, window, fn, name, takes_context, handler, batch, kind = entry
            if env.kind != kind or (answer is None and kind != KIND_EVENT):
                return handled, i, LANE_SLOW, None, None, 0.0
            if not self._admissible(env, gate, keyed):
                return handled, i, LANE_SLOW, None, None, 0.0
            if batch:
                messages = []
                j = i
                stop_at, stop_status = -1, LANE_END
                while j < n:
                    envj = envs[j]
                    if self._entries.get(envj.type) is not entry or envj.kind != KIND_EVENT:
                        break
                    if not self._admissible(envj, gate, keyed):
                        break
                    if window is not None and not window.insert(envj.msg_id, now, envj.partition):
                        stop_at, stop_status = j, LANE_DUPLICATE
                        break
                    try:
                        message = decode(envj.payload)
                    except Exception:
                        stop_at, stop_status = j, LANE_BAD
                        break
                    messages.append(message)
                    j += 1
                if messages:
                    t0 = t1
                    try:
                        fn(messages)
                    except Exception as exc:
                        return handled, i, LANE_BATCH_FAILED, messages, exc, t0
                    t1 = clock()
                    while i < j:
                        self._done(envs[i], name, reorder, spans_append, received, t0, t1)
                        i += 1
                    handled += len(messages)
                if stop_at >= 0:
                    return handled, stop_at, stop_status, None, None, 0.0
                continue
            if window is not None and not window.insert(env.msg_id, now, env.partition):
                return handled, i, LANE_DUPLICATE, None, None, 0.0
            try:
                message = decode(env.payload)
            except Exception:
                return handled, i, LANE_BAD, None, None, 0.0
            t0 = t1
            try:
                if takes_context:
                    ctx.envelope = env
                    ctx.handler = handler
                    ctx.writes = None
                    result = fn(message, ctx)
                else:
                    result = fn(message)
            except Exception as exc:
                return handled, i, LANE_FAILED, message, exc, t0
            if kind != KIND_EVENT:
                # a command's or query's answer: here only when it has no effects and can travel
                # (state writes are the caller's too: a result is logged with them)
                if (takes_context and (ctx.outputs or ctx.writes is not None)) or not answer(channel, env, result):
                    return handled, i, LANE_RESULT, message, (ctx, result), t0
            # emits, sends, or state writes that need a job (a standby must confirm them): the
            # caller takes over; other state writes are applied here, as the handler succeeded
            elif takes_context and (ctx.outputs or (ctx.writes is not None and ctx.state.commit(env))):
                return handled, i, LANE_EFFECTS, message, ctx, t0
            t1 = clock()
            self._done(env, name, reorder, spans_append, received, t0, t1)
            handled += 1
            i += 1
        return handled, n, LANE_END, None, None, 0.0


# ---------------------------------------------------------------------------------------- state

_KIND_QUERY = 3  # (choreo.wire.KIND_QUERY)


class StateView:
    """``ctx.state``: the values of declared types for the message's key (``choreo.State``).

    One view serves one handler context for every message it sees (the compiled lane reuses its
    context): each call reads the message from ``ctx.envelope``. Writes are buffered in
    ``ctx.writes`` (type index -> body, None for a delete) and applied by :meth:`commit` once
    the handler returned without raising. ``tables[t][partition]`` maps a key to the body of
    its value of type ``t``; ``index`` maps a declared type to ``t``; ``decoders[t]`` decodes
    (and so checks) a body; ``encode`` encodes a value. Every refusal goes through
    ``fail(what, t, detail)``, which raises the caller's error (``what``: ``"no_key"``,
    ``"read_only"``, ``"undeclared"``, ``"invalid"``, ``"too_large"``, ``"too_large_total"``).
    ``standby[partition]``, when given, is not None where a standby must get a write before its
    input is acknowledged: :meth:`commit` leaves those writes to the caller. ``log(partition,
    key, writes)``, when given, hears of every write :meth:`commit` applies (a durable node's store).
    ``simple[t]``, when given and not None, is type ``t``'s ``messages.simple_fields``: a value
    whose fields all have exactly those types is written without decoding its body to check it
    (that check could only pass).
    """

    def __init__(
        self,
        ctx: Any,
        tables: list[list[dict[bytes, bytes]]],
        index: dict[type, int],
        decoders: list[Any],
        encode: Any,
        limit: int,
        fail: Any,
        standby: list[Any] | None = None,
        log: Any = None,
        simple: list[Any] | None = None,
    ) -> None:
        self._ctx = ctx
        self._log = log
        self._simple = simple
        self._tables = tables
        self._index = index
        self._decoders = decoders
        self._encode = encode
        self._limit = limit
        self._fail = fail
        self._standby = standby

    def _key_of(self, env: Any) -> None:
        if env.flags & (FLAG_UNKEYED | FLAG_BROADCAST):
            self._fail("no_key", None, None)

    def _type(self, cls: Any) -> int:
        t = self._index.get(cls)
        if t is None:
            self._fail("undeclared", cls, None)
        return t  # type: ignore[no-any-return]

    def get(self, cls: Any, default: Any = None) -> Any:
        ctx = self._ctx
        env = ctx.envelope
        self._key_of(env)
        t = self._type(cls)
        writes = ctx.writes
        if writes is not None and t in writes:
            body = writes[t]
        else:
            body = self._tables[t][env.partition].get(env.key)
        if body is None:
            return default
        return self._decoders[t](body)

    def put(self, value: Any) -> None:
        ctx = self._ctx
        env = ctx.envelope
        self._key_of(env)
        if env.kind == _KIND_QUERY:
            self._fail("read_only", None, None)
        t = self._type(type(value))
        body = self._encode(value)
        fields = self._simple[t] if self._simple is not None else None
        if fields is None or not fields_fit(value, fields):
            try:
                self._decoders[t](body)  # a value is checked against its type when it is written
            except Exception as exc:
                self._fail("invalid", t, exc)
        if len(body) > self._limit:
            self._fail("too_large", t, len(body))
        writes = ctx.writes
        if writes is None:
            ctx.writes = {t: body}
            return
        writes[t] = body
        if len(writes) > 1:
            total = sum(len(b) for b in writes.values() if b is not None)
            if total > self._limit:
                del writes[t]
                self._fail("too_large_total", t, total)

    def delete(self, cls: Any) -> None:
        ctx = self._ctx
        env = ctx.envelope
        self._key_of(env)
        if env.kind == _KIND_QUERY:
            self._fail("read_only", None, None)
        t = self._type(cls)
        writes = ctx.writes
        if writes is None:
            ctx.writes = {t: None}
        else:
            writes[t] = None

    def items(self, cls: Any, prefix: str | bytes = "") -> list[tuple[str, Any]]:
        ctx = self._ctx
        env = ctx.envelope
        self._key_of(env)
        t = self._type(cls)
        raw = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        found = {k: v for k, v in self._tables[t][env.partition].items() if k.startswith(raw)}
        writes = ctx.writes
        key = env.key
        if writes is not None and t in writes and key.startswith(raw):
            body = writes[t]
            if body is None:
                found.pop(key, None)
            else:
                found[key] = body
        decode = self._decoders[t]
        return [(k.decode("utf-8", "surrogateescape"), decode(found[k])) for k in sorted(found)]

    def commit(self, env: Any) -> bool:
        """The handler of ``env`` succeeded: apply its buffered writes (False), or leave them
        to the caller (True: the partition has a standby that must get them first)."""
        standby = self._standby
        partition = env.partition
        if standby is not None and standby[partition] is not None:
            return True
        ctx = self._ctx
        writes = ctx.writes
        ctx.writes = None
        if writes:
            key = env.key
            tables = self._tables
            for t, body in writes.items():
                table = tables[t][partition]
                if body is None:
                    table.pop(key, None)
                else:
                    table[key] = body
            if self._log is not None:
                self._log(partition, key, writes)
        return False
