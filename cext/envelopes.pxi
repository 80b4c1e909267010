# Part of choreo/_core.pyx (included there, compiled as one module): Envelopes and acks: the layouts of choreo/_pycore.py, parsed and packed in C.

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


def decode_replies(frame, Py_ssize_t offset=0):
    """The ``(msg_id, type, body)`` entries of a REPLY frame's body at ``offset``, or MalformedFrame.

    An entry is the 16-byte message id, the type name's length (one byte) and name (UTF-8), the
    body's length (four bytes, little-endian) and body."""
    cdef bytes b = as_bytes(frame)
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(b)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(b), pos = offset, tlen, blen
    cdef list out = []
    if pos < 0 or pos > end:
        raise MalformedFrame("truncated", f"offset {offset} beyond frame of {end} bytes")
    while pos < end:
        if end - pos < ID_SIZE + 1:
            raise MalformedFrame("truncated", "a reply entry is cut short")
        tlen = p[pos + ID_SIZE]
        if end - pos - ID_SIZE - 1 < tlen + 4:
            raise MalformedFrame("truncated", "a reply entry is cut short")
        blen = ld32(p + pos + ID_SIZE + 1 + tlen)
        if end - pos - ID_SIZE - 5 - tlen < blen:
            raise MalformedFrame("truncated", "a reply body overruns the frame")
        out.append((
            PyBytes_FromStringAndSize(<const char *>p + pos, ID_SIZE),
            (<const char *>p)[pos + ID_SIZE + 1 : pos + ID_SIZE + 1 + tlen].decode("utf-8", "replace"),
            PyBytes_FromStringAndSize(<const char *>p + pos + ID_SIZE + 5 + tlen, blen),
        ))
        pos += ID_SIZE + 5 + tlen + blen
    return out


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
