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
# envelope kind, and the flags of envelopes that wait on no key.
DEF _KIND_EVENT = 1
DEF _FLAG_UNKEYED = 0x01
DEF _FLAG_BROADCAST = 0x02
KIND_EVENT = _KIND_EVENT
FLAG_UNKEYED = _FLAG_UNKEYED
FLAG_BROADCAST = _FLAG_BROADCAST
DEF SPAN_KEY_MAX = 128  # bytes of a message's key a span keeps (keys may be 64 KiB; the span ring is not)
SPAN_KEY_BYTES = SPAN_KEY_MAX
DEF LANE_AHEAD = 4  # FastLane: prefetch the dedup slot of the message this many places ahead


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

    def __cinit__(self, bytes tname not None, key_name, Py_ssize_t partitions, list windows not None, encode,
                  key_bytes, IdSource ids not None, Py_ssize_t max_batch, Py_ssize_t max_batch_bytes,
                  Py_ssize_t max_bytes, check=None):
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
        self._check = check
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
        if self._check is not None:
            try:
                self._check(payload)
            except Exception:
                return None  # the slow path names the field that does not match its type
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
        cdef bytes out_id = PyBytes_FromStringAndSize(<const char *>mid, 16)
        w._reserve(size)
        write_raw(w._buf + w._buf_len, w.next_seq, _KIND_EVENT, flags, PyBytes_AS_STRING(self._tname), tlen, k, klen,
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
        reusable context object (its ``envelope``/``handler``/``writes`` are set here) or None.
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
            if entry is None or env.kind != _KIND_EVENT:
                return handled, i, LANE_SLOW, None, None, 0.0
            e = <_LaneEntry>entry
            if not env.flags & (_FLAG_UNKEYED | _FLAG_BROADCAST):  # keyed, not broadcast: ours now? key idle?
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
                    ctx.envelope = env
                    ctx.handler = e.handler
                    ctx.writes = None
                    e.fn(message, ctx)
                else:
                    e.fn(message)
            except Exception as exc:
                return handled, i, LANE_FAILED, message, exc, t0
            # emits, sends, or state writes that need a job (a standby must confirm them): the
            # caller takes over; other state writes are applied here, as the handler succeeded
            if e.takes_context:
                if ctx.outputs:
                    return handled, i, LANE_EFFECTS, message, ctx, t0
                if ctx.writes is not None:
                    view = ctx.state
                    if (<StateView>view)._commit(env) if type(view) is StateView else view.commit(env):
                        return handled, i, LANE_EFFECTS, message, ctx, t0
            t1 = clock()
            if spans_append is not None:
                # choreo.tracing's span layout; the three ids as one bytes object (msg_id | trace_id |
                # cause_id, as on the wire), split when the span is read
                span = (env._bytes_at(20, 48), env.type, e.name, received, t0, t1, self.ok, None, 1,
                        env._bytes_at(HDR + env._tlen, min(env._klen, SPAN_KEY_MAX)), env.partition)
                PyObject_GC_UnTrack(span)  # atoms only: the cycle collector need never visit it
                spans_append(span)
            reorder._complete(env.seq)
            handled += 1
        return handled, n, LANE_END, None, None, 0.0
