# Part of choreo/_core.pyx (included there, compiled as one module): The outbound window: sequence numbers, credit, acks, retransmission.

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
    cdef double _pending_since              # the ``now`` of the first of them
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
    def pending_since(self):
        return self._pending_since if self._pending else None

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
            self._pending_since = now
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
