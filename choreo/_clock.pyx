# cython: language_level=3
"""The node's monotonic clock as a C function, for the compiled lanes.

The receive lane reads the clock once per message it hands to a handler (each span's start is
the previous one's end). Called from C as ``time.monotonic()`` that reading goes through a
Python call and a float object; measured in the real processes of the e2e workload, the
consumer's CPU per event fell by ~5% when the lane read the same clock directly. So the lane
also accepts ``MONOTONIC``, a capsule holding this module's C reading of that clock, and
``choreo.core.lane_clock`` hands it over wherever the node's clock is ``time.monotonic``.

A clock is I/O, so it lives here and not in ``cext/``: the delivery core only calls the clock it
is given (simulations still give it theirs).
"""

from cpython.pycapsule cimport PyCapsule_New

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t, timespec *)
    clockid_t CLOCK_MONOTONIC

__all__ = ["MONOTONIC", "monotonic"]


cdef double monotonic_now() noexcept nogil:
    """``time.monotonic()`` exactly: CPython reads CLOCK_MONOTONIC and divides its nanoseconds."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>(<long long>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9


def monotonic() -> float:
    """The reading the capsule gives, from Python (to check it against ``time.monotonic``).

    >>> import time
    >>> abs(monotonic() - time.monotonic()) < 1.0
    True
    """
    return monotonic_now()


MONOTONIC = PyCapsule_New(<void *>monotonic_now, b"choreo.clock", NULL)  # the name the lanes check
