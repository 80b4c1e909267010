# Part of choreo/_core.pyx (included there, compiled as one module): Little-endian loads and stores, and the hashes (equal to the twin's bit for bit).

# ---------------------------------------------------------------------------------------------
# little-endian loads and stores (compilers turn these into single moves on x86 and arm)

cdef inline uint64_t ld64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)
            | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40) | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))

cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint16_t ld16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))

cdef inline void st64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))

cdef inline void st32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v; p[1] = <uint8_t>(v >> 8); p[2] = <uint8_t>(v >> 16); p[3] = <uint8_t>(v >> 24)

cdef inline void st16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>v; p[1] = <uint8_t>(v >> 8)

cdef inline uint64_t double_bits(double d) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &d, 8)
    return u

cdef inline double bits_double(uint64_t u) noexcept nogil:
    cdef double d
    memcpy(&d, &u, 8)
    return d


# ---------------------------------------------------------------------------------------------
# hashes (must equal the twin's bit for bit)

DEF FNV_OFFSET = 0xCBF29CE484222325
DEF FNV_PRIME = 0x100000001B3
DEF GOLDEN = 0x9E3779B97F4A7C15

cdef inline uint64_t fmix64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= <uint64_t>0xFF51AFD7ED558CCD
    h ^= h >> 33
    h *= <uint64_t>0xC4CEB9FE1A85EC53
    h ^= h >> 33
    return h

cdef inline uint64_t c_hash64(const uint8_t *p, Py_ssize_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t h = <uint64_t>FNV_OFFSET ^ (seed * <uint64_t>GOLDEN)
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * <uint64_t>FNV_PRIME
    return fmix64(h)

cdef inline uint64_t id_hash(const uint8_t *p) noexcept nogil:
    return fmix64(ld64(p) ^ (ld64(p + 8) * <uint64_t>GOLDEN))


def hash64(const uint8_t[::1] data, uint64_t seed=0):
    """A stable 64-bit hash of ``data`` (the same on every host and Python run)."""
    if data.shape[0] == 0:
        return fmix64(<uint64_t>FNV_OFFSET ^ (seed * <uint64_t>GOLDEN))
    return c_hash64(&data[0], data.shape[0], seed)


cdef bytes c_hash128(const uint8_t *p, Py_ssize_t n):
    cdef uint8_t out[16]
    st64(out, c_hash64(p, n, 1))
    st64(out + 8, c_hash64(p, n, 2))
    return PyBytes_FromStringAndSize(<char *>out, 16)


def hash128(data):
    """A stable 16-byte digest of ``data`` (two seeded hash64)."""
    cdef bytes b = as_bytes(data)
    return c_hash128(<const uint8_t *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def derive_id(parent, handler, position):
    """The id of the ``position``-th message a handler emitted while handling ``parent``."""
    if not 0 <= position < (1 << 32):
        raise ValueError(f"position must be in [0, 2**32), got {position}")
    cdef bytes p = as_bytes(parent)
    cdef bytes h = as_bytes(handler)
    cdef uint8_t pos[4]
    st32(pos, <uint32_t>position)
    cdef bytes joined = p + b"\x00" + h + PyBytes_FromStringAndSize(<char *>pos, 4)
    return c_hash128(<const uint8_t *>PyBytes_AS_STRING(joined), PyBytes_GET_SIZE(joined))


cpdef int partition_of(key, Py_ssize_t partitions) except -1:
    """The partition of a key among ``partitions`` (1..65536; multiply-shift of its hash64)."""
    if partitions < 1 or partitions > MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    cdef const uint8_t[::1] view
    cdef uint64_t h
    if isinstance(key, bytes):
        h = c_hash64(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), 0)
    else:
        view = key
        h = c_hash64(&view[0], view.shape[0], 0) if view.shape[0] else fmix64(<uint64_t>FNV_OFFSET)
    return <int>choreo_mulhi(h, <uint64_t>partitions)


def rendezvous_owner(partition, instances):
    """Index of the instance that owns ``partition`` (highest random weight), -1 if none."""
    cdef int best = -1, i = 0
    cdef uint64_t w, best_w = 0
    cdef uint64_t seed = (partition + 1) & 0xFFFFFFFFFFFFFFFF
    cdef bytes inst, best_id = b""
    for obj in instances:
        inst = as_bytes(obj)
        w = c_hash64(<const uint8_t *>PyBytes_AS_STRING(inst), PyBytes_GET_SIZE(inst), seed)
        if best < 0 or w > best_w or (w == best_w and inst < best_id):
            best, best_w, best_id = i, w, inst
        i += 1
    return best


def assign_partitions(Py_ssize_t partitions, instances):
    """Owner index of every partition ``0..partitions-1`` by rendezvous_owner."""
    if partitions < 1 or partitions > MAX_PARTITIONS:
        raise ValueError(f"partitions must be in 1..{MAX_PARTITIONS}, got {partitions}")
    insts = [as_bytes(x) for x in instances]
    return [rendezvous_owner(p, insts) for p in range(partitions)]
