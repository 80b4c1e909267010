# Part of choreo/_core.pyx (included there, compiled as one module): Keyed dispatch, ids, and the lanes: the runtime's per-message loops, compiled.

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

ctypedef double (*lane_clock_fn)() noexcept nogil


cdef inline lane_clock_fn lane_clock_of(object clock) noexcept:
    """The C function a clock capsule holds (``choreo._clock.MONOTONIC``), or NULL for a callable.

    The caller's clock either way: the capsule only saves a Python call and a float per reading.
    """
    cdef const char *name = b"choreo.clock"
    return <lane_clock_fn>PyCapsule_GetPointer(clock, name) if PyCapsule_IsValid(clock, name) else NULL


cdef inline double lane_now(lane_clock_fn read_clock, object clock) except? -1:
    """One reading of the caller's clock: its C function if it came as one (see lane_clock_of)."""
    return read_clock() if read_clock != NULL else <double>clock()

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


# The lanes' part of the wire contract (choreo.wire takes its constants from here): an event's
# envelope kind, the flags of envelopes that wait on no key, and the flag of a replayed dead
# letter (set by its own node only: the lane leaves one from the wire to the caller, who refuses it).
DEF _KIND_EVENT = 1
DEF _FLAG_UNKEYED = 0x01
DEF _FLAG_BROADCAST = 0x02
DEF _FLAG_REPLAY = 0x04
KIND_EVENT = _KIND_EVENT
FLAG_UNKEYED = _FLAG_UNKEYED
FLAG_BROADCAST = _FLAG_BROADCAST
FLAG_REPLAY = _FLAG_REPLAY
DEF SPAN_KEY_MAX = 128  # bytes of a message's key a span keeps (keys may be 64 KiB; the span ring is not)
SPAN_KEY_BYTES = SPAN_KEY_MAX
DEF LANE_AHEAD = 4  # FastLane: prefetch the dedup slot of the message this many places ahead


cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    int T_OBJECT_EX

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    PyTypeObject PyMemberDescr_Type


cdef Py_ssize_t slot_offset(cls, str name) except -2:
    """Where instances of ``cls`` keep field ``name`` (a slot read without a lookup), or -1 (use getattr)."""
    if cls is None or name is None:
        return -1
    descr = None
    for klass in cls.__mro__:
        descr = klass.__dict__.get(name)
        if descr is not None:
            break
    if descr is None or Py_TYPE(descr) is not &PyMemberDescr_Type:
        return -1
    cdef PyMemberDef *m = (<PyMemberDescrObject *><PyObject *>descr).d_member
    if m == NULL or m.type != T_OBJECT_EX or m.offset <= 0:
        return -1
    return m.offset


cdef inline PyObject *slot_at(object obj, Py_ssize_t offset) noexcept:
    """The object in a slot (NULL: unset), borrowed."""
    return (<PyObject **>((<char *><PyObject *>obj) + offset))[0]


cdef inline int slot_put(object obj, Py_ssize_t offset, object value) except -1:
    """Store ``value`` in a slot found by :func:`slot_offset` (the old value released last)."""
    cdef PyObject **p = <PyObject **>((<char *><PyObject *>obj) + offset)
    cdef PyObject *old = p[0]
    Py_INCREF(value)
    p[0] = <PyObject *>value
    Py_XDECREF(old)
    return 0


# The handler context's per-message fields (choreo.runtime.context.HandlerContext), read and
# written by the lane and by ctx.state for every message: through their slots, without the
# attribute lookup a getattr makes, when the context's class keeps them all in plain slots.
cdef struct CtxLayout:
    Py_ssize_t envelope, handler, writes, outputs, state  # slot offsets; -1: use getattr/setattr


cdef int ctx_layout(CtxLayout *lay, cls) except -1:
    """Fill ``lay`` for contexts of class ``cls`` (all -1 unless every field is a plain slot, and
    the class reads and writes attributes as object does: nothing of its own to bypass)."""
    lay.envelope = lay.handler = lay.writes = lay.outputs = lay.state = -1
    if cls.__getattribute__ is not object.__getattribute__ or cls.__setattr__ is not object.__setattr__:
        return 0
    lay.envelope = slot_offset(cls, "envelope")
    lay.handler = slot_offset(cls, "handler")
    lay.writes = slot_offset(cls, "writes")
    lay.outputs = slot_offset(cls, "outputs")
    lay.state = slot_offset(cls, "state")
    if lay.envelope < 0 or lay.handler < 0 or lay.writes < 0 or lay.outputs < 0 or lay.state < 0:
        lay.envelope = lay.handler = lay.writes = lay.outputs = lay.state = -1
    return 0


