# cython: language_level=3
"""The transport's reads and small sends, compiled: libzmq called directly, not through pyzmq.

On a command's round trip each side reads one frame and asks ``ZMQ_EVENTS`` once. Through
pyzmq that is two ``recv`` calls (one building a ``Frame`` object), ``Frame.bytes`` and
``Socket.get``, which turns the option into an enum on every call: ~2.9 us per frame here,
against ~0.7 us for the same libzmq calls made from C (bench/README.md). This module makes
those calls on the sockets pyzmq created, through the libzmq pyzmq loaded: its functions are
looked up (``dlsym``) from pyzmq's own extension module at import, so there is nothing to
link against and no second copy of libzmq. Where that lookup fails (a pyzmq built some other
way), importing this module raises ImportError and the transport reads through pyzmq.

It is I/O, so it lives outside ``cext/`` (the delivery core stays sans-IO); it holds no state
but the socket it reads. Only the loop's thread may call it (libzmq sockets are not
thread-safe), and never on a socket the transport has closed.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uintptr_t

import ctypes

import zmq
from zmq.backend.cython import _zmq

cdef extern from *:
    """
    #include <stddef.h>
    /* libzmq 4's zmq_msg_t: 64 opaque bytes, pointer-aligned (zmq.h) */
    typedef struct { unsigned char _[64] __attribute__((aligned(sizeof(void *)))); } choreo_zmq_msg;
    typedef int (*choreo_zmq_getsockopt_fn)(void *, int, void *, size_t *);
    typedef int (*choreo_zmq_msg_init_fn)(choreo_zmq_msg *);
    typedef int (*choreo_zmq_msg_recv_fn)(choreo_zmq_msg *, void *, int);
    typedef int (*choreo_zmq_msg_close_fn)(choreo_zmq_msg *);
    typedef void *(*choreo_zmq_msg_data_fn)(choreo_zmq_msg *);
    typedef size_t (*choreo_zmq_msg_size_fn)(const choreo_zmq_msg *);
    typedef int (*choreo_zmq_msg_more_fn)(const choreo_zmq_msg *);
    typedef const char *(*choreo_zmq_msg_gets_fn)(const choreo_zmq_msg *, const char *);
    typedef int (*choreo_zmq_send_fn)(void *, const void *, size_t, int);
    typedef int (*choreo_zmq_errno_fn)(void);
    typedef void (*choreo_zmq_version_fn)(int *, int *, int *);
    """
    ctypedef struct choreo_zmq_msg:
        pass
    ctypedef int (*choreo_zmq_getsockopt_fn)(void *, int, void *, size_t *)
    ctypedef int (*choreo_zmq_msg_init_fn)(choreo_zmq_msg *)
    ctypedef int (*choreo_zmq_msg_recv_fn)(choreo_zmq_msg *, void *, int)
    ctypedef int (*choreo_zmq_msg_close_fn)(choreo_zmq_msg *)
    ctypedef void *(*choreo_zmq_msg_data_fn)(choreo_zmq_msg *)
    ctypedef size_t (*choreo_zmq_msg_size_fn)(const choreo_zmq_msg *)
    ctypedef int (*choreo_zmq_msg_more_fn)(const choreo_zmq_msg *)
    ctypedef const char *(*choreo_zmq_msg_gets_fn)(const choreo_zmq_msg *, const char *)
    ctypedef int (*choreo_zmq_send_fn)(void *, const void *, size_t, int)
    ctypedef int (*choreo_zmq_errno_fn)()
    ctypedef void (*choreo_zmq_version_fn)(int *, int *, int *)

cdef choreo_zmq_getsockopt_fn z_getsockopt
cdef choreo_zmq_msg_init_fn z_msg_init
cdef choreo_zmq_msg_recv_fn z_msg_recv
cdef choreo_zmq_msg_close_fn z_msg_close
cdef choreo_zmq_msg_data_fn z_msg_data
cdef choreo_zmq_msg_size_fn z_msg_size
cdef choreo_zmq_msg_more_fn z_msg_more
cdef choreo_zmq_msg_gets_fn z_msg_gets
cdef choreo_zmq_send_fn z_send
cdef choreo_zmq_errno_fn z_errno

cdef int EVENTS = int(zmq.EVENTS)
cdef int POLLIN = int(zmq.POLLIN)
cdef int DONTWAIT = int(zmq.DONTWAIT)
cdef int EAGAIN_ = int(zmq.EAGAIN)
cdef int ENOTSOCK_ = int(zmq.ENOTSOCK)
MULTIPART = b"\x00multipart"  # what a multipart message becomes: the engine counts it as a bad frame


cdef uintptr_t _symbol(object lib, str name) except 0:
    address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    if not address:
        raise ImportError(f"{name} not found")
    return <uintptr_t>address


cdef int _bind() except -1:
    """Point the function pointers at the libzmq pyzmq runs on (ImportError when it cannot)."""
    cdef choreo_zmq_version_fn version
    global z_getsockopt, z_msg_init, z_msg_recv, z_msg_close, z_msg_data, z_msg_size, z_msg_more
    global z_msg_gets, z_send, z_errno
    if zmq.zmq_version_info()[0] != 4:  # the zmq_msg_t layout above is libzmq 4's
        raise ImportError(f"libzmq {zmq.zmq_version()} is not libzmq 4")
    try:
        # dlsym on pyzmq's extension searches it and the libraries it loaded: its libzmq
        lib = ctypes.CDLL(_zmq.__file__)
        z_getsockopt = <choreo_zmq_getsockopt_fn>_symbol(lib, "zmq_getsockopt")
        z_msg_init = <choreo_zmq_msg_init_fn>_symbol(lib, "zmq_msg_init")
        z_msg_recv = <choreo_zmq_msg_recv_fn>_symbol(lib, "zmq_msg_recv")
        z_msg_close = <choreo_zmq_msg_close_fn>_symbol(lib, "zmq_msg_close")
        z_msg_data = <choreo_zmq_msg_data_fn>_symbol(lib, "zmq_msg_data")
        z_msg_size = <choreo_zmq_msg_size_fn>_symbol(lib, "zmq_msg_size")
        z_msg_more = <choreo_zmq_msg_more_fn>_symbol(lib, "zmq_msg_more")
        z_msg_gets = <choreo_zmq_msg_gets_fn>_symbol(lib, "zmq_msg_gets")
        z_send = <choreo_zmq_send_fn>_symbol(lib, "zmq_send")
        z_errno = <choreo_zmq_errno_fn>_symbol(lib, "zmq_errno")
        version = <choreo_zmq_version_fn>_symbol(lib, "zmq_version")
    except (OSError, AttributeError) as exc:
        raise ImportError(f"cannot reach the libzmq pyzmq loaded: {exc}") from None
    cdef int major = 0, minor = 0, patch = 0
    version(&major, &minor, &patch)
    if (major, minor, patch) != zmq.zmq_version_info():  # not the library pyzmq's sockets live in
        raise ImportError(f"found libzmq {major}.{minor}.{patch}, pyzmq runs on {zmq.zmq_version()}")
    return 0


_bind()


cdef inline void *_handle(object socket) except NULL:
    if socket.closed:
        raise zmq.ZMQError(ENOTSOCK_)
    return <void *><uintptr_t>socket.underlying


cdef inline int _recv(choreo_zmq_msg *msg, void *sock) noexcept:
    """Initialise ``msg`` and receive the socket's next part into it, without blocking: 0, or
    libzmq's errno. The caller closes ``msg`` either way."""
    z_msg_init(msg)
    return 0 if z_msg_recv(msg, sock, DONTWAIT) >= 0 else z_errno()


