# cython: language_level=3
"""The delivery core, compiled: choreo._core.

Behaviour is defined by the pure-Python twin ``choreo/_pycore.py`` (read it first: it is the
specification and holds the layouts); this module does the same in C-level loops so that the
runtime crosses from Python into the core once per *batch*. The property tests require the two
to agree on arbitrary operation sequences.

Sans-IO: no sockets, no clocks, no sleeps. Every time is a ``now`` the caller passes.

Memory layouts, chosen for the hot path:

* OutboundWindow keeps one C struct per sequence number in a ring (seq & mask) and the flushed
  batch bodies themselves (one bytes object per batch, shared by its envelopes), so tracking an
  envelope in flight allocates nothing.
* InboundReorder keeps a state byte and an item pointer per sequence number in a ring bounded by
  its window.
* DedupWindow keeps ids in an insertion-ordered ring (16-byte id, time, partition) indexed by an
  open-addressing table of (ring position, fingerprint) slots with linear probing and
  backward-shift deletion: no tombstones, one cache line per miss, about 50 bytes per entry.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object o)

cdef extern from "Python.h":
    # PyList_SET_ITEM taking a raw pointer: hands over a reference we already own
    void list_give_item "PyList_SET_ITEM" (object lst, Py_ssize_t i, PyObject *o)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memcmp, memset
from libc.stdlib cimport malloc, calloc, realloc, free

from collections import deque
from typing import NamedTuple

IMPLEMENTATION = "compiled"

DEF HDR = 68
DEF ID_SIZE = 16
DEF MAX_KIND = 15
DEF ACK_HEAD_SIZE = 18
DEF ACK_RANGE_SIZE = 16
DEF _MAX_ACK_RANGES = 32
DEF MAX_PARTITIONS = 65536
DEF BLOCK = 256            # envelopes hashed ahead by DedupWindow.insert_envelopes
DEF PREFETCH_AHEAD = 12    # inserts between a prefetch and its use (about a DRAM latency of work)

ACCEPTED = 0
DUPLICATE = 1
BEYOND_WINDOW = 2
HEADER_SIZE = HDR
MAX_ACK_RANGES = _MAX_ACK_RANGES

cdef extern from *:
    """
    #define CHOREO_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #define CHOREO_PREFETCH_W(p) __builtin_prefetch((const void *)(p), 1)
    #include <stdlib.h>
    #include <string.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Large tables (>= 2 MiB) are 2 MiB-aligned and, on Linux, offered transparent huge pages:
       random probes into tens of MB then miss the TLB far less. A memory hint, not I/O. */
    static void *choreo_big_alloc(size_t n, int zero) {
    #if defined(__linux__)
        if (n >= ((size_t)2 << 20)) {
            void *p = NULL;
            if (posix_memalign(&p, (size_t)2 << 20, n) != 0) return NULL;
    #if defined(MADV_HUGEPAGE)
            madvise(p, n, MADV_HUGEPAGE);
    #endif
            if (zero) memset(p, 0, n);
            return p;
        }
    #endif
        return zero ? calloc(n, 1) : malloc(n);
    }
    typedef unsigned __int128 choreo_u128;
    static inline uint64_t choreo_mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((choreo_u128)a * b) >> 64); }
    """
    void CHOREO_PREFETCH(const void *p) nogil
    void CHOREO_PREFETCH_W(const void *p) nogil
    void *choreo_big_alloc(size_t n, int zero) nogil
    uint64_t choreo_mulhi(uint64_t a, uint64_t b) nogil


class MalformedFrame(ValueError):
    """A batch or ack does not follow the layout; nothing from it was accepted."""

    def __init__(self, reason, detail):
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
# little-endian loads and stores (compilers turn these into single moves on x86 and arm)

cdef inline uint64_t ld64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)
            | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40) | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))

cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint16_t ld16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))

cdef inline void st64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))

cdef inline void st32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v; p[1] = <uint8_t>(v >> 8); p[2] = <uint8_t>(v >> 16); p[3] = <uint8_t>(v >> 24)

cdef inline void st16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>v; p[1] = <uint8_t>(v >> 8)

cdef inline uint64_t double_bits(double d) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &d, 8)
    return u

cdef inline double bits_double(uint64_t u) noexcept nogil:
    cdef double d
    memcpy(&d, &u, 8)
    return d


# ---------------------------------------------------------------------------------------------
# hashes (must equal the twin's bit for bit)

DEF FNV_OFFSET = 0xCBF29CE484222325
DEF FNV_PRIME = 0x100000001B3
DEF GOLDEN = 0x9E3779B97F4A7C15

cdef inline uint64_t fmix64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= <uint64_t>0xFF51AFD7ED558CCD
    h ^= h >> 33
    h *= <uint64_t>0xC4CEB9FE1A85EC53
    h ^= h >> 33
    return h

cdef inline uint64_t c_hash64(const uint8_t *p, Py_ssize_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t h = <uint64_t>FNV_OFFSET ^ (seed * <uint64_t>GOLDEN)
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * <uint64_t>FNV_PRIME
    return fmix64(h)

cdef inline uint64_t id_hash(const uint8_t *p) noexcept nogil:
    return fmix64(ld64(p) ^ (ld64(p + 8) * <uint64_t>GOLDEN))


def hash64(const uint8_t[::1] data, uint64_t seed=0):
    """A stable 64-bit hash of ``data`` (the same on every host and Python run)."""
    if data.shape[0] == 0:
        return fmix64(<uint64_t>FNV_OFFSET ^ (seed * <uint64_t>GOLDEN))
    return c_hash64(&data[0], data.shape[0], seed)


cdef bytes c_hash128(const uint8_t *p, Py_ssize_t n):
    cdef uint8_t out[16]
    st64(out, c_hash64(p, n, 1))
    st64(out + 8, c_hash64(p, n, 2))
    return PyBytes_FromStringAndSize(<char *>out, 16)


def hash128(data):
    """A stable 16-byte digest of ``data`` (two seeded hash64)."""
    cdef bytes b = as_bytes(data)
    return c_hash128(<const uint8_t *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def derive_id(parent, handler, position):
    """The id of the ``position``-th message a handler emitted while handling ``parent``."""
    if not 0 <= position < (1 << 32):
        raise ValueError(f"position must be in [0, 2**32), got {position}")
    cdef bytes p = as_bytes(parent)
    cdef bytes h = as_bytes(handler)
    cdef uint8_t pos[4]
    st32(pos, <uint32_t>position)
    cdef bytes joined = p + b"\x00" + h + PyBytes_FromStringAndSize(<char *>pos, 4)
    return c_hash128(<const uint8_t *>PyBytes_AS_STRING(joined), PyBytes_GET_SIZE(joined))


cpdef int partition_of(key, Py_ssize_t partitions) except -1:
    """The partition of a key among ``partitions`` (1..65536; multiply-shift of its hash64)."""
    if partitions < 1 or partitions > MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    cdef const uint8_t[::1] view
    cdef uint64_t h
    if isinstance(key, bytes):
        h = c_hash64(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), 0)
    else:
        view = key
        h = c_hash64(&view[0], view.shape[0], 0) if view.shape[0] else fmix64(<uint64_t>FNV_OFFSET)
    return <int>choreo_mulhi(h, <uint64_t>partitions)


def rendezvous_owner(partition, instances):
    """Index of the instance that owns ``partition`` (highest random weight), -1 if none."""
    cdef int best = -1, i = 0
    cdef uint64_t w, best_w = 0
    cdef uint64_t seed = (partition + 1) & 0xFFFFFFFFFFFFFFFF
    cdef bytes inst, best_id = b""
    for obj in instances:
        inst = as_bytes(obj)
        w = c_hash64(<const uint8_t *>PyBytes_AS_STRING(inst), PyBytes_GET_SIZE(inst), seed)
        if best < 0 or w > best_w or (w == best_w and inst < best_id):
            best, best_w, best_id = i, w, inst
        i += 1
    return best


def assign_partitions(Py_ssize_t partitions, instances):
    """Owner index of every partition ``0..partitions-1`` by rendezvous_owner."""
    if partitions < 1 or partitions > MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    insts = [as_bytes(x) for x in instances]
    return [rendezvous_owner(p, insts) for p in range(partitions)]


# ---------------------------------------------------------------------------------------------
# envelopes

cdef list _type_cache_bytes = [None] * 256
cdef list _type_cache_str = [None] * 256


cdef bytes _last_type_bytes = b""
cdef object _last_type_str = ""


cdef object type_name(const uint8_t *p, Py_ssize_t n):
    """The str of a type name, interned through a small direct-mapped cache.

    The envelopes of one batch mostly share their type: the last name is checked first.
    """
    global _last_type_bytes, _last_type_str
    if PyBytes_GET_SIZE(_last_type_bytes) == n and memcmp(PyBytes_AS_STRING(_last_type_bytes), p, n) == 0:
        return _last_type_str
    cdef uint64_t h = c_hash64(p, n, 7)
    cdef int slot = <int>(h & 255)
    cdef object cached = _type_cache_bytes[slot]
    if cached is not None and PyBytes_GET_SIZE(cached) == n and memcmp(PyBytes_AS_STRING(cached), p, n) == 0:
        _last_type_bytes, _last_type_str = cached, _type_cache_str[slot]
        return _last_type_str
    cdef bytes b = PyBytes_FromStringAndSize(<const char *>p, n)
    s = b.decode("utf-8", "replace")
    _type_cache_bytes[slot] = b
    _type_cache_str[slot] = s
    _last_type_bytes, _last_type_str = b, s
    return s


@cython.freelist(1024)
@cython.no_gc
cdef class Envelope:
    """One received envelope; fields are read lazily from the batch it arrived in.

    Allocated from a free list, and not tracked by the cycle collector: it refers only to a
    bytes object and a str, so it can never be part of a reference cycle.
    """

    cdef readonly uint64_t seq
    cdef readonly int kind
    cdef readonly int flags
    cdef readonly int partition
    cdef readonly object type
    cdef bytes _frame
    cdef Py_ssize_t _off
    cdef uint32_t _plen
    cdef uint16_t _klen
    cdef uint8_t _tlen

    @property
    def key(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off + HDR + self._tlen, self._klen)

    @property
    def payload(self):
        return PyBytes_FromStringAndSize(
            PyBytes_AS_STRING(self._frame) + self._off + HDR + self._tlen + self._klen, self._plen)

    @property
    def msg_id(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off + 20, 16)

    @property
    def trace_id(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off + 36, 16)

    @property
    def cause_id(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off + 52, 16)

    @property
    def size(self):
        return HDR + self._tlen + self._klen + self._plen

    @property
    def raw(self):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off, self.size)

    cdef inline bytes _bytes_at(self, Py_ssize_t offset, Py_ssize_t n):
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._frame) + self._off + offset, n)

    cdef inline const uint8_t *id_ptr(self):
        return <const uint8_t *>PyBytes_AS_STRING(self._frame) + self._off + 20

    def __init__(self, raw):
        """Decode exactly one encoded envelope (MalformedFrame otherwise)."""
        cdef bytes b = one_envelope(raw)
        fill_envelope(self, b, 0)

    def __repr__(self):
        return f"Envelope(seq={self.seq}, kind={self.kind}, type={self.type!r}, key={self.key!r}, {self._plen} B)"


cdef Envelope make_envelope(bytes frame, Py_ssize_t off):
    cdef Envelope e = Envelope.__new__(Envelope)
    fill_envelope(e, frame, off)
    return e


cdef inline void fill_envelope(Envelope e, bytes frame, Py_ssize_t off):
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(frame) + off
    e.seq = ld64(p)
    e._plen = ld32(p + 8)
    e._klen = ld16(p + 12)
    e.partition = ld16(p + 14)
    e.kind = p[16]
    e.flags = p[17]
    e._tlen = p[18]
    e._frame = frame
    e._off = off
    e.type = type_name(p + HDR, e._tlen)


cdef Py_ssize_t check_envelope(const uint8_t *p, Py_ssize_t pos, Py_ssize_t end) except -1:
    """Validate the envelope at ``pos``; returns its size or raises MalformedFrame."""
    if end - pos < HDR:
        raise MalformedFrame("truncated", f"{end - pos} bytes left at {pos}, an envelope header needs {HDR}")
    cdef const uint8_t *q = p + pos
    cdef int kind = q[16]
    if kind < 1 or kind > MAX_KIND:
        raise MalformedFrame("bad_kind", f"envelope at {pos} has kind {kind}")
    if q[18] == 0:
        raise MalformedFrame("bad_type", f"envelope at {pos} has an empty type name")
    cdef Py_ssize_t size = HDR + <Py_ssize_t>q[18] + <Py_ssize_t>ld16(q + 12) + <Py_ssize_t>ld32(q + 8)
    if size > end - pos:
        raise MalformedFrame("truncated", f"envelope at {pos} claims {size} bytes, {end - pos} left")
    return size


cdef Py_ssize_t validate_batch(bytes frame, Py_ssize_t offset) except -1:
    """Check a whole batch body; returns the number of envelopes."""
    cdef Py_ssize_t end = PyBytes_GET_SIZE(frame), pos = offset, n = 0
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(frame)
    if offset > end or offset < 0:
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {end} bytes")
    while pos < end:
        pos += check_envelope(p, pos, end)
        n += 1
    return n


cdef bytes as_bytes(frame):
    """``frame`` as bytes if it is bytes-like; TypeError otherwise (``bytes(5)`` is not a frame)."""
    return frame if type(frame) is bytes else bytes(memoryview(frame))


cdef inline int check_partition(Py_ssize_t partition) except -1:
    if partition < 0 or partition >= MAX_PARTITIONS:
        raise ValueError(f"partition must be in 0..{MAX_PARTITIONS - 1}, got {partition}")
    return 0


cdef bytes one_envelope(raw):
    """``raw`` as bytes if it holds exactly one valid envelope, else MalformedFrame."""
    cdef bytes b = as_bytes(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t size = check_envelope(<const uint8_t *>PyBytes_AS_STRING(b), 0, n)
    if size != n:
        raise MalformedFrame("truncated", f"envelope of {size} bytes followed by {n - size} more")
    return b


def parse_envelopes(frame, Py_ssize_t offset=0):
    """Every envelope of a batch body, or MalformedFrame (then none is returned)."""
    cdef bytes b = as_bytes(frame)
    validate_batch(b, offset)
    cdef Py_ssize_t pos = offset, end = PyBytes_GET_SIZE(b)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(b)
    out = []
    while pos < end:
        out.append(make_envelope(b, pos))
        pos += HDR + p[pos + 18] + ld16(p + pos + 12) + ld32(p + pos + 8)
    return out


cdef inline int check_id(bytes v, str what) except -1:
    if PyBytes_GET_SIZE(v) != ID_SIZE:
        raise ValueError(f"{what} must be {ID_SIZE} bytes, got {PyBytes_GET_SIZE(v)}")
    return 0


cdef extern from "Python.h":
    # borrowed views of list/tuple items and of bytes: the batch loops read columns without refcounting
    PyObject **column_items "PySequence_Fast_ITEMS" (object o)
    bint is_bytes "PyBytes_Check" (PyObject *o) noexcept nogil
    Py_ssize_t bsize "PyBytes_GET_SIZE" (PyObject *o) noexcept nogil
    const char *bdata "PyBytes_AS_STRING" (PyObject *o) noexcept nogil
    bint is_int "PyLong_Check" (PyObject *o) noexcept nogil
    long int_value "PyLong_AsLong" (PyObject *o) except? -1


cdef uint8_t _ZEROS[16]
memset(_ZEROS, 0, 16)

cdef object as_column(object values, Py_ssize_t n, str name):
    """``values`` as a list or tuple of ``n`` items (``n`` < 0: any count); other iterables are copied."""
    if isinstance(values, (bytes, str, bytearray)):
        raise TypeError(f"{name} must be a sequence with one item per envelope, not {type(values).__name__}")
    if type(values) is not list and type(values) is not tuple:
        values = list(values)
    if n >= 0 and len(values) != n:
        raise ValueError(f"{name} has {len(values)} items for {n} payloads")
    return values


cdef int check_bytes_item(PyObject *o, str name, Py_ssize_t i, Py_ssize_t exact) except -1:
    if not is_bytes(o):
        raise TypeError(f"{name}[{i}] must be bytes, got {type(<object>o).__name__}")
    if exact >= 0 and bsize(o) != exact:
        raise ValueError(f"{name}[{i}] must be {exact} bytes, got {bsize(o)}")
    return 0


cdef int check_partition_item(PyObject *o, Py_ssize_t i) except -1:
    if not is_int(o):
        raise TypeError(f"partitions[{i}] must be an int, got {type(<object>o).__name__}")
    cdef long v
    try:
        v = int_value(o)  # reads the digits of an int (or subclass): no Python code runs
    except OverflowError:
        v = -1
    if v < 0 or v > 0xFFFF:
        raise ValueError(f"partitions[{i}] must be in 0..65535, got {<object>o}")
    return 0


cdef inline int check_fields(int kind, int flags, Py_ssize_t tlen, Py_ssize_t klen, int partition,
                             Py_ssize_t plen) except -1:
    if kind < 1 or kind > MAX_KIND:
        raise ValueError(f"kind must be in 1..{MAX_KIND}, got {kind}")
    if flags < 0 or flags > 255:
        raise ValueError(f"flags must fit in one byte, got {flags}")
    if tlen < 1 or tlen > 255:
        raise ValueError(f"type must be 1 to 255 bytes, got {tlen}")
    if klen > 0xFFFF:
        raise ValueError(f"key must be at most 65535 bytes, got {klen}")
    if partition < 0 or partition > 0xFFFF:
        raise ValueError(f"partition must be in 0..65535, got {partition}")
    if plen > 0xFFFFFFFF:
        raise ValueError("payload must be under 4 GiB")
    return 0


cdef inline void write_raw(uint8_t *out, uint64_t seq, int kind, int flags, const char *t, Py_ssize_t tlen,
                           const char *k, Py_ssize_t klen, int partition, const uint8_t *msg_id,
                           const uint8_t *trace_id, const uint8_t *cause_id, const char *p,
                           Py_ssize_t plen) noexcept:
    st64(out, seq)
    st32(out + 8, <uint32_t>plen)
    st16(out + 12, <uint16_t>klen)
    st16(out + 14, <uint16_t>partition)
    out[16] = <uint8_t>kind
    out[17] = <uint8_t>flags
    out[18] = <uint8_t>tlen
    out[19] = 0
    memcpy(out + 20, msg_id, 16)
    memcpy(out + 36, trace_id, 16)
    memcpy(out + 52, cause_id, 16)
    memcpy(out + HDR, t, tlen)
    memcpy(out + HDR + tlen, k, klen)
    memcpy(out + HDR + tlen + klen, p, plen)


cdef inline void write_envelope(uint8_t *out, uint64_t seq, int kind, int flags, bytes type, bytes key,
                                int partition, bytes msg_id, bytes trace_id, bytes cause_id,
                                bytes payload) noexcept:
    write_raw(out, seq, kind, flags, PyBytes_AS_STRING(type), PyBytes_GET_SIZE(type), PyBytes_AS_STRING(key),
              PyBytes_GET_SIZE(key), partition, <const uint8_t *>PyBytes_AS_STRING(msg_id),
              <const uint8_t *>PyBytes_AS_STRING(trace_id), <const uint8_t *>PyBytes_AS_STRING(cause_id),
              PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))


def pack_envelope(uint64_t seq, int kind, int flags, bytes type not None, bytes key not None, int partition,
                  bytes msg_id not None, bytes trace_id not None, bytes cause_id not None,
                  bytes payload not None):
    """One encoded envelope (see choreo/_pycore.py for the layout)."""
    check_fields(kind, flags, PyBytes_GET_SIZE(type), PyBytes_GET_SIZE(key), partition, PyBytes_GET_SIZE(payload))
    check_id(msg_id, "msg_id"); check_id(trace_id, "trace_id"); check_id(cause_id, "cause_id")
    cdef Py_ssize_t size = HDR + PyBytes_GET_SIZE(type) + PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    write_envelope(<uint8_t *>PyBytes_AS_STRING(out), seq, kind, flags, type, key, partition, msg_id,
                   trace_id, cause_id, payload)
    return out


# ---------------------------------------------------------------------------------------------
# acks

def encode_ack(uint64_t cumulative, uint64_t received, ranges=()):
    """Encode an ack; at most MAX_ACK_RANGES ranges are kept (the lowest)."""
    rs = list(ranges)[:_MAX_ACK_RANGES]
    cdef Py_ssize_t n = len(rs), i
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ACK_HEAD_SIZE + n * ACK_RANGE_SIZE)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    st64(p, cumulative)
    st64(p + 8, received)
    st16(p + 16, <uint16_t>n)
    for i in range(n):
        lo, hi = rs[i]
        st64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE, <uint64_t>lo)
        st64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE + 8, <uint64_t>hi)
    return out


cdef int parse_ack(const uint8_t *p, Py_ssize_t n, uint64_t *cum, uint64_t *rec, uint64_t *los,
                   uint64_t *his) except -1:
    if n < ACK_HEAD_SIZE:
        raise MalformedFrame("truncated", f"an ack needs {ACK_HEAD_SIZE} bytes, got {n}")
    cdef int count = ld16(p + 16), i
    if count > _MAX_ACK_RANGES:
        raise MalformedFrame("bad_ack", f"ack carries {count} ranges, at most {_MAX_ACK_RANGES} allowed")
    cdef Py_ssize_t need = ACK_HEAD_SIZE + count * ACK_RANGE_SIZE
    if n != need:
        raise MalformedFrame("truncated", f"ack with {count} ranges needs {need} bytes, got {n}")
    cum[0] = ld64(p)
    rec[0] = ld64(p + 8)
    for i in range(count):
        los[i] = ld64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE)
        his[i] = ld64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE + 8)
        if los[i] > his[i]:
            raise MalformedFrame("bad_ack", f"ack range [{los[i]}, {his[i]}] is reversed")
    return count


def decode_ack(frame, Py_ssize_t offset=0):
    """``(cumulative, received, ranges)`` of an encoded ack, or MalformedFrame."""
    cdef bytes b = as_bytes(frame)
    cdef uint64_t cum, rec
    cdef uint64_t los[_MAX_ACK_RANGES]
    cdef uint64_t his[_MAX_ACK_RANGES]
    if offset < 0 or offset > PyBytes_GET_SIZE(b):
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {PyBytes_GET_SIZE(b)} bytes")
    cdef int n = parse_ack(<const uint8_t *>PyBytes_AS_STRING(b) + offset, PyBytes_GET_SIZE(b) - offset,
                           &cum, &rec, los, his)
    return cum, rec, [(los[i], his[i]) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# outbound window

cdef struct OutEntry:
    double deadline
    uint64_t frame       # number of the batch body holding the envelope
    uint64_t offset
    uint64_t length
    uint32_t retries
    uint8_t state        # 0 finished/free, 1 in flight, 2 arrived (not resent)


cdef inline size_t pow2_at_least(size_t n) noexcept nogil:
    cdef size_t c = 1
    while c < n:
        c <<= 1
    return c


cdef class OutboundWindow:
    """Sequence numbers, in-flight tracking, credit and retransmission for one channel.

    See the twin (choreo._pycore.OutboundWindow) for the contract.
    """

    cdef readonly int max_messages
    cdef readonly Py_ssize_t max_bytes
    cdef readonly double rto, rto_max, backoff
    cdef readonly uint64_t next_seq
    cdef readonly Py_ssize_t in_flight_bytes
    cdef uint64_t _base, _received_mark
    cdef OutEntry *_ring
    cdef uint64_t _mask
    # batch bodies: frames[n & fmask] holds body number n while any of its envelopes is unfinished
    cdef PyObject **_frames
    cdef uint32_t *_frame_live
    cdef uint64_t _fmask, _frame_base, _frame_next
    # the body being filled: envelopes appended since the last flush
    cdef uint8_t *_buf
    cdef size_t _buf_len, _buf_cap
    cdef Py_ssize_t _pending
    cdef Py_ssize_t _pending_finished      # of those, finished (acked or taken) before the flush
    cdef uint64_t _pending_first
    cdef int _in_flight, _peak
    cdef uint64_t _sent, _acked, _retransmitted, _bogus
    cdef public bint held  # set by the runtime while envelopes wait before this window: lanes stay out

    def __cinit__(self, int max_messages=1024, Py_ssize_t max_bytes=16 << 20, double rto=0.2,
                  double rto_max=5.0, double backoff=2.0, uint64_t first_seq=1):
        if max_messages < 1:
            raise ValueError(f"window must be >= 1, got {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not (0 < rto <= rto_max):
            raise ValueError(f"need 0 < rto <= rto_max, got rto={rto}, rto_max={rto_max}")
        if backoff < 1.0:
            raise ValueError(f"backoff must be >= 1.0, got {backoff}")
        if first_seq < 1:
            raise ValueError(f"first_seq must be >= 1, got {first_seq}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.rto, self.rto_max, self.backoff = rto, rto_max, backoff
        self.next_seq = self._base = first_seq
        self._received_mark = first_seq - 1
        cdef size_t cap = pow2_at_least(<size_t>max_messages)
        self._mask = cap - 1
        self._ring = <OutEntry *>calloc(cap, sizeof(OutEntry))
        cdef size_t fcap = pow2_at_least(<size_t>max_messages + 1)
        self._fmask = fcap - 1
        self._frames = <PyObject **>calloc(fcap, sizeof(PyObject *))
        self._frame_live = <uint32_t *>calloc(fcap, sizeof(uint32_t))
        self._buf_cap = 4096
        self._buf = <uint8_t *>malloc(self._buf_cap)
        if self._ring == NULL or self._frames == NULL or self._frame_live == NULL or self._buf == NULL:
            raise MemoryError()
        self._frame_base = self._frame_next = 0

    def __dealloc__(self):
        cdef uint64_t f
        if self._frames != NULL:
            for f in range(self._frame_base, self._frame_next):
                Py_XDECREF(self._frames[f & self._fmask])
            free(self._frames)
        free(self._frame_live)
        free(self._ring)
        free(self._buf)

    @property
    def in_flight(self):
        return self._in_flight

    @property
    def pending(self):
        return self._pending

    @property
    def pending_bytes(self):
        """Bytes appended since the last flush (the size of the next batch body)."""
        return self._buf_len

    cdef inline bint _credit(self, Py_ssize_t nbytes) noexcept:
        if self.next_seq - self._base >= <uint64_t>self.max_messages:
            return False
        return self._in_flight == 0 or self.in_flight_bytes + nbytes <= self.max_bytes

    def has_credit(self, Py_ssize_t nbytes=0):
        """Whether one more envelope of ``nbytes`` may be appended now."""
        return self._credit(nbytes)

    cdef int _reserve(self, size_t n) except -1:
        cdef size_t cap = self._buf_cap
        if self._buf_len + n <= cap:
            return 0
        while cap < self._buf_len + n:
            cap *= 2
        cdef uint8_t *nb = <uint8_t *>realloc(self._buf, cap)
        if nb == NULL:
            raise MemoryError()
        self._buf, self._buf_cap = nb, cap
        return 0

    cdef int _refuse(self) except -1:
        raise OverflowError(
            f"window full: {self.next_seq - self._base}/{self.max_messages} sequence numbers, "
            f"{self.in_flight_bytes}/{self.max_bytes} bytes in flight; check has_credit() first")

    cdef uint64_t _admit(self, Py_ssize_t size, double now) noexcept:
        """Track the envelope just written at the end of the pending body (credit was checked)."""
        cdef uint64_t seq = self.next_seq
        cdef OutEntry *e = &self._ring[seq & self._mask]
        e.deadline = now + self.rto
        e.frame = self._frame_next
        e.offset = self._buf_len
        e.length = <uint64_t>size
        e.retries = 0
        e.state = 1
        if self._pending == 0:
            self._pending_first = seq
        self._pending += 1
        self.next_seq += 1
        self._buf_len += size
        self.in_flight_bytes += size
        self._in_flight += 1
        self._sent += 1
        if self._in_flight > self._peak:
            self._peak = self._in_flight
        return seq

    def append(self, int kind, int flags, bytes type not None, bytes key not None, int partition,
               bytes msg_id not None, bytes trace_id not None, bytes cause_id not None,
               bytes payload not None, double now):
        """Sequence and queue one envelope for the next flush(); returns its seq."""
        check_fields(kind, flags, PyBytes_GET_SIZE(type), PyBytes_GET_SIZE(key), partition, PyBytes_GET_SIZE(payload))
        check_id(msg_id, "msg_id"); check_id(trace_id, "trace_id"); check_id(cause_id, "cause_id")
        cdef Py_ssize_t size = HDR + PyBytes_GET_SIZE(type) + PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(payload)
        if not self._credit(size):
            self._refuse()
        self._reserve(size)
        write_envelope(self._buf + self._buf_len, self.next_seq, kind, flags, type, key, partition, msg_id,
                       trace_id, cause_id, payload)
        return self._admit(size, now)

    def append_many(self, bytes type not None, keys, msg_ids, payloads, double now, *, int kind=1, int flags=0,
                    partitions=0, trace_ids=None, cause_ids=None):
        """Sequence and queue a batch of envelopes of one type, in order; returns how many went in.

        See the twin (choreo._pycore.OutboundWindow.append_many) for the contract.
        """
        cdef Py_ssize_t n, i, klen = 0, plen, size, tlen = PyBytes_GET_SIZE(type)
        check_fields(kind, flags, tlen, 0, 0, 0)
        payloads = as_column(payloads, -1, "payloads")
        n = len(payloads)
        msg_ids = as_column(msg_ids, n, "msg_ids")
        cdef PyObject **pl = column_items(payloads)
        cdef PyObject **ids = column_items(msg_ids)
        cdef PyObject **ks = NULL
        cdef PyObject **ps = NULL
        cdef PyObject **ts = NULL
        cdef PyObject **cs = NULL
        cdef int partition = 0
        if keys is not None:
            keys = as_column(keys, n, "keys")
            ks = column_items(keys)
        if isinstance(partitions, int):
            if not 0 <= partitions <= 0xFFFF:
                raise ValueError(f"partition must be in 0..65535, got {partitions}")
            partition = partitions
        else:
            partitions = as_column(partitions, n, "partitions")
            ps = column_items(partitions)
        if trace_ids is not None:
            trace_ids = as_column(trace_ids, n, "trace_ids")
            ts = column_items(trace_ids)
        if cause_ids is not None:
            cause_ids = as_column(cause_ids, n, "cause_ids")
            cs = column_items(cause_ids)
        # every field is checked before anything goes in: a bad batch is refused whole
        for i in range(n):
            check_bytes_item(pl[i], "payloads", i, -1)
            check_bytes_item(ids[i], "msg_ids", i, ID_SIZE)
            if ks != NULL:
                check_bytes_item(ks[i], "keys", i, -1)
                check_fields(kind, flags, tlen, bsize(ks[i]), partition, bsize(pl[i]))
            else:
                check_fields(kind, flags, tlen, 0, partition, bsize(pl[i]))
            if ps != NULL:
                check_partition_item(ps[i], i)
            if ts != NULL:
                check_bytes_item(ts[i], "trace_ids", i, ID_SIZE)
            if cs != NULL:
                check_bytes_item(cs[i], "cause_ids", i, ID_SIZE)
        cdef const char *k = ""
        cdef const uint8_t *mid
        for i in range(n):
            plen = bsize(pl[i])
            if ks != NULL:
                k, klen = bdata(ks[i]), bsize(ks[i])
            size = HDR + tlen + klen + plen
            if not self._credit(size):
                return i
            if ps != NULL:
                partition = <int>int_value(ps[i])  # checked above: cannot fail
            self._reserve(size)
            mid = <const uint8_t *>bdata(ids[i])
            write_raw(self._buf + self._buf_len, self.next_seq, kind, flags, PyBytes_AS_STRING(type), tlen, k,
                      klen, partition, mid, <const uint8_t *>bdata(ts[i]) if ts != NULL else mid,
                      <const uint8_t *>bdata(cs[i]) if cs != NULL else _ZEROS, bdata(pl[i]), plen)
            self._admit(size, now)
        return n

    def append_raw(self, envelope, double now):
        """Sequence an already encoded envelope (from another channel) under this window's next seq."""
        cdef bytes b = one_envelope(envelope)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(b)
        if not self._credit(size):
            self._refuse()
        self._reserve(size)
        memcpy(self._buf + self._buf_len, PyBytes_AS_STRING(b), size)
        st64(self._buf + self._buf_len, self.next_seq)
        return self._admit(size, now)

    def flush(self):
        """The batch body of every envelope appended since the last flush, or None."""
        if self._pending == 0:
            return None
        cdef bytes body = PyBytes_FromStringAndSize(<char *>self._buf, self._buf_len)
        cdef uint64_t f = self._frame_next
        Py_INCREF(body)
        self._frames[f & self._fmask] = <PyObject *>body
        # envelopes of this body finished before the flush (acked while pending) do not count.
        # Counted as they finish, not by walking the ring: acks of unflushed envelopes free credit,
        # so one body can hold more envelopes than the ring has slots.
        self._frame_live[f & self._fmask] = <uint32_t>(self._pending - self._pending_finished)
        self._frame_next += 1
        self._pending = 0
        self._pending_finished = 0
        self._buf_len = 0
        if self._buf_cap > (1 << 20):  # do not keep a huge buffer after a burst
            free(self._buf)
            self._buf_cap = 4096
            self._buf = <uint8_t *>malloc(self._buf_cap)
            if self._buf == NULL:
                raise MemoryError()
        self._release_frames()
        return body

    cdef inline bint _is_pending(self, uint64_t seq) noexcept:
        return self._pending > 0 and seq >= self._pending_first

    cdef void _release_frames(self) noexcept:
        cdef uint64_t f
        while self._frame_base < self._frame_next:
            f = self._frame_base & self._fmask
            if self._frame_live[f] != 0:
                break
            Py_XDECREF(self._frames[f])
            self._frames[f] = NULL
            self._frame_base += 1

    cdef inline const uint8_t *_bytes_of(self, OutEntry *e) noexcept:
        if e.frame == self._frame_next:  # still in the pending body
            return self._buf + e.offset
        return <const uint8_t *>PyBytes_AS_STRING(<object>self._frames[e.frame & self._fmask]) + e.offset

    cdef inline void _finish(self, uint64_t seq) noexcept:
        cdef OutEntry *e = &self._ring[seq & self._mask]
        e.state = 0
        self._in_flight -= 1
        self.in_flight_bytes -= e.length
        self._acked += 1
        if e.frame != self._frame_next:
            self._frame_live[e.frame & self._fmask] -= 1
        else:
            self._pending_finished += 1

    cdef inline void _advance_base(self) noexcept:
        while self._base < self.next_seq and self._ring[self._base & self._mask].state == 0:
            self._base += 1
        if self._received_mark < self._base - 1:
            self._received_mark = self._base - 1

    cdef int _apply_ack(self, uint64_t cum, uint64_t rec, int n, uint64_t *los, uint64_t *his) noexcept:
        cdef uint64_t last = self.next_seq - 1, s, lo, hi
        cdef int freed = 0, i
        cdef bint bogus = cum > last or rec > last
        for i in range(n):
            if his[i] > last:
                bogus = True
        if bogus:
            self._bogus += 1
        if cum > last:
            cum = last
        if rec > last:
            rec = last
        s = self._base
        while s <= cum:
            if self._ring[s & self._mask].state != 0:
                self._finish(s)
                freed += 1
            s += 1
        for i in range(n):
            lo = los[i] if los[i] > self._base else self._base
            hi = his[i] if his[i] < last else last
            s = lo
            while s <= hi:
                if self._ring[s & self._mask].state != 0:
                    self._finish(s)
                    freed += 1
                s += 1
        s = self._received_mark + 1 if self._received_mark + 1 > self._base else self._base
        while s <= rec:
            if self._ring[s & self._mask].state == 1:
                self._ring[s & self._mask].state = 2
            s += 1
        if rec > self._received_mark:
            self._received_mark = rec
        self._advance_base()
        self._release_frames()
        return freed

    def on_ack(self, uint64_t cumulative, uint64_t received, ranges, double now):
        """Apply an ack; returns how many envelopes it finished (freeing their credit)."""
        rs = list(ranges)
        cdef int n = len(rs), i
        cdef uint64_t *los = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
        cdef uint64_t *his = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
        if los == NULL or his == NULL:
            free(los); free(his)
            raise MemoryError()
        try:
            for i in range(n):
                los[i] = rs[i][0]
                his[i] = rs[i][1]
            return self._apply_ack(cumulative, received, n, los, his)
        finally:
            free(los)
            free(his)

    def on_ack_frame(self, frame, Py_ssize_t offset, double now):
        """Decode an encoded ack (see encode_ack) and apply it."""
        cdef bytes b = as_bytes(frame)
        cdef uint64_t cum, rec
        cdef uint64_t los[_MAX_ACK_RANGES]
        cdef uint64_t his[_MAX_ACK_RANGES]
        if offset < 0 or offset > PyBytes_GET_SIZE(b):
            raise MalformedFrame("truncated", f"offset {offset} beyond frame of {PyBytes_GET_SIZE(b)} bytes")
        cdef int n = parse_ack(<const uint8_t *>PyBytes_AS_STRING(b) + offset, PyBytes_GET_SIZE(b) - offset,
                               &cum, &rec, los, his)
        return self._apply_ack(cum, rec, n, los, his)

    def next_deadline(self):
        """The earliest time a retransmission may be due (inf when none can be)."""
        cdef double best = float("inf")
        cdef uint64_t s = self._base
        cdef OutEntry *e
        while s < self.next_seq:
            e = &self._ring[s & self._mask]
            if e.state == 1 and not self._is_pending(s) and e.deadline < best:
                best = e.deadline
            s += 1
        return best

    def due(self, double now):
        """A batch body of every envelope whose ack is overdue at ``now``, in seq order, or None."""
        cdef uint64_t s = self._base
        cdef size_t total = 0
        cdef OutEntry *e
        cdef double wait
        while s < self.next_seq:
            e = &self._ring[s & self._mask]
            if e.state == 1 and e.deadline <= now and not self._is_pending(s):
                total += e.length
            s += 1
        if total == 0:
            return None
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
        s = self._base
        while s < self.next_seq:
            e = &self._ring[s & self._mask]
            if e.state == 1 and e.deadline <= now and not self._is_pending(s):
                memcpy(p, self._bytes_of(e), e.length)
                p += e.length
                e.retries += 1
                wait = self.rto * (self.backoff ** e.retries)
                e.deadline = now + (wait if wait < self.rto_max else self.rto_max)
                self._retransmitted += 1
            s += 1
        return out

    def unacked(self):
        """Every unfinished envelope, in seq order (to resend elsewhere when the receiver died)."""
        out = []
        cdef uint64_t s = self._base
        cdef OutEntry *e
        while s < self.next_seq:
            e = &self._ring[s & self._mask]
            if e.state != 0:
                out.append(PyBytes_FromStringAndSize(<const char *>self._bytes_of(e), e.length))
            s += 1
        return out

    def take(self, uint64_t seq):
        """Remove one flushed, unfinished envelope (to reroute it) and return it, or None."""
        if seq < self._base or seq >= self.next_seq or self._is_pending(seq):
            return None
        cdef OutEntry *e = &self._ring[seq & self._mask]
        if e.state == 0:
            return None
        out = PyBytes_FromStringAndSize(<const char *>self._bytes_of(e), e.length)
        self._finish(seq)
        self._acked -= 1  # taken, not acknowledged
        self._advance_base()
        self._release_frames()
        return out

    def stats(self):
        return WindowStats(self.next_seq, self._in_flight, self.in_flight_bytes, self.max_messages,
                           self.max_bytes, self._peak, self._sent, self._acked, self._retransmitted, self._bogus)


