# Part of choreo/_core.pyx (included there, compiled as one module): The dedup window: remembered message ids, O(1) check-and-insert, bounded, oldest out first.

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

    cdef inline const uint64_t *_home(self, const uint8_t *p) noexcept:
        """The table slot where the probe for id ``p`` starts: what a caller prefetches."""
        return &self._table[<size_t>(self._id_hash(p) >> 32) & self._tmask]

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
