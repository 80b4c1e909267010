# Part of choreo/_core.pyx (included there, compiled as one module): The inbound reorder buffer: out-of-order and duplicate arrivals in, strict sequence out.

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
    cdef uint64_t _ranges_from  # where the next ack's ranges start (0: just above cumulative)

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

    cdef int _ranges(self, uint64_t *los, uint64_t *his, bint advance) noexcept:
        # the done ranges above cumulative, from where the last ack's stopped when it had more than
        # it could carry (they take turns: see the twin), at most _MAX_ACK_RANGES
        cdef int n = 0
        cdef uint64_t seq = self.done_upto + 1, lo = 0
        cdef bint open_ = False
        if self._ranges_from > seq:
            seq = self._ranges_from
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
        if advance:
            self._ranges_from = his[n - 1] + 1 if n == _MAX_ACK_RANGES else 0
        return n

    def ack(self):
        """``(cumulative done, received, done ranges above cumulative)``, at most MAX_ACK_RANGES."""
        cdef uint64_t los[_MAX_ACK_RANGES]
        cdef uint64_t his[_MAX_ACK_RANGES]
        cdef int n = self._ranges(los, his, False)
        return self.done_upto, self.released_upto, [(los[i], his[i]) for i in range(n)]

    @property
    def ack_pending(self):
        return self._ack_dirty

    def ack_frame(self):
        """The encoded ack(); clears ack_pending unless its ranges were full (acks take turns
        through the done ranges: see the twin)."""
        cdef uint64_t los[_MAX_ACK_RANGES]
        cdef uint64_t his[_MAX_ACK_RANGES]
        cdef int n = self._ranges(los, his, True), i
        self._ack_dirty = n == _MAX_ACK_RANGES  # (more may be done above them: the next ack says so)
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
