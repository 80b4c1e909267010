# cython: language_level=3
"""The delivery core, compiled: choreo._core.

Behaviour is defined by the pure-Python twin ``choreo/_pycore.py`` (read it first: it is the
specification and holds the layouts); this module does the same in C-level loops so that the
runtime crosses from Python into the core once per *batch*. The property tests require the two
to agree on arbitrary operation sequences.

Sans-IO: no sockets, no clocks, no sleeps. Every time is a ``now`` the caller passes.

This file holds the shared declarations; the parts follow in their own files, included at the
end: ``hashing.pxi``, ``envelopes.pxi`` (and acks), ``window.pxi``, ``reorder.pxi``,
``dedup.pxi``, ``lanes.pxi`` (keyed dispatch, ids, the emit and receive lanes).

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
from cpython.ref cimport PyObject, PyTypeObject, Py_INCREF, Py_DECREF, Py_XDECREF, Py_TYPE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.dict cimport PyDict_GetItem
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.pycapsule cimport PyCapsule_IsValid, PyCapsule_GetPointer

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object o)

cdef extern from "Python.h":
    # PyList_SET_ITEM taking a raw pointer: hands over a reference we already own
    void list_give_item "PyList_SET_ITEM" (object lst, Py_ssize_t i, PyObject *o)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memcmp, memset
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.math cimport INFINITY

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
DEF SCRATCH_KEEP = 262144  # bytes an emit lane's encoding buffer keeps between writes (more: a fresh one)

ACCEPTED = 0
DUPLICATE = 1
BEYOND_WINDOW = 2
HEADER_SIZE = HDR
MAX_ACK_RANGES = _MAX_ACK_RANGES

cdef extern from *:
    """
    /* GCC counts __builtin_prefetch as free of side effects, so a function holding only
       prefetches is inferred pure and a call to it is dropped: the empty volatile asm is a side
       effect that keeps every prefetch where it is written, in a helper or not. */
    #define CHOREO_PREFETCH(p) do { __builtin_prefetch((const void *)(p)); __asm__ __volatile__(""); } while (0)
    #define CHOREO_PREFETCH_W(p) do { __builtin_prefetch((const void *)(p), 1); __asm__ __volatile__(""); } while (0)
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

# The parts, in dependency order (each file one job; Cython compiles them as this one module).
include "hashing.pxi"
include "envelopes.pxi"
include "window.pxi"
include "reorder.pxi"
include "dedup.pxi"
include "lanes.pxi"
include "state.pxi"
