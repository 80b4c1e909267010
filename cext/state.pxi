# Handler state: ctx.state's reads and buffered writes, and their commit (see choreo/_pycore.py's
# StateView, the twin, for what each method does; choreo/runtime/state.py for the design).

DEF _KIND_QUERY = 3
DEF _NOT_KEYED = 0x03  # FLAG_UNKEYED | FLAG_BROADCAST (see lanes.pxi)


cdef class StateView:
    """``ctx.state`` of one handler context (the twin in choreo/_pycore.py says it all)."""

    cdef object _ctx
    cdef list _tables
    cdef dict _index
    cdef list _decoders
    cdef object _encode
    cdef Py_ssize_t _limit
    cdef object _fail
    cdef object _standby
    cdef object _log
    cdef list _simple
    cdef object _ctx_type   # the class _lay is for (the context's, when the view was made)
    cdef CtxLayout _lay
    cdef object _last_cls, _last_t  # the type a handler used last (mostly one type, many calls)
    # the key of the envelope handled (a read, then the commit, ask for it: made and hashed once)
    cdef object _key_env, _key_frame, _key_bytes
    cdef Py_ssize_t _key_off

    def __init__(self, ctx, list tables not None, dict index not None, list decoders not None, encode,
                 Py_ssize_t limit, fail, standby=None, log=None, list simple=None):
        self._ctx = ctx
        self._tables = tables
        self._index = index
        self._decoders = decoders
        self._encode = encode
        self._limit = limit
        self._fail = fail
        self._standby = standby
        self._log = log
        self._simple = simple
        self._ctx_type = type(ctx)
        ctx_layout(&self._lay, self._ctx_type)

    cdef inline Py_ssize_t _at(self, Py_ssize_t offset):
        """A field's slot offset in the context, or -1 (its class changed: use getattr)."""
        return offset if type(self._ctx) is self._ctx_type else -1

    cdef inline object _envelope(self):
        return ctx_get(self._ctx, self._at(self._lay.envelope), "envelope")

    cdef inline object _writes(self):
        return ctx_get(self._ctx, self._at(self._lay.writes), "writes")

    cdef inline int _set_writes(self, writes) except -1:
        return ctx_set(self._ctx, self._at(self._lay.writes), "writes", writes)

    cdef inline object _key(self, env):
        cdef Envelope e
        if type(env) is not Envelope:
            return env.key
        e = <Envelope>env
        # (the references held keep both alive: the same objects are the same envelope)
        if env is self._key_env and e._frame is self._key_frame and e._off == self._key_off:
            return self._key_bytes
        key = e._bytes_at(HDR + e._tlen, e._klen)
        self._key_env, self._key_frame, self._key_off, self._key_bytes = env, e._frame, e._off, key
        return key

    cdef inline void _forget_key(self) noexcept:
        self._key_env = self._key_frame = self._key_bytes = None

    cdef inline int _kind(self, env) except -1:
        if type(env) is Envelope:
            return (<Envelope>env).kind
        return env.kind

    cdef inline int _flags(self, env) except -1:
        if type(env) is Envelope:
            return (<Envelope>env).flags
        return env.flags

    cdef inline int _partition(self, env) except -1:
        if type(env) is Envelope:
            return (<Envelope>env).partition
        return env.partition

    cdef inline object _type(self, cls):
        if cls is self._last_cls and self._last_t is not None:  # (nothing cached yet: None is no type)
            return self._last_t
        t = self._index.get(cls)
        if t is None:
            self._fail("undeclared", cls, None)
        self._last_cls, self._last_t = cls, t
        return t

    def get(self, cls, default=None):
        env = self._envelope()
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        t = self._type(cls)
        writes = self._writes()
        if writes is not None and t in <dict>writes:
            body = (<dict>writes)[t]
        else:
            body = (<dict>(<list>self._tables[<Py_ssize_t>t])[self._partition(env)]).get(self._key(env))
        if body is None:
            return default
        return self._decoders[<Py_ssize_t>t](body)

    def put(self, value):
        env = self._envelope()
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        if self._kind(env) == _KIND_QUERY:
            self._fail("read_only", None, None)
        t = self._type(type(value))
        body = self._encode(value)
        fields = (<list>self._simple)[<Py_ssize_t>t] if self._simple is not None else None
        if fields is None or not fields_fit(value, <tuple>fields, NULL):
            try:
                self._decoders[<Py_ssize_t>t](body)  # a value is checked against its type when it is written
            except Exception as exc:
                self._fail("invalid", t, exc)
        cdef Py_ssize_t size = len(body)
        if size > self._limit:
            self._fail("too_large", t, size)
        writes = self._writes()
        if writes is None:
            self._set_writes({t: body})
            return
        (<dict>writes)[t] = body
        cdef Py_ssize_t total = 0
        if len(<dict>writes) > 1:
            for b in (<dict>writes).values():
                if b is not None:
                    total += len(b)
            if total > self._limit:
                del (<dict>writes)[t]
                self._fail("too_large_total", t, total)

    def delete(self, cls):
        env = self._envelope()
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        if self._kind(env) == _KIND_QUERY:
            self._fail("read_only", None, None)
        t = self._type(cls)
        writes = self._writes()
        if writes is None:
            self._set_writes({t: None})
        else:
            (<dict>writes)[t] = None

    def items(self, cls, prefix=""):
        env = self._envelope()
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        t = self._type(cls)
        raw = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        table = <dict>(<list>self._tables[<Py_ssize_t>t])[self._partition(env)]
        found = {k: v for k, v in table.items() if k.startswith(raw)}
        writes = self._writes()
        key = self._key(env)
        if writes is not None and t in <dict>writes and key.startswith(raw):
            body = (<dict>writes)[t]
            if body is None:
                found.pop(key, None)
            else:
                found[key] = body
        decode = self._decoders[<Py_ssize_t>t]
        return [(k.decode("utf-8", "surrogateescape"), decode(found[k])) for k in sorted(found)]

    cdef int _commit(self, env) except -1:
        cdef int partition = self._partition(env)
        standby = self._standby
        if standby is not None and (<list>standby)[partition] is not None:
            return 1
        writes = self._writes()
        self._set_writes(None)
        if writes:
            key = self._key(env)
            self._forget_key()  # (nor is the frame it came in kept alive past its commit)
            for t, body in (<dict>writes).items():
                table = <dict>(<list>self._tables[<Py_ssize_t>t])[partition]
                if body is None:
                    table.pop(key, None)
                else:
                    table[key] = body
            if self._log is not None:
                self._log(partition, key, writes)
        return 0

    def commit(self, env):
        return bool(self._commit(env))