cdef inline object ctx_get(object ctx, Py_ssize_t offset, str name):
    """``ctx.<name>``, from its slot when ``offset`` >= 0 (an unset slot: getattr, which says so)."""
    cdef PyObject *p
    if offset >= 0:
        p = slot_at(ctx, offset)
        if p != NULL:
            return <object>p
    return getattr(ctx, name)


cdef inline int ctx_set(object ctx, Py_ssize_t offset, str name, object value) except -1:
    """``ctx.<name> = value``, into its slot when ``offset`` >= 0."""
    if offset >= 0:
        return slot_put(ctx, offset, value)
    setattr(ctx, name, value)
    return 0


cdef bint fields_fit(object obj, tuple fields, Py_ssize_t *offs) except -1:
    """Every field's value is of exactly one of its declared simple types (``fields``:
    ``messages.simple_fields``), so decoding ``obj``'s encoding could only pass; False: check it
    in full. ``offs``: each field's slot offset in ``obj`` (NULL: read them with getattr)."""
    cdef tuple pair, types
    cdef object t
    cdef Py_ssize_t j, f = 0
    cdef PyObject *slot
    for pair in fields:
        f += 1
        if pair[1] is None:
            continue
        types = <tuple>pair[1]
        slot = slot_at(obj, offs[f - 1]) if offs != NULL else NULL
        t = <object>Py_TYPE(<object>slot) if slot != NULL else type(getattr(obj, <str>pair[0]))
        for j in range(len(types)):
            if t is types[j]:
                break
        else:
            return False
    return True


# EmitLane.emit_many statuses
EMIT_END = 0       # every event from ``start`` on went in
EMIT_OTHER = 1     # events[index] is of another type (the caller takes it to its own lane)
EMIT_BLOCKED = 2   # events[index] did not go in (no credit, a held window, too large): the caller waits
EMIT_INVALID = 3   # events[index] fails its type's check: nothing of this call went in