# ---------------------------------------------------------------------------------------------
# inbound reorder

DEF R_EMPTY = 0
DEF R_BUFFERED = 1
DEF R_RELEASED = 2
DEF R_DONE = 3


cdef class InboundReorder:
    """Releases a channel's envelopes strictly in sequence and says what to acknowledge.

    See the twin (choreo._pycore.InboundReorder) for the contract.
    """

    cdef readonly int window
    cdef readonly uint64_t done_upto, released_upto
    cdef uint8_t *_state
    cdef PyObject **_items
    cdef uint64_t _mask
    cdef int _buffered, _in_progress
    cdef uint64_t _accepted, _duplicates, _beyond, _released, _completed
    cdef bint _ack_dirty

    def __cinit__(self, int window=1024, uint64_t first_seq=1):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if first_seq < 1:
            raise ValueError(f"first_seq must be >= 1, got {first_seq}")
        self.window = window
        self.done_upto = self.released_upto = first_seq - 1
        cdef size_t cap = pow2_at_least(<size_t>window + 1)
        self._mask = cap - 1
        self._state = <uint8_t *>calloc(cap, 1)
        self._items = <PyObject **>calloc(cap, sizeof(PyObject *))
        if self._state == NULL or self._items == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef size_t i
        if self._items != NULL:
            for i in range(self._mask + 1):
                Py_XDECREF(self._items[i])
            free(self._items)
        free(self._state)

    cdef inline int _accept(self, uint64_t seq, object item) except -1:
        cdef uint64_t i = seq & self._mask
        if seq <= self.done_upto or (seq <= self.done_upto + <uint64_t>self.window and self._state[i] != R_EMPTY):
            self._duplicates += 1
            self._ack_dirty = True
            return DUPLICATE
        if seq > self.done_upto + <uint64_t>self.window:
            self._beyond += 1
            return BEYOND_WINDOW
        self._state[i] = R_BUFFERED
        Py_INCREF(item)
        self._items[i] = <PyObject *>item
        self._buffered += 1
        self._accepted += 1
        return ACCEPTED

    def accept(self, uint64_t seq, item):
        """Offer one arrival; returns ACCEPTED, DUPLICATE or BEYOND_WINDOW."""
        return self._accept(seq, item)

    def release(self):
        """The arrivals that are next in sequence, in order; each is released once."""
        return self._release()

    cdef list _release(self):
        cdef uint64_t seq = self.released_upto + 1, i
        cdef Py_ssize_t n = 0
        while self._state[seq & self._mask] == R_BUFFERED and seq <= self.done_upto + <uint64_t>self.window:
            n += 1
            seq += 1
        cdef list out = PyList_New(n)
        cdef Py_ssize_t k
        seq = self.released_upto + 1
        for k in range(n):
            i = seq & self._mask
            self._state[i] = R_RELEASED
            list_give_item(out, k, self._items[i])  # our reference moves into the list
            self._items[i] = NULL
            seq += 1
        if n:
            self.released_upto += n
            self._released += n
            self._buffered -= n
            self._in_progress += n
            self._ack_dirty = True
        return out

    def feed(self, frame, Py_ssize_t offset=0):
        """Accept every envelope of a batch body and return those now released, in order."""
        cdef bytes b = as_bytes(frame)
        validate_batch(b, offset)
        cdef Py_ssize_t pos = offset, end = PyBytes_GET_SIZE(b)
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(b)
        cdef uint64_t seq
        while pos < end:
            seq = ld64(p + pos)
            if seq <= self.done_upto or seq > self.done_upto + <uint64_t>self.window \
                    or self._state[seq & self._mask] != R_EMPTY:
                self._accept(seq, None)  # counts the duplicate or refusal without building an object
            else:
                self._accept(seq, make_envelope(b, pos))
            pos += HDR + p[pos + 18] + ld16(p + pos + 12) + ld32(p + pos + 8)
        return self._release()

    cdef inline bint _complete(self, uint64_t seq) noexcept:
        if seq <= self.done_upto or seq > self.released_upto or self._state[seq & self._mask] != R_RELEASED:
            return False
        self._state[seq & self._mask] = R_DONE
        self._completed += 1
        self._in_progress -= 1
        self._ack_dirty = True
        while self.done_upto < self.released_upto and self._state[(self.done_upto + 1) & self._mask] == R_DONE:
            self.done_upto += 1
            self._state[self.done_upto & self._mask] = R_EMPTY
        return True

    def complete(self, uint64_t seq):
        """Mark a released seq as done (handled, and its effects safe). False if not applicable."""
        return self._complete(seq)

    def complete_many(self, seqs):
        """Complete several seqs; returns how many changed state."""
        cdef int n = 0
        for s in seqs:
            if self._complete(s):
                n += 1
        return n

    def complete_envelopes(self, envelopes):
        """Complete the seq of each envelope; returns how many changed state."""
        cdef int n = 0
        cdef Envelope e
        for e in envelopes:
            if self._complete(e.seq):
                n += 1
        return n

    cdef int _ranges(self, uint64_t *los, uint64_t *his) noexcept:
        cdef int n = 0
        cdef uint64_t seq = self.done_upto + 1, lo = 0
        cdef bint open_ = False
        while seq <= self.released_upto + 1:
            if seq <= self.released_upto and self._state[seq & self._mask] == R_DONE:
                if not open_:
                    lo = seq
                    open_ = True
            elif open_:
                los[n] = lo
                his[n] = seq - 1
                n += 1
                open_ = False
                if n == _MAX_ACK_RANGES:
                    break
            seq += 1
        return n

    def ack(self):
        """``(cumulative done, received, done ranges above cumulative)``, at most MAX_ACK_RANGES."""
        cdef uint64_t los[_MAX_ACK_RANGES]
        cdef uint64_t his[_MAX_ACK_RANGES]
        cdef int n = self._ranges(los, his)
        return self.done_upto, self.released_upto, [(los[i], his[i]) for i in range(n)]

    @property
    def ack_pending(self):
        return self._ack_dirty

    def ack_frame(self):
        """The encoded ack(); clears ack_pending."""
        cdef uint64_t los[_MAX_ACK_RANGES]
        cdef uint64_t his[_MAX_ACK_RANGES]
        cdef int n = self._ranges(los, his), i
        self._ack_dirty = False
        cdef bytes out = PyBytes_FromStringAndSize(NULL, ACK_HEAD_SIZE + n * ACK_RANGE_SIZE)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
        st64(p, self.done_upto)
        st64(p + 8, self.released_upto)
        st16(p + 16, <uint16_t>n)
        for i in range(n):
            st64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE, los[i])
            st64(p + ACK_HEAD_SIZE + i * ACK_RANGE_SIZE + 8, his[i])
        return out

    @property
    def buffered(self):
        return self._buffered

    @property
    def in_progress(self):
        return self._in_progress

    def stats(self):
        return ReorderStats(self.released_upto, self.done_upto, self._buffered, self.window, self._accepted,
                            self._duplicates, self._beyond, self._released, self._completed)