cdef inline bytes _take(choreo_zmq_msg *msg):
    return PyBytes_FromStringAndSize(<char *>z_msg_data(msg), <Py_ssize_t>z_msg_size(msg))


def send(socket, bytes frame) -> None:
    """Queue ``frame`` on ``socket`` (one part, copied) without blocking.

    Raises ``zmq.Again`` when the socket's pipe is full, ``zmq.ZMQError`` on any other failure:
    what pyzmq's ``Socket.send(frame, zmq.NOBLOCK)`` raises.
    """
    if z_send(_handle(socket), PyBytes_AS_STRING(frame), <size_t>PyBytes_GET_SIZE(frame), DONTWAIT) < 0:
        errno = z_errno()
        raise zmq.Again(errno) if errno == EAGAIN_ else zmq.ZMQError(errno)


# what Reader.read returns (see it)
READ_DRAINED = 0
READ_BUDGET_SPENT = 1
READ_YIELDED = 2


cdef class Reader:
    """Reads a ROUTER socket's messages into ``on_frame(data, identity, principal)``.

    ``refuse(reason, detail, exc=None)`` is told what could not be read or handled; nothing
    raises out of :meth:`read`. ``secure``: every message carries its connection's User-Id (the
    ZAP handler's key name), given as ``principal``; without it the message is refused
    (``no_principal``). A message of more than one part after the routing id (not a choreo
    node's) is read whole and given as ``MULTIPART``.

    ::

        reader = Reader(router, on_frame, transport._refuse, secure=False)
        if reader.read(256):   # stopped at its budget: more may be waiting
            ...
    """

    cdef object _socket, _on_frame, _refuse
    cdef void *_sock  # the libzmq socket (fixed for the socket's life: used only while it is open)
    cdef bint _secure

    def __init__(self, socket, on_frame, refuse, bint secure):
        self._sock = _handle(socket)
        self._socket = socket
        self._on_frame = on_frame
        self._refuse = refuse
        self._secure = secure

    cdef int _read_failed(self, int errno) except -1:
        self._refuse("transport_error", f"reading the ROUTER: {zmq.ZMQError(errno)}")
        return 0

    cdef int _events(self) except? -1:
        cdef int events = 0
        cdef size_t size = sizeof(int)
        if self._socket.closed:  # (a frame's handling may close it)
            raise zmq.ZMQError(ENOTSOCK_)
        if z_getsockopt(self._sock, EVENTS, &events, &size) < 0:
            raise zmq.ZMQError(z_errno())
        return events

    def waiting(self) -> bool:
        """A message waits to be read (``ZMQ_EVENTS``; asking consumes the descriptor's edge)."""
        return self._events() & POLLIN != 0

    def read(self, Py_ssize_t budget) -> int:
        """Read and hand over up to ``budget`` messages: ``READ_DRAINED`` (0) when none waits,
        ``READ_BUDGET_SPENT`` (1) when it stopped at the budget, ``READ_YIELDED`` (2) when it
        stopped after a frame whose ``on_frame`` returned true (it woke a caller awaiting an
        answer: the caller runs before the rest of the read, see ZmqTransport._readable).

        The first read trusts the wake-up; after each message ``ZMQ_EVENTS`` is asked whether
        another waits, so the last question leaves the descriptor's edge armed again. (A read
        that stopped early did not ask: the transport reads again at the next turn, whose first
        receive consumes the edge as that question would.)
        """
        cdef Py_ssize_t n
        cdef choreo_zmq_msg first, part
        cdef void *sock = self._sock
        cdef const char *user
        cdef int errno
        cdef bint more
        if self._socket.closed:
            return READ_DRAINED
        for n in range(budget):
            try:
                if n and not self._events() & POLLIN:
                    return READ_DRAINED
            except zmq.ZMQError as exc:
                if not self._socket.closed:  # (closed by a frame's handling: nothing to say)
                    self._read_failed(exc.errno)
                return READ_DRAINED
            errno = _recv(&first, sock)
            if errno:
                z_msg_close(&first)
                if errno != EAGAIN_:
                    self._read_failed(errno)
                return READ_DRAINED
            errno = _recv(&part, sock)  # a message arrives whole: its other parts are here
            if errno:
                z_msg_close(&part)
                z_msg_close(&first)
                self._read_failed(errno)
                return READ_DRAINED
            more = z_msg_more(&part)
            if more:  # not a choreo node: read it whole, let the engine count the bad frame
                data = MULTIPART
                while more:
                    z_msg_close(&part)
                    more = _recv(&part, sock) == 0 and z_msg_more(&part)
            else:
                data = _take(&part)
            z_msg_close(&part)
            identity = _take(&first)
            principal = None
            if self._secure:
                # the key's name, as the ZAP handler set it for this connection: read per message
                # (a cache by routing id could outlive a connection that took its id over)
                user = z_msg_gets(&first, b"User-Id")
                if user == NULL:
                    z_msg_close(&first)
                    self._refuse("no_principal", "a frame without an authenticated key")
                    continue
                principal = user.decode("utf-8", "replace")
            z_msg_close(&first)
            try:
                if self._on_frame(data, identity, principal):
                    return READ_YIELDED
            except Exception as exc:  # the engine counts what it refuses; anything else stops here
                self._refuse("internal_error", f"{type(exc).__name__}: {exc} (handling a frame)", exc)
        return READ_BUDGET_SPENT