cdef class EmitLane:
    """Where one event type goes from this producer, compiled (see the twin for the contract)."""

    cdef bytes _tname
    cdef object _key_name
    cdef Py_ssize_t _partitions
    cdef list _windows
    cdef object _encode, _key_bytes, _check
    cdef IdSource _ids
    cdef Py_ssize_t _max_batch, _max_batch_bytes, _max_bytes
    cdef readonly Py_ssize_t last
    cdef readonly bint full
    cdef Py_ssize_t _rr
    # the runtime's side (optional): channel per window, the dirty set, flush hooks, clock, type
    cdef list _channels
    cdef dict _dirty
    cdef object _schedule, _send_full, _clock, _cls, _idempotency
    cdef tuple _fields
    cdef Py_ssize_t _key_off            # where an event of exactly ``cls`` keeps its key (-1: getattr)
    cdef Py_ssize_t *_field_offs        # the same for each of ``fields`` (NULL: getattr)
    cdef readonly Py_ssize_t emitted
    cdef int _kind                      # the envelope kind it writes (a command's or query's: request())
    # encode_into(message, buffer, offset): bodies encoded into one reused bytearray, copied into
    # the window from there (no bytes object made and freed per message); busy while its bytes
    # are still to be copied, so a write that re-enters the lane (a key's or an id's function
    # emitting) encodes into a bytes object of its own instead
    cdef object _encode_into
    cdef bytearray _scratch
    cdef bint _scratch_busy

    def __cinit__(self, bytes tname not None, key_name, Py_ssize_t partitions, list windows not None, encode,
                  key_bytes, IdSource ids not None, Py_ssize_t max_batch, Py_ssize_t max_batch_bytes,
                  Py_ssize_t max_bytes, check=None, list channels=None, dict dirty=None, schedule=None,
                  send_full=None, clock=None, cls=None, idempotency=None, tuple fields=None, int kind=_KIND_EVENT,
                  encode_into=None):
        if not windows:
            raise ValueError("an emit lane needs at least one window")
        for w in windows:
            if type(w) is not OutboundWindow:
                raise TypeError("windows must be OutboundWindow objects")
        if key_name is not None and len(windows) != partitions:
            raise ValueError(f"a keyed lane needs one window per partition: {len(windows)} for {partitions}")
        if PyBytes_GET_SIZE(tname) < 1 or PyBytes_GET_SIZE(tname) > 255:
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
        self._kind = kind
        self._encode_into = encode_into
        self._scratch = bytearray()
        if fields is not None:
            for f in fields:
                if type(f) is not tuple or len(f) != 2 or type(f[0]) is not str or (
                        f[1] is not None and type(f[1]) is not tuple):
                    raise TypeError("fields must be (name, tuple of types or None) pairs")
        self._fields = fields
        self._key_off = slot_offset(cls, key_name)
        cdef Py_ssize_t i
        if fields is not None and cls is not None:
            self._field_offs = <Py_ssize_t *>malloc((len(fields) + 1) * sizeof(Py_ssize_t))
            if self._field_offs == NULL:
                raise MemoryError()
            for i in range(len(fields)):
                self._field_offs[i] = slot_offset(cls, fields[i][0])
                if self._field_offs[i] < 0:
                    free(self._field_offs)
                    self._field_offs = NULL
                    break
        self.last = -1
        self.full = False

    def __dealloc__(self):
        free(self._field_offs)

    cdef object _write(self, event, const char *payload, Py_ssize_t plen, object now, msg_id, trace_id=None,
                       cause_id=None, on_done=None):
        """Route and write one encoded message (``plen`` bytes at ``payload``); its id, or None
        (it did not go in). ``now`` None: the time its window's batch began, or the clock's when
        this one begins it."""
        cdef Py_ssize_t klen = 0, tlen = PyBytes_GET_SIZE(self._tname)
        cdef const char *k = ""
        cdef object value, kb
        cdef int partition = 0, flags = 0
        cdef Py_ssize_t index, i, j, best_load = -1, load
        cdef OutboundWindow w = None, cand
        cdef PyObject *slot
        if self._key_name is not None:
            slot = slot_at(event, self._key_off) if self._key_off >= 0 and type(event) is self._cls else NULL
            value = <object>slot if slot != NULL else getattr(event, self._key_name)
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
            flags = _FLAG_UNKEYED
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
        cdef const uint8_t *tid = mid
        cdef const uint8_t *cid = _ZEROS
        if trace_id is not None:
            if type(trace_id) is not bytes or PyBytes_GET_SIZE(trace_id) != 16:
                raise ValueError("trace_id must be 16 bytes")
            tid = <const uint8_t *>PyBytes_AS_STRING(trace_id)
        if cause_id is not None:
            if type(cause_id) is not bytes or PyBytes_GET_SIZE(cause_id) != 16:
                raise ValueError("cause_id must be 16 bytes")
            cid = <const uint8_t *>PyBytes_AS_STRING(cause_id)
        cdef bytes out_id = PyBytes_FromStringAndSize(<const char *>mid, 16)
        cdef uint64_t seq = w.next_seq
        w._reserve(size)
        write_raw(w._buf + w._buf_len, seq, self._kind, flags, PyBytes_AS_STRING(self._tname), tlen, k, klen,
                  partition, mid, tid, cid, payload, plen)
        cdef double t
        if now is not None:
            t = now
        elif w._pending:
            t = w._pending_since  # the batch's time: one clock reading per batch
        else:
            t = self._clock()
        w._admit(size, t)
        self.last = index
        self.full = w._pending >= self._max_batch or <Py_ssize_t>w._buf_len >= self._max_batch_bytes
        self.emitted += 1
        if self._channels is not None:
            ch = self._channels[index]
            if self._kind != _KIND_EVENT:
                ch.urgent = True  # its batch's frame says so: the receiver takes it first
            if on_done is not None:
                ch.watch[seq] = on_done  # called when its receiver acknowledges it
            if self.full:
                self._send_full(ch)  # the batch leaves now
            elif w._pending == 1:  # the window's first pending envelope: its channel joins the dirty set
                if not self._dirty:
                    self._schedule()  # nothing was waiting for a flush: one is due
                self._dirty[ch] = None
        return out_id

    cdef inline bint _fields_fit(self, event) except -1:
        """Every field's value is of exactly one of its declared simple types (then the check of the
        body could only pass); False sends the body to the full check."""
        cdef bint direct = self._field_offs != NULL and type(event) is self._cls
        return fields_fit(event, self._fields, self._field_offs if direct else NULL)

    cdef inline bint _valid(self, event, bytearray buf, Py_ssize_t off, Py_ssize_t plen) except -1:
        """Whether the body of ``plen`` bytes at ``off`` in ``buf`` may go out as it is."""
        if plen > self._max_bytes:
            return False
        if self._fields is not None and self._fields_fit(event):
            return True
        if self._check is not None:
            try:
                self._check(PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + off, plen))
            except Exception:
                return False  # the slow path names the field that does not match its type
        return True

    cdef inline Py_ssize_t _encode_at(self, bytearray buf, message, Py_ssize_t off) except -1:
        """Encode ``message`` into ``buf`` from ``off`` (``buf`` ends with it then); its length."""
        if self._encode_into is not None:
            self._encode_into(message, buf, off)
        else:
            buf[off:] = self._encode(message)
        return PyByteArray_GET_SIZE(buf) - off

    cdef inline bytearray _take_scratch(self):
        """The bytearray to encode into: the lane's own, or a new one if a write is using it."""
        if self._scratch_busy:
            return bytearray()
        self._scratch_busy = True
        return self._scratch

    cdef inline void _give_back(self, bytearray buf) noexcept:
        if buf is self._scratch:
            self._scratch_busy = False
            if PyByteArray_GET_SIZE(buf) > SCRATCH_KEEP:
                self._scratch = bytearray()  # (a large body or batch: do not hold its memory)

    def emit(self, event, now=None, msg_id=None):
        """Write one event into its window; returns its id, or None (caller: take the slow path)."""
        return self._emit(event, now, msg_id)

    def request(self, message, msg_id, trace_id=None, cause_id=None, on_done=None):
        """Write one command or query (see the twin); its id, or None (caller: take the slow path)."""
        if self._channels is None or self._clock is None:
            raise ValueError("request needs the lane's channels and clock")
        cdef bytearray buf = self._take_scratch()
        cdef Py_ssize_t plen
        try:
            plen = self._encode_at(buf, message, 0)
            if not self._valid(message, buf, 0, plen):
                return None
            return self._write(message, PyByteArray_AS_STRING(buf), plen, None, msg_id, trace_id, cause_id, on_done)
        finally:
            self._give_back(buf)

    cdef object _emit(self, event, now, msg_id):
        """:meth:`emit`, callable from C (EmitTable calls it with neither ``now`` nor ``msg_id``)."""
        cdef bytearray buf = self._take_scratch()
        cdef Py_ssize_t plen
        try:
            plen = self._encode_at(buf, event, 0)
            if not self._valid(event, buf, 0, plen):
                return None
            if msg_id is None and self._idempotency is not None:
                msg_id = self._idempotency(event)
            return self._write(event, PyByteArray_AS_STRING(buf), plen, now, msg_id)
        finally:
            self._give_back(buf)

    def emit_many(self, list events not None, Py_ssize_t start, list ids not None):
        """Write ``events[start:]`` in order while they are of this lane's type and go in.

        Every event of the lane's type from ``start`` on is checked first: if one fails, nothing
        is written. Returns ``(index, status)`` (``EMIT_*``): where it stopped and why; the id of
        every event written is appended to ``ids``.
        """
        cdef Py_ssize_t n = len(events), i, end = start, off = 0, plen
        cdef object now, msg_id = None
        if self._cls is None or self._clock is None:
            raise ValueError("emit_many needs the lane's message class (cls=) and clock")
        while end < n and type(events[end]) is self._cls:
            end += 1
        # the bodies one after another in one buffer; ends[k]: where the k-th one ends
        cdef Py_ssize_t *ends = <Py_ssize_t *>malloc((end - start + 1) * sizeof(Py_ssize_t))
        if ends == NULL:
            raise MemoryError()
        cdef bytearray buf = self._take_scratch()
        try:
            for i in range(start, end):
                plen = self._encode_at(buf, events[i], off)
                if not self._valid(events[i], buf, off, plen):
                    return i, EMIT_INVALID
                off += plen
                ends[i - start] = off
            now = self._clock()
            off = 0
            for i in range(start, end):
                if self._idempotency is not None:
                    msg_id = self._idempotency(events[i])
                out_id = self._write(events[i], PyByteArray_AS_STRING(buf) + off, ends[i - start] - off, now, msg_id)
                if out_id is None:
                    return i, EMIT_BLOCKED
                ids.append(out_id)
                off = ends[i - start]
            return end, EMIT_END if end == n else EMIT_OTHER
        finally:
            free(ends)
            self._give_back(buf)