# ---------------------------------------------------------------------------------------------
# dedup window

cdef extern from *:
    """
    #define CHOREO_HIGH32 ((uint64_t)0xFFFFFFFF00000000ULL)
    #define CHOREO_LOW32 ((uint64_t)0x00000000FFFFFFFFULL)
    """
    # typed C constants: a DEF or literal this large would be a Python int (allocations per use)
    const uint64_t HIGH32 "CHOREO_HIGH32"
    const uint64_t LOW32 "CHOREO_LOW32"


cdef inline uint64_t slot_seq(uint64_t slot) noexcept nogil:
    """Insert sequence stored in a table slot (its low 32 bits)."""
    return slot & LOW32


cdef struct DEntry:
    uint8_t id[16]
    double t
    uint16_t partition
    uint8_t alive


DEF SWEEP_STEP = 4  # table slots the sweep examines per insert: about tcap / 8 stale slots on average


cdef class DedupWindow:
    """Remembers ids for ``ttl`` seconds and at most ``max_entries``; forgets the oldest first.

    See the twin (choreo._pycore.DedupWindow) for the contract.

    Layout: a ring of entries in insertion order, each numbered by an insert sequence (its ring
    index is ``seq & (rcap - 1)``; the ring holds sequences ``[_hseq, _tseq)``), and an
    open-addressing table of ``seq | (hash & HIGH32)`` slots (0 = empty) for lookup. Forgetting
    the oldest entry (eviction, expiry) only advances ``_hseq``: its table slot is left behind,
    *stale*, recognisable from the slot alone (``seq < _hseq``), so the hot path never makes the
    random table access a deletion would. Stale slots count as occupied for probing, are reused
    by inserts that probe past them, and a sweep cursor walks the table sequentially a few slots
    per insert deleting the rest; a full pass runs if they ever push the load past 3/4.
    """

    cdef readonly double ttl
    cdef readonly Py_ssize_t max_entries
    cdef DEntry *_ring
    cdef size_t _rcap, _rmax          # ring capacity (power of two) and its limit
    cdef uint64_t _hseq, _tseq        # sequences of the oldest entry and of the next insert
    cdef uint64_t _seq_limit          # renumber before a sequence reaches this (it must fit 32 bits)
    cdef size_t _live
    cdef uint64_t *_table
    cdef size_t _tmask
    cdef size_t _stale                # table slots of entries that left the ring, not yet swept
    cdef size_t _sweep                # next table slot the sweep examines
    cdef uint64_t _inserted, _duplicates, _expired, _evicted
    # placement in the table only (never on the wire): seeded per window from its address, so a
    # peer choosing message ids cannot aim them all at one probe chain
    cdef uint64_t _seed

    def __cinit__(self, double ttl, Py_ssize_t max_entries):
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_entries > (1 << 31):
            raise ValueError(f"max_entries must be at most 2**31, got {max_entries}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._seed = fmix64(<uint64_t><size_t><void *>self ^ <uint64_t>GOLDEN)
        self._seq_limit = LOW32
        # the ring may hold removed (dead) entries until they reach its head; 1/16 of slack above
        # max_entries keeps in-place compaction rare when ids are removed at full capacity
        self._rmax = pow2_at_least(<size_t>max_entries + <size_t>max_entries // 16 + 1)
        self._alloc(pow2_at_least(min(<size_t>max_entries, 1024)))

    def __dealloc__(self):
        free(self._ring)
        free(self._table)

    cdef int _alloc(self, size_t rcap) except -1:
        """Allocate a ring of ``rcap`` (and its table), moving the live entries in order.

        Also how sequences restart from 1 (see _add) and how every stale slot is dropped at once.
        """
        cdef size_t live_max = rcap if rcap < <size_t>self.max_entries else <size_t>self.max_entries
        cdef size_t tcap = pow2_at_least(2 * live_max)  # live entries fill at most half the table
        cdef DEntry *ring = <DEntry *>choreo_big_alloc(rcap * sizeof(DEntry), 0)
        cdef uint64_t *table = <uint64_t *>choreo_big_alloc(tcap * sizeof(uint64_t), 1)
        if ring == NULL or table == NULL:
            free(ring); free(table)
            raise MemoryError()
        cdef size_t k = 0
        cdef uint64_t seq
        cdef DEntry *e
        if self._ring != NULL:
            for seq in range(self._hseq, self._tseq):
                e = self._entry(seq)
                if e.alive:
                    ring[(1 + k) & (rcap - 1)] = e[0]
                    k += 1
            free(self._ring)
            free(self._table)
        self._ring, self._rcap, self._hseq, self._tseq = ring, rcap, 1, 1 + k
        self._table, self._tmask, self._stale, self._sweep = table, tcap - 1, 0, 0
        for seq in range(1, 1 + k):
            self._table_put(self._id_hash(self._entry(seq).id), seq)
        return 0

    cdef inline uint64_t _id_hash(self, const uint8_t *p) noexcept:
        return fmix64(id_hash(p) ^ self._seed)

    cdef inline void _prefetch_id(self, const uint8_t *p) noexcept:
        CHOREO_PREFETCH(&self._table[<size_t>(self._id_hash(p) >> 32) & self._tmask])

    cdef inline DEntry *_entry(self, uint64_t seq) noexcept:
        """The ring entry numbered ``seq``."""
        return &self._ring[seq & (self._rcap - 1)]

    cdef inline bint _is_stale(self, uint64_t slot) noexcept:
        return slot != 0 and slot_seq(slot) < self._hseq

    cdef inline void _table_put(self, uint64_t h, uint64_t seq) noexcept:
        """Place ``seq`` in the first empty or stale slot of its probe chain."""
        cdef size_t i = <size_t>(h >> 32) & self._tmask
        cdef uint64_t slot
        while True:
            slot = self._table[i]
            if slot == 0:
                break
            if self._is_stale(slot):
                self._stale -= 1
                break
            i = (i + 1) & self._tmask
        self._table[i] = seq | (h & HIGH32)

    cdef inline Py_ssize_t _find(self, const uint8_t *key, uint64_t h) noexcept:
        """Table slot holding ``key`` (in the ring), or -1."""
        cdef size_t i = <size_t>(h >> 32) & self._tmask
        cdef uint64_t slot, fp = h & HIGH32
        while True:
            slot = self._table[i]
            if slot == 0:
                return -1
            if ((slot & HIGH32) == fp and slot_seq(slot) >= self._hseq
                    and memcmp(self._entry(slot_seq(slot)).id, key, 16) == 0):
                return i
            i = (i + 1) & self._tmask

    cdef inline size_t _find_seq(self, uint64_t seq, uint64_t h) noexcept:
        """Table slot of the live entry numbered ``seq`` (whose hash is ``h``)."""
        cdef size_t i = <size_t>(h >> 32) & self._tmask
        while slot_seq(self._table[i]) != seq:
            i = (i + 1) & self._tmask
        return i

    cdef inline void _table_delete(self, size_t i) noexcept:
        """Backward-shift deletion: keep every probe chain unbroken, no tombstones."""
        cdef size_t j = i, home
        cdef uint64_t slot
        while True:
            j = (j + 1) & self._tmask
            slot = self._table[j]
            if slot == 0:
                break
            home = <size_t>(slot >> 32) & self._tmask
            # move slot j to the hole i unless its home lies cyclically in (i, j]
            if (i <= j and (home <= i or home > j)) or (i > j and (home <= i and home > j)):
                self._table[i] = slot
                i = j
        self._table[i] = 0

    cdef inline void _sweep_some(self, size_t budget) noexcept:
        """Examine ``budget`` slots at the sweep cursor, deleting the stale ones.

        A deletion shifts later slots back into the hole, so the cursor stays to examine it again.
        """
        while budget and self._stale:
            if self._is_stale(self._table[self._sweep]):
                self._table_delete(self._sweep)
                self._stale -= 1
            else:
                self._sweep = (self._sweep + 1) & self._tmask
            budget -= 1

    cdef void _sweep_all(self) noexcept:
        """One whole pass: no stale slot survives it (shifts only move slots back to the cursor)."""
        self._sweep_some(2 * (self._tmask + 1))

    cdef inline void _kill_at(self, size_t slot) noexcept:
        self._entry(slot_seq(self._table[slot])).alive = 0
        self._live -= 1
        self._table_delete(slot)

    cdef inline void _pop_head(self) noexcept:
        """Forget the oldest ring entry; its table slot, when alive, becomes stale."""
        cdef DEntry *e = self._entry(self._hseq)
        if e.alive:
            e.alive = 0
            self._live -= 1
            self._stale += 1
        self._hseq += 1

    cdef inline void _expire(self, double now) noexcept:
        cdef DEntry *e
        while self._hseq != self._tseq:
            e = self._entry(self._hseq)
            if e.alive:
                if now < e.t + self.ttl:
                    return
                self._expired += 1
            self._pop_head()

    cdef int _add(self, const uint8_t *key, uint64_t h, double t, uint16_t partition) except -1:
        while self._live >= <size_t>self.max_entries:
            while not self._entry(self._hseq).alive:
                self._pop_head()
            self._pop_head()
            self._evicted += 1
        if self._tseq - self._hseq == self._rcap:
            # full of live and removed entries: grow while mostly live, else compact in place
            if self._rcap < self._rmax and (self._rcap < <size_t>self.max_entries
                                            or self._tseq - self._hseq - self._live < self._rcap // 4):
                self._alloc(self._rcap * 2)
            else:
                self._alloc(self._rcap)
        elif self._tseq >= self._seq_limit:
            self._alloc(self._rcap)  # sequences must fit a slot's 32 bits: renumber from 1
        if 4 * (self._live + self._stale + 1) > 3 * (self._tmask + 1):
            self._sweep_all()
        cdef uint64_t seq = self._tseq
        cdef DEntry *e = self._entry(seq)
        memcpy(e.id, key, 16)
        e.t = t
        e.partition = partition
        e.alive = 1
        self._tseq += 1
        self._live += 1
        self._table_put(h, seq)
        self._sweep_some(SWEEP_STEP)
        self._inserted += 1
        return 0

    cdef inline int _insert(self, const uint8_t *key, uint64_t h, double now, uint16_t partition) except -1:
        """1 if new (inserted), 0 if a live duplicate."""
        self._expire(now)
        cdef Py_ssize_t slot = self._find(key, h)
        if slot >= 0:
            if now < self._entry(slot_seq(self._table[slot])).t + self.ttl:
                self._duplicates += 1
                return 0
            self._kill_at(slot)  # an expired leftover imported out of order
        self._add(key, h, now, partition)
        return 1

    cdef inline void _prefetch_tail(self, size_t j) noexcept:
        """Prefetch, for writing, the ring slot the insert ``j`` steps on fills.

        It was freed ``max_entries`` inserts ago, so in a window larger than the caches it is cold.
        """
        CHOREO_PREFETCH_W(self._entry(self._tseq + j))

    def _set_seq_limit(self, uint64_t limit):
        """Testing: renumber sequences from 1 whenever the next would reach ``limit``."""
        if not 2 * self._rmax < limit <= LOW32:
            raise ValueError(f"the sequence limit must be in ({2 * self._rmax}, 2**32 - 1]")
        self._seq_limit = limit

    def _audit(self):
        """Testing: check the table against the ring; raises AssertionError on any inconsistency."""
        cdef size_t i, tcap = self._tmask + 1, occupied = 0, stale = 0, found = 0
        cdef uint64_t slot, seq
        cdef Py_ssize_t at
        cdef DEntry *e
        assert self._tseq - self._hseq <= self._rcap and self._tseq <= self._seq_limit
        for i in range(tcap):
            slot = self._table[i]
            if slot == 0:
                continue
            occupied += 1
            if self._is_stale(slot):
                stale += 1
                continue
            assert slot_seq(slot) < self._tseq, f"slot {i} names sequence {slot_seq(slot)} beyond the ring"
            e = self._entry(slot_seq(slot))
            assert e.alive, f"slot {i} names a removed entry"
            assert (self._id_hash(e.id) & HIGH32) == (slot & HIGH32), f"slot {i} has the wrong hash"
        assert stale == self._stale, f"{stale} stale slots, counted {self._stale}"
        assert 4 * occupied <= 3 * tcap, f"load {occupied}/{tcap}"
        for seq in range(self._hseq, self._tseq):
            e = self._entry(seq)
            if e.alive:
                found += 1
                at = self._find(e.id, self._id_hash(e.id))
                assert at >= 0 and slot_seq(self._table[at]) == seq, f"entry {seq} not found at its own slot"
        assert found == self._live == occupied - stale, f"{found} live in the ring, {self._live} counted"

    cdef inline bytes _key_of(self, object id):
        cdef bytes b = as_bytes(id)
        if PyBytes_GET_SIZE(b) == 16:
            return b
        return c_hash128(<const uint8_t *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    def __len__(self):
        return self._live

    def insert(self, id, double now, Py_ssize_t partition=0):
        """Check and insert: True if ``id`` is new (now remembered), False if a duplicate."""
        check_partition(partition)
        cdef bytes k = self._key_of(id)
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(k)
        return self._insert(p, self._id_hash(p), now, <uint16_t>partition) == 1

    def insert_many(self, ids, double now, Py_ssize_t partition=0):
        """insert() for each id, in order."""
        check_partition(partition)
        return [self.insert(i, now, partition) for i in ids]

    def insert_envelopes(self, envelopes, double now):
        """insert() of each envelope's msg_id under its partition, reading ids in place.

        Software-pipelined: the batch is hashed first, then each step prefetches the table slot
        that the insert PREFETCH_AHEAD steps later will probe (its id's home) and the ring slot it
        will fill. Evicting or expiring the oldest entry touches neither table nor cold memory
        (see the class doc), so a window larger than the caches costs about the same per id as
        a small one. Objects other than this module's Envelope (the twin's,
        say) are read through their ``msg_id`` and ``partition`` attributes.
        """
        cdef list envs = envelopes if type(envelopes) is list else list(envelopes)
        cdef Py_ssize_t n = len(envs), start, i, end, k
        cdef list out = PyList_New(n)
        cdef uint64_t hs[BLOCK]
        cdef const uint8_t *ptrs[BLOCK]
        cdef object obj, r
        start = 0
        while start < n:
            end = start + BLOCK if start + BLOCK < n else n
            for i in range(start, end):
                obj = envs[i]
                if type(obj) is Envelope:
                    ptrs[i - start] = (<Envelope>obj).id_ptr()
                    hs[i - start] = self._id_hash(ptrs[i - start])
                else:
                    ptrs[i - start] = NULL
            for i in range(start, end):
                k = i - start + PREFETCH_AHEAD
                if k < end - start and ptrs[k] != NULL:
                    CHOREO_PREFETCH(&self._table[<size_t>(hs[k] >> 32) & self._tmask])
                self._prefetch_tail(PREFETCH_AHEAD)
                obj = envs[i]
                if ptrs[i - start] != NULL:
                    r = self._insert(ptrs[i - start], hs[i - start], now, <uint16_t>(<Envelope>obj).partition) == 1
                else:
                    r = self.insert(obj.msg_id, now, obj.partition)
                Py_INCREF(r)
                PyList_SET_ITEM(out, i, r)
            start = end
        return out

    def contains(self, id, double now):
        """Whether ``id`` is remembered at ``now`` (does not insert)."""
        cdef bytes k = self._key_of(id)
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(k)
        cdef Py_ssize_t slot = self._find(p, self._id_hash(p))
        return slot >= 0 and now < self._entry(slot_seq(self._table[slot])).t + self.ttl

    def remove(self, id):
        """Forget one id (a failed attempt that must be allowed again). False if absent."""
        cdef bytes k = self._key_of(id)
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(k)
        cdef Py_ssize_t slot = self._find(p, self._id_hash(p))
        if slot < 0:
            return False
        self._kill_at(slot)
        return True

    def expire(self, double now):
        """Forget entries older than ttl from the oldest; returns how many."""
        cdef uint64_t before = self._expired
        self._expire(now)
        return self._expired - before

    def export_partition(self, Py_ssize_t partition):
        """The entries of one partition, encoded, so they can move with the partition."""
        check_partition(partition)
        cdef size_t count = 0
        cdef uint64_t seq
        cdef DEntry *e
        for seq in range(self._hseq, self._tseq):
            e = self._entry(seq)
            if e.alive and e.partition == partition:
                count += 1
        cdef bytes out = PyBytes_FromStringAndSize(NULL, 4 + count * 24)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
        st32(p, <uint32_t>count)
        p += 4
        for seq in range(self._hseq, self._tseq):
            e = self._entry(seq)
            if e.alive and e.partition == partition:
                memcpy(p, e.id, 16)
                st64(p + 16, double_bits(e.t))
                p += 24
        return out

    def import_entries(self, blob, Py_ssize_t partition):
        """Add exported entries under ``partition`` (keeping their times); returns how many were new."""
        check_partition(partition)
        cdef bytes b = as_bytes(blob)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b), i
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(b)
        if n < 4:
            raise MalformedFrame("truncated", "a dedup export needs at least 4 bytes")
        cdef Py_ssize_t count = ld32(p)
        if n != 4 + count * 24:
            raise MalformedFrame("truncated", f"dedup export of {count} entries needs {4 + count * 24} bytes")
        cdef int added = 0
        cdef double t
        cdef uint64_t h
        for i in range(count):
            h = self._id_hash(p + 4 + i * 24)
            if self._find(p + 4 + i * 24, h) < 0:
                t = bits_double(ld64(p + 4 + i * 24 + 16))
                self._add(p + 4 + i * 24, h, t, <uint16_t>partition)
                added += 1
        return added

    def drop_partition(self, Py_ssize_t partition):
        """Forget every entry of one partition (it moved away); returns how many."""
        check_partition(partition)
        cdef uint64_t seq
        cdef int n = 0
        cdef DEntry *e
        for seq in range(self._hseq, self._tseq):
            e = self._entry(seq)
            if e.alive and e.partition == partition:
                self._kill_at(self._find_seq(seq, self._id_hash(e.id)))
                n += 1
        return n

    @property
    def memory_bytes(self):
        """Bytes held by the ring and the table."""
        return self._rcap * sizeof(DEntry) + (self._tmask + 1) * sizeof(uint64_t)

    def stats(self):
        return DedupStats(self._live, self.max_entries, self.ttl, self._inserted, self._duplicates,
                          self._expired, self._evicted)


# ---------------------------------------------------------------------------------------------
# keyed dispatch

cdef class KeyedDispatch:
    """At most one message per key in progress; the others wait in arrival order."""

    cdef dict _waiting
    cdef readonly Py_ssize_t queued

    def __cinit__(self):
        self._waiting = {}
        self.queued = 0

    cpdef bint admit(self, key, item) except -1:
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

    cpdef object done(self, key):
        """The key's current item finished: returns its next item (now in progress) or None (idle)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            raise KeyError(f"key {key!r} has nothing in progress")
        if waiting:
            self.queued -= 1
            return waiting.popleft()
        del self._waiting[key]
        return None

    def busy(self, key):
        return key in self._waiting

    @property
    def busy_keys(self):
        return len(self._waiting)

    def drain_keys(self, keys):
        """Remove and return the waiting items of some keys (their partition moved away)."""
        out = []
        for k in keys:
            waiting = self._waiting.get(k)
            if waiting:
                out.extend(waiting)
                self.queued -= len(waiting)
                waiting.clear()
        return out


# ---------------------------------------------------------------------------------------------
# lanes: the runtime's per-message loops, compiled, so that emitting an event and handling a
# received batch cross into C once, without per-call argument parsing or per-message objects
# beyond the ones the application sees. They call Python only for what must be Python: the
# codec, the handler, the clock the caller passes in. See the twin for the contract.

cdef class IdSource:
    """Message ids of one node: an 8-byte random prefix and a counter (16 bytes, unique)."""

    cdef uint8_t _id[16]
    cdef uint64_t _n

    def __cinit__(self, bytes prefix not None):
        if PyBytes_GET_SIZE(prefix) != 8:
            raise ValueError(f"prefix must be 8 bytes, got {PyBytes_GET_SIZE(prefix)}")
        memcpy(self._id, PyBytes_AS_STRING(prefix), 8)
        self._n = 0

    cdef inline const uint8_t *_next(self) noexcept:
        self._n += 1
        st64(self._id + 8, self._n)
        return self._id

    def next(self):
        """A new id."""
        return PyBytes_FromStringAndSize(<const char *>self._next(), 16)


DEF LANE_UNKEYED = 0x01
DEF LANE_AHEAD = 4  # FastLane: prefetch the dedup slot of the message this many places ahead


cdef class EmitLane:
    """Where one event type goes from this producer, compiled (see the twin for the contract)."""

    cdef bytes _tname
    cdef object _key_name
    cdef Py_ssize_t _partitions
    cdef list _windows
    cdef object _encode, _key_bytes
    cdef IdSource _ids
    cdef Py_ssize_t _max_batch, _max_batch_bytes, _max_bytes
    cdef readonly Py_ssize_t last
    cdef readonly bint full
    cdef Py_ssize_t _rr

    def __cinit__(self, bytes tname not None, key_name, Py_ssize_t partitions, list windows not None, encode,
                  key_bytes, IdSource ids not None, Py_ssize_t max_batch, Py_ssize_t max_batch_bytes,
                  Py_ssize_t max_bytes):
        if not windows:
            raise ValueError("an emit lane needs at least one window")
        for w in windows:
            if type(w) is not OutboundWindow:
                raise TypeError("windows must be OutboundWindow objects")
        if key_name is not None and len(windows) != partitions:
            raise ValueError(f"a keyed lane needs one window per partition: {len(windows)} for {partitions}")
        if PyBytes_GET_SIZE(tname) < 1 or PyBytes_GET_SIZE(tname) > 255:
            raise ValueError("type must be 1 to 255 bytes")
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
        self.last = -1
        self.full = False

    def emit(self, event, double now, msg_id=None):
        """Write one event into its window; returns its id, or None (caller: take the slow path)."""
        cdef bytes payload = self._encode(event)
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload), klen = 0, tlen = PyBytes_GET_SIZE(self._tname)
        cdef const char *k = ""
        cdef object value, kb
        cdef int partition = 0, flags = 0
        cdef Py_ssize_t index, i, j, best_load = -1, load
        cdef OutboundWindow w = None, cand
        if plen > self._max_bytes:
            return None
        if self._key_name is not None:
            value = getattr(event, self._key_name)
            if type(value) is str:
                k = PyUnicode_AsUTF8AndSize(value, &klen)
            else:
                kb = self._key_bytes(value)
                k = PyBytes_AS_STRING(kb)
                klen = PyBytes_GET_SIZE(kb)
            if klen > 0xFFFF:
                return None
            partition = <int>choreo_mulhi(c_hash64(<const uint8_t *>k, klen, 0), <uint64_t>self._partitions)
            index = partition
            w = <OutboundWindow>self._windows[index]
        else:
            flags = LANE_UNKEYED
            index = -1
            self._rr += 1  # equally loaded candidates take turns
            for j in range(len(self._windows)):
                i = (j + self._rr) % len(self._windows)
                cand = <OutboundWindow>self._windows[i]
                if cand.held:
                    continue
                load = cand._in_flight
                if best_load < 0 or load < best_load:
                    best_load, index, w = load, i, cand
            if w is None:
                return None
        cdef Py_ssize_t size = HDR + tlen + klen + plen
        if w.held or not w._credit(size):
            return None
        cdef const uint8_t *mid
        if msg_id is None:
            mid = self._ids._next()
        else:
            if type(msg_id) is not bytes or PyBytes_GET_SIZE(msg_id) != 16:
                raise ValueError("msg_id must be 16 bytes")
            mid = <const uint8_t *>PyBytes_AS_STRING(msg_id)
        cdef bytes out_id = PyBytes_FromStringAndSize(<const char *>mid, 16)
        w._reserve(size)
        write_raw(w._buf + w._buf_len, w.next_seq, 1, flags, PyBytes_AS_STRING(self._tname), tlen, k, klen,
                  partition, mid, mid, _ZEROS, PyBytes_AS_STRING(payload), plen)
        w._admit(size, now)
        self.last = index
        self.full = w._pending >= self._max_batch or <Py_ssize_t>w._buf_len >= self._max_batch_bytes
        return out_id


# FastLane.run statuses
LANE_END = 0         # every envelope handled
LANE_SLOW = 1        # envs[index] is not for the lane: the caller takes it
LANE_DUPLICATE = 2   # envs[index] is a duplicate (its id was seen): the caller answers it
LANE_BAD = 3         # envs[index]'s body failed to decode (its id is now remembered)
LANE_FAILED = 4      # envs[index]'s handler raised: (message, error, started) come back
LANE_EFFECTS = 5     # envs[index]'s handler emitted or sent: (message, ctx, started) come back


cdef class _LaneEntry:
    cdef object decode, fn, name, handler
    cdef DedupWindow window
    cdef bint takes_context


cdef class FastLane:
    """Runs received events whose handler is a plain function, in a C loop (see the twin)."""

    cdef dict _entries
    cdef readonly object ok  # the span outcome of a handled message

    def __cinit__(self):
        self._entries = {}
        self.ok = "ok"

    def set(self, str type_name not None, decode, window, fn, str name not None, bint takes_context, handler=None):
        """Let the lane handle ``type_name``; ``window`` is its DedupWindow (None: no dedup)."""
        cdef _LaneEntry e = _LaneEntry.__new__(_LaneEntry)
        if window is not None and type(window) is not DedupWindow:
            raise TypeError("window must be a DedupWindow or None")
        e.decode, e.fn, e.name, e.window, e.takes_context = decode, fn, name, window, takes_context
        e.handler = handler
        self._entries[type_name] = e

    def forget(self, str type_name not None):
        self._entries.pop(type_name, None)

    def handles(self, type_name):
        return type_name in self._entries

    def run(self, list envs not None, Py_ssize_t start, InboundReorder reorder not None, double now, clock,
            received, gate, KeyedDispatch keyed not None, spans_append, ctx):
        """Handle ``envs[start:]`` in order until one needs the caller.

        Returns ``(handled, index, status, a, b, started)``: how many were handled here, the
        index where it stopped and why (``LANE_*``), and for FAILED/EFFECTS the decoded message,
        the error (FAILED) or the context (EFFECTS), and when the handler started. ``ctx`` is a
        reusable context object (its ``_env``/``_handler``/``outputs`` are set here) or None.
        """
        cdef Py_ssize_t n = len(envs), i, handled = 0, glen = 0
        cdef const char *gptr = NULL
        cdef Envelope env, ahead
        cdef _LaneEntry e, ea
        cdef object entry, message, t0, t1, obj_ahead
        cdef tuple span
        cdef uint64_t h
        cdef const uint8_t *idp
        cdef bint keyed_busy
        if gate is not None:
            gptr = PyByteArray_AS_STRING(gate)
            glen = PyByteArray_GET_SIZE(gate)
        t1 = clock()  # one reading per message: each one's start is the previous one's end
        for i in range(start, n):
            if i + LANE_AHEAD < n:  # warm the dedup table slot a few messages ahead
                obj_ahead = envs[i + LANE_AHEAD]
                if type(obj_ahead) is Envelope:
                    ahead = <Envelope>obj_ahead
                    entry = self._entries.get(ahead.type)
                    if entry is not None:
                        ea = <_LaneEntry>entry
                        if ea.window is not None:
                            ea.window._prefetch_id(ahead.id_ptr())
            obj = envs[i]
            if type(obj) is not Envelope:
                return handled, i, LANE_SLOW, None, None, 0.0
            env = <Envelope>obj
            entry = self._entries.get(env.type)
            if entry is None or env.kind != 1:
                return handled, i, LANE_SLOW, None, None, 0.0
            e = <_LaneEntry>entry
            if not env.flags & 0x03:  # keyed, not broadcast: ours now? key idle?
                if gptr != NULL and (env.partition >= glen or not gptr[env.partition]):
                    return handled, i, LANE_SLOW, None, None, 0.0
                if keyed._waiting and env.key in keyed._waiting:
                    return handled, i, LANE_SLOW, None, None, 0.0
            if e.window is not None:
                idp = env.id_ptr()
                h = e.window._id_hash(idp)
                if e.window._insert(idp, h, now, <uint16_t>env.partition) == 0:
                    return handled, i, LANE_DUPLICATE, None, None, 0.0
            try:
                message = e.decode(env._bytes_at(HDR + env._tlen + env._klen, env._plen))
            except Exception:
                return handled, i, LANE_BAD, None, None, 0.0
            t0 = t1
            try:
                if e.takes_context:
                    ctx._env = env
                    ctx._handler = e.handler
                    e.fn(message, ctx)
                else:
                    e.fn(message)
            except Exception as exc:
                return handled, i, LANE_FAILED, message, exc, t0
            if e.takes_context and ctx.outputs:
                return handled, i, LANE_EFFECTS, message, ctx, t0
            t1 = clock()
            if spans_append is not None:
                # the three ids as one bytes object (msg_id | trace_id | cause_id, as on the wire):
                # choreo.tracing.unpack splits them when the span is read
                span = (env._bytes_at(20, 48), None, None, env.type, e.name, received, t0, t1, self.ok, None, 1,
                        env._bytes_at(HDR + env._tlen, env._klen), env.partition)
                PyObject_GC_UnTrack(span)  # atoms only: the cycle collector need never visit it
                spans_append(span)
            reorder._complete(env.seq)
            handled += 1
        return handled, n, LANE_END, None, None, 0.0
