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

    cdef inline int _flags(self, env) except -1:
        if type(env) is Envelope:
            return (<Envelope>env).flags
        return env.flags

    cdef inline int _partition(self, env) except -1:
        if type(env) is Envelope:
            return (<Envelope>env).partition
        return env.partition

    cdef inline object _type(self, cls):
        t = self._index.get(cls)
        if t is None:
            self._fail("undeclared", cls, None)
        return t

    def get(self, cls, default=None):
        ctx = self._ctx
        env = ctx.envelope
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        t = self._type(cls)
        writes = ctx.writes
        if writes is not None and t in <dict>writes:
            body = (<dict>writes)[t]
        else:
            body = (<dict>(<list>self._tables[<Py_ssize_t>t])[self._partition(env)]).get(env.key)
        if body is None:
            return default
        return self._decoders[<Py_ssize_t>t](body)

    def put(self, value):
        ctx = self._ctx
        env = ctx.envelope
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        if env.kind == _KIND_QUERY:
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
        writes = ctx.writes
        if writes is None:
            ctx.writes = {t: body}
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
        ctx = self._ctx
        env = ctx.envelope
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        if env.kind == _KIND_QUERY:
            self._fail("read_only", None, None)
        t = self._type(cls)
        writes = ctx.writes
        if writes is None:
            ctx.writes = {t: None}
        else:
            (<dict>writes)[t] = None

    def items(self, cls, prefix=""):
        ctx = self._ctx
        env = ctx.envelope
        if self._flags(env) & _NOT_KEYED:
            self._fail("no_key", None, None)
        t = self._type(cls)
        raw = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        table = <dict>(<list>self._tables[<Py_ssize_t>t])[self._partition(env)]
        found = {k: v for k, v in table.items() if k.startswith(raw)}
        writes = ctx.writes
        key = env.key
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
        ctx = self._ctx
        writes = ctx.writes
        ctx.writes = None
        if writes:
            key = env.key
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