cdef class EmitTable:
    """A sender's fast path in one call: the lane of the event's type, while nothing it depends on
    changed. See the twin (choreo._pycore.EmitTable) for the contract."""

    cdef dict _lanes
    cdef object _life
    cdef dict _holds
    cdef public object fallback  # try_emit's general path: fallback(event, traceparent)

    def __cinit__(self, dict holds not None, life):
        self._lanes = {}
        self._holds, self._life = holds, life

    def put(self, cls, lane):
        """``cls``'s events go through ``lane`` (None: never here) until :meth:`clear`."""
        if not isinstance(cls, type):
            raise TypeError("cls must be a class")
        if lane is not None and type(lane) is not EmitLane:
            raise TypeError("lane must be an EmitLane or None")
        if lane is None:
            self._lanes.pop(cls, None)
        else:
            self._lanes[cls] = lane

    def clear(self):
        self._lanes.clear()

    def __len__(self):
        return len(self._lanes)

    cdef inline object _take(self, event):
        cdef PyObject *lane = PyDict_GetItem(self._lanes, <object>Py_TYPE(event))
        if lane == NULL or self._holds or self._life.fatal is not None:
            return None
        return (<EmitLane>lane)._emit(event, None, None)

    def emit(self, event):
        """Write ``event`` through its type's lane; its id, or None: take the general path."""
        return self._take(event)

    def try_emit(self, event, *, traceparent=None):
        """:meth:`emit`'s id, else (and with a ``traceparent``) what ``fallback`` returns."""
        cdef object msg_id
        if traceparent is None:
            msg_id = self._take(event)
            if msg_id is not None:
                return msg_id
        if self.fallback is None:
            raise ValueError("try_emit needs the table's fallback")
        return self.fallback(event, traceparent)


cdef class SpanRing  # (below: the lanes record into it)
cdef class StateView  # (state.pxi: the lane commits a handler's writes)


# FastLane.run statuses
LANE_END = 0         # every envelope handled
LANE_SLOW = 1        # envs[index] is not for the lane: the caller takes it
LANE_DUPLICATE = 2   # envs[index] is a duplicate (its id was seen): the caller answers it
LANE_BAD = 3         # envs[index]'s body failed to decode (its id is now remembered)
LANE_FAILED = 4      # envs[index]'s handler raised: (message, error, started) come back
LANE_EFFECTS = 5     # envs[index]'s handler emitted or sent: (message, ctx, started) come back
LANE_BATCH_FAILED = 6  # a batch handler raised on envs[index:index + len(messages)]: (messages, error, started)
LANE_RESULT = 7      # envs[index]'s command or query returned, and its answer needs the caller:
                     # (message, (ctx, result), started) come back
LANE_LATE = 8        # the clock passed ``until`` before envs[index]'s handler: the caller looks at the
                     # time (was the node frozen?) before it runs any more; started is that reading


cdef class _LaneEntry:
    cdef object decode, fn, name, handler
    cdef DedupWindow window
    cdef bint takes_context, batch
    cdef int kind


cdef class FastLane:
    """Runs received messages whose handler is a plain function, in a C loop (see the twin)."""

    cdef dict _entries
    cdef readonly object ok  # the span outcome of a handled message
    cdef object _ctx_type    # the class _ctx_lay is for
    cdef CtxLayout _ctx_lay

    def __cinit__(self):
        self._entries = {}
        self.ok = "ok"

    def set(self, str type_name not None, decode, window, fn, str name not None, bint takes_context, handler=None,
            bint batch=False, int kind=_KIND_EVENT):
        """Let the lane handle ``type_name``; ``window`` is its DedupWindow (None: no dedup);
        ``batch``: ``fn`` takes a list of messages (every run of them), never a context;
        ``kind``: the envelope kind it takes (a command's or query's result goes to ``run``'s ``answer``)."""
        cdef _LaneEntry e = _LaneEntry.__new__(_LaneEntry)
        if window is not None and type(window) is not DedupWindow:
            raise TypeError("window must be a DedupWindow or None")
        if batch and takes_context:
            raise ValueError("a batch handler takes no context")
        if batch and kind != _KIND_EVENT:
            raise ValueError("only an event handler takes batches")
        e.kind = kind
        e.decode, e.fn, e.name, e.window, e.takes_context = decode, fn, name, window, takes_context
        e.handler = handler
        e.batch = batch
        self._entries[type_name] = e

    def forget(self, str type_name not None):
        self._entries.pop(type_name, None)

    def handles(self, type_name):
        return type_name in self._entries

    cdef inline int _prefetch(self, list envs, Py_ssize_t k, Py_ssize_t n, Envelope env, _LaneEntry e,
                              SpanRing ring) except -1:
        """Warm the dedup table slot of ``envs[k]`` (a few messages ahead of ``env``, handled by ``e``)
        and the span slot its record fills."""
        cdef object obj, entry
        cdef Envelope ahead
        cdef _LaneEntry ea = e
        if ring is not None:
            ring._prefetch_ahead(LANE_AHEAD)
        if k >= n:
            return 0
        obj = envs[k]
        if type(obj) is not Envelope:
            return 0
        ahead = <Envelope>obj
        if ahead.type is not env.type:  # (mostly the same type: no lookup)
            entry = self._entries.get(ahead.type)
            if entry is None:
                return 0
            ea = <_LaneEntry>entry
        if ea.window is not None:
            CHOREO_PREFETCH(ea.window._home(ahead.id_ptr()))
            ea.window._prefetch_tail(LANE_AHEAD)  # the ring slot that insert fills (cold: freed long ago)
        return 0

    cdef inline int _admissible(self, Envelope env, const char *gptr, Py_ssize_t glen, KeyedDispatch keyed) except -1:
        """1 when a keyed envelope's partition is routed here and its key is idle (or it waits on no key)."""
        if env.flags & _FLAG_REPLAY:
            return 0
        if not env.flags & (_FLAG_UNKEYED | _FLAG_BROADCAST):  # keyed, not broadcast: ours now? key idle?
            if gptr != NULL and (env.partition >= glen or not gptr[env.partition]):
                return 0
            if keyed._waiting and env.key in keyed._waiting:
                return 0
        return 1

    cdef inline int _done(self, Envelope env, _LaneEntry e, InboundReorder reorder, SpanRing ring, spans_append,
                          double received, double t0, double t1) except -1:
        """A handled envelope: its span (choreo.tracing's layout; ``ring``: ``spans_append`` when it
        is a SpanRing), then complete in its channel."""
        cdef tuple span
        if ring is not None:  # the ids, key and times copied in: no object per span
            ring._record(env, env.type, e.name, received, t0, t1)
        elif spans_append is not None:
            # the three ids as one bytes object (msg_id | trace_id | cause_id, as on the wire), split
            # when the span is read
            span = (env._bytes_at(20, 48), env.type, e.name, received, t0, t1, self.ok, None, 1,
                    env._bytes_at(HDR + env._tlen, min(env._klen, SPAN_KEY_MAX)), env.partition)
            PyObject_GC_UnTrack(span)  # atoms only: the cycle collector need never visit it
            spans_append(span)
        reorder._complete(env.seq)
        return 0

    def run(self, list envs not None, Py_ssize_t start, InboundReorder reorder not None, double now, clock,
            received, gate, KeyedDispatch keyed not None, spans_append, ctx, answer=None, channel=None,
            double until=INFINITY):
        """Handle ``envs[start:]`` in order until one needs the caller.

        Returns ``(handled, index, status, a, b, started)``: how many were handled here, the
        index where it stopped and why (``LANE_*``), and for FAILED/EFFECTS/RESULT the decoded
        message, the error (FAILED), the context (EFFECTS) or ``(context, result)`` (RESULT), and
        when the handler started (for BATCH_FAILED the messages of the batch that raised). ``ctx``
        is a reusable context object (its ``envelope``/``handler``/``writes`` are set here) or None.
        A command's or query's result goes to ``answer(channel, env, result)``, which answers the
        caller and returns True, or returns False (having done nothing) when the result cannot
        travel as it is; without ``answer`` commands and queries are left to the caller. Once the
        clock reads ``until`` or later, no handler starts: ``LANE_LATE`` (the caller's clock may
        have jumped, a process stopped and continued: whatever it held may be void by now).
        """
        cdef Py_ssize_t n = len(envs), i = start, j, handled = 0, glen = 0, stop_at
        cdef int stop_status
        cdef const char *gptr = NULL
        cdef Envelope env, envj
        cdef _LaneEntry e
        cdef object entry, message, obj, result
        cdef double t0, t1, received_at = received
        cdef lane_clock_fn read_clock = lane_clock_of(clock)  # NULL: call clock()
        cdef list batch
        cdef uint64_t h
        cdef const uint8_t *idp
        if gate is not None:
            gptr = PyByteArray_AS_STRING(gate)
            glen = PyByteArray_GET_SIZE(gate)
        cdef object last_type = None, last_entry = None  # the entry of the previous envelope's type
        cdef SpanRing ring = <SpanRing>spans_append if type(spans_append) is SpanRing else None
        cdef CtxLayout lay
        lay.envelope = lay.handler = lay.writes = lay.outputs = lay.state = -1
        if ctx is not None:
            if type(ctx) is not self._ctx_type:
                ctx_layout(&self._ctx_lay, type(ctx))
                self._ctx_type = type(ctx)
            lay = self._ctx_lay
        t1 = lane_now(read_clock, clock)  # one reading per message: each one's start is the previous one's end
        while i < n:
            if t1 >= until:
                return handled, i, LANE_LATE, None, None, t1
            obj = envs[i]
            if type(obj) is not Envelope:
                return handled, i, LANE_SLOW, None, None, 0.0
            env = <Envelope>obj
            if env.type is last_type:  # (type names are interned: mostly one type per batch, no lookup)
                entry = last_entry
            else:
                entry = last_entry = self._entries.get(env.type)
                last_type = env.type
            if entry is None:
                return handled, i, LANE_SLOW, None, None, 0.0
            e = <_LaneEntry>entry
            if env.kind != e.kind or (answer is None and e.kind != _KIND_EVENT):
                return handled, i, LANE_SLOW, None, None, 0.0
            self._prefetch(envs, i + LANE_AHEAD, n, env, e, ring)
            if not self._admissible(env, gptr, glen, keyed):
                return handled, i, LANE_SLOW, None, None, 0.0
            if e.batch:
                # a batch handler: the run of envelopes of this type the lane can take, in one call
                batch = []
                j = i
                stop_at, stop_status = -1, LANE_END
                while j < n:
                    obj = envs[j]
                    if type(obj) is not Envelope:
                        break
                    envj = <Envelope>obj
                    if j > i:
                        self._prefetch(envs, j + LANE_AHEAD, n, env, e, None)
                    if ring is not None:
                        # the span slot this message records into, after the batch returns: the
                        # ring's head stands still while a batch is gathered (its records come last)
                        ring._prefetch_ahead(j - i)
                    if envj.type is not env.type and self._entries.get(envj.type) is not entry:
                        break
                    if envj.kind != _KIND_EVENT or not self._admissible(envj, gptr, glen, keyed):
                        break
                    if e.window is not None:
                        idp = envj.id_ptr()
                        if e.window._insert(idp, e.window._id_hash(idp), now, <uint16_t>envj.partition) == 0:
                            stop_at, stop_status = j, LANE_DUPLICATE
                            break
                    try:
                        message = e.decode(envj._bytes_at(HDR + envj._tlen + envj._klen, envj._plen))
                    except Exception:
                        stop_at, stop_status = j, LANE_BAD
                        break
                    batch.append(message)
                    j += 1
                if batch:
                    t0 = t1
                    try:
                        e.fn(batch)
                    except Exception as exc:
                        # the caller runs them one by one (and then takes envs[stop_at], if any, afresh)
                        return handled, i, LANE_BATCH_FAILED, batch, exc, t0
                    t1 = lane_now(read_clock, clock)
                    while i < j:
                        self._done(<Envelope>envs[i], e, reorder, ring, spans_append, received_at, t0, t1)
                        i += 1
                    handled += len(batch)
                if stop_at >= 0:
                    return handled, stop_at, stop_status, None, None, 0.0
                continue
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
                    ctx_set(ctx, lay.envelope, "envelope", env)
                    ctx_set(ctx, lay.handler, "handler", e.handler)
                    ctx_set(ctx, lay.writes, "writes", None)
                    result = e.fn(message, ctx)
                else:
                    result = e.fn(message)
            except Exception as exc:
                return handled, i, LANE_FAILED, message, exc, t0
            if e.kind != _KIND_EVENT:
                # a command's or query's answer: here only when it has no effects and can travel
                # (state writes are the caller's too: a result is logged with them)
                if (e.takes_context and (ctx_get(ctx, lay.outputs, "outputs")
                                         or ctx_get(ctx, lay.writes, "writes") is not None)) \
                        or not answer(channel, env, result):
                    return handled, i, LANE_RESULT, message, (ctx, result), t0
            # emits, sends, or state writes that need a job (a standby must confirm them): the
            # caller takes over; other state writes are applied here, as the handler succeeded
            elif e.takes_context:
                if ctx_get(ctx, lay.outputs, "outputs"):
                    return handled, i, LANE_EFFECTS, message, ctx, t0
                if ctx_get(ctx, lay.writes, "writes") is not None:
                    view = ctx_get(ctx, lay.state, "state")
                    if (<StateView>view)._commit(env) if type(view) is StateView else view.commit(env):
                        return handled, i, LANE_EFFECTS, message, ctx, t0
            t1 = lane_now(read_clock, clock)
            self._done(env, e, reorder, ring, spans_append, received_at, t0, t1)
            handled += 1
            i += 1
        return handled, n, LANE_END, None, None, 0.0


# ---------------------------------------------------------------------------------------------
# the span ring: the most recent spans, without a Python object per span until one is read

cdef struct SpanSlot:
    PyObject *span      # the span tuple: appended as it is, or built at its first read (NULL until then)
    PyObject *type      # recorded by the lane: the message type (str) and the handler's name (str)
    PyObject *name
    double received, started, finished
    int partition
    uint16_t klen
    uint8_t ids[48]     # msg_id | trace_id | cause_id, as on the wire
    uint8_t key[SPAN_KEY_MAX]


cdef class SpanRing:
    """The ``maxlen`` most recent spans, oldest first, read like a ``deque`` of span tuples.

    See the twin for the contract. The compiled fast lane records into it without building a
    tuple (the ids and key are copied into the ring, the names referenced); a recorded span's
    tuple is built when it is first read and kept, so reading it again gives the same object.
    """

    cdef SpanSlot *_slots
    cdef Py_ssize_t _head, _len
    cdef readonly Py_ssize_t maxlen
    cdef readonly uint64_t total
    cdef object _ok

    def __cinit__(self, Py_ssize_t maxlen):
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self._slots = <SpanSlot *>calloc(maxlen, sizeof(SpanSlot))
        if self._slots == NULL:
            raise MemoryError()
        self.maxlen = maxlen
        self._ok = "ok"

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._slots != NULL:
            for i in range(self.maxlen):
                self._clear_slot(&self._slots[i])
            free(self._slots)

    cdef inline void _prefetch_ahead(self, Py_ssize_t k) noexcept:
        """Warm, for writing, the slot the ``k``-th push from now fills: it was filled ``maxlen``
        spans ago, so it is cold, and recording into it starts by reading it (the old span's
        references). A record touches the slot's first 104 bytes and its key's first bytes."""
        cdef char *s = <char *>&self._slots[(self._head + self._len + k) % self.maxlen]
        CHOREO_PREFETCH_W(s)
        CHOREO_PREFETCH_W(s + 64)
        CHOREO_PREFETCH_W(s + 127)

    cdef inline void _clear_slot(self, SpanSlot *s) noexcept:
        Py_XDECREF(s.span)
        Py_XDECREF(s.type)
        Py_XDECREF(s.name)
        s.span = s.type = s.name = NULL

    cdef inline SpanSlot *_push(self) noexcept:
        """The slot of a new span (the oldest one's when full, forgotten first)."""
        cdef Py_ssize_t at
        if self._len == self.maxlen:
            at = self._head
            self._head = (self._head + 1) % self.maxlen
        else:
            at = (self._head + self._len) % self.maxlen
            self._len += 1
        self.total += 1
        cdef SpanSlot *s = &self._slots[at]
        self._clear_slot(s)
        return s

    def append(self, tuple span not None):
        """Keep ``span`` (a tuple in choreo.tracing's layout) as the newest; the oldest goes when full."""
        cdef SpanSlot *s = self._push()
        Py_INCREF(span)
        s.span = <PyObject *>span

    cdef int _record(self, Envelope env, object type_name, object name, double received, double started,
                     double finished) except -1:
        """What the lane records of a handled envelope (outcome ok, attempt 1)."""
        cdef SpanSlot *s = self._push()
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(env._frame) + env._off
        memcpy(s.ids, p + 20, 48)
        s.klen = <uint16_t>min(<Py_ssize_t>env._klen, SPAN_KEY_MAX)
        memcpy(s.key, p + HDR + env._tlen, s.klen)
        Py_INCREF(type_name)
        s.type = <PyObject *>type_name
        Py_INCREF(name)
        s.name = <PyObject *>name
        s.received, s.started, s.finished = received, started, finished
        s.partition = env.partition
        return 0

    def record(self, Envelope env not None, str type_name not None, str name not None, double received,
               double started, double finished):
        """Record a handled envelope as the lane does (for tests and the twin's contract)."""
        self._record(env, type_name, name, received, started, finished)

    cdef object _at(self, Py_ssize_t i):
        """The span at position ``i`` (0 = oldest), built and kept at its first read."""
        cdef SpanSlot *s = &self._slots[(self._head + i) % self.maxlen]
        cdef tuple span
        if s.span == NULL:
            span = (PyBytes_FromStringAndSize(<const char *>s.ids, 48), <object>s.type, <object>s.name,
                    s.received, s.started, s.finished, self._ok, None, 1,
                    PyBytes_FromStringAndSize(<const char *>s.key, s.klen), s.partition)
            PyObject_GC_UnTrack(span)  # atoms only: the cycle collector need never visit it
            Py_INCREF(span)
            s.span = <PyObject *>span
        return <object>s.span

    def __len__(self):
        return self._len

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self._len
        if i < 0 or i >= self._len:
            raise IndexError("span ring index out of range")
        return self._at(i)

    def __iter__(self):
        cdef Py_ssize_t i
        cdef uint64_t start = self.total
        for i in range(self._len):
            if self.total != start:
                raise RuntimeError("span ring mutated during iteration")
            yield self._at(i)

    def __reversed__(self):
        cdef Py_ssize_t i
        cdef uint64_t start = self.total
        for i in range(self._len - 1, -1, -1):
            if self.total != start:
                raise RuntimeError("span ring mutated during iteration")
            yield self._at(i)

    def clear(self):
        cdef Py_ssize_t i
        for i in range(self.maxlen):
            self._clear_slot(&self._slots[i])
        self._head = self._len = 0
