"""System queries to a running node, for the CLI and for tests: no mesh membership needed.

Every node answers a few built-in requests on its ROUTER socket (``spec``, ``stats``,
``spans``, ``peers``, ``dlq.list``/``dlq.show``/``dlq.replay``). This client opens one DEALER,
asks, and waits for the answer with a timeout::

    spec = fetch_system_spec("tcp://127.0.0.1:7000")     # every service the mesh knows
    print(rpc("tcp://127.0.0.1:7000", "stats")["processed"])

It is synchronous on purpose (the CLI is), and independent of the node runtime.

A node of a secure mesh is addressed as ``KEY@tcp://HOST:PORT`` (see :mod:`choreo.wire`): the
client then speaks CURVE with a key pair of its own, which the node must trust (and, once the
engine checks it, allow the query: the key's ``admin`` rights). Pass ``security=``, or set a
default for the process with :func:`set_security` (the CLI's ``--keys DIR --as NAME`` do), or
the environment variables ``CHOREO_KEYS`` and ``CHOREO_KEY``::

    ops = Security.load("keys", "ops")
    rpc("orders-1@tcp://10.0.0.5:7001", "stats", security=ops)
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import msgspec
import zmq

from . import wire
from .errors import ChoreoError, ChoreoUsageError, DeliveryTimeout
from .spec import SystemSpec
from .trust import Security

__all__ = ["rpc", "RpcClient", "RpcError", "fetch_system_spec", "set_security", "default_security"]

_ids = itertools.count(1)
_default: list[Security | None] = [None]
KEYS_ENV, KEY_ENV = "CHOREO_KEYS", "CHOREO_KEY"


def set_security(security: Security | None) -> None:
    """The key pair this process's clients use for secure nodes when none is passed (None: forget it)."""
    _default[0] = security


def default_security() -> Security | None:
    """What :func:`set_security` set, else the key ``$CHOREO_KEY`` of the directory ``$CHOREO_KEYS``, else None."""
    if _default[0] is None and os.environ.get(KEYS_ENV) and os.environ.get(KEY_ENV):
        _default[0] = Security.load(os.environ[KEYS_ENV], os.environ[KEY_ENV])
    return _default[0]


class RpcError(ChoreoError):
    """The node answered, with an error."""


class RpcClient:
    """One connection to one node for several requests (close it, or use ``with``)."""

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None, security: Security | None = None) -> None:
        problem = wire.endpoint_problem(endpoint)
        if problem is not None:
            raise ChoreoUsageError(f"cannot ask {endpoint}: {problem}")
        key_name, address = wire.split_endpoint(endpoint)
        self.endpoint = endpoint
        self.security = security
        server_key = None
        if key_name is not None:
            self.security = security = security or default_security()
            if security is None:
                raise ChoreoUsageError(
                    f"{endpoint} is a node of a secure mesh: give a key it trusts, --keys DIR --as NAME "
                    f"(or {KEYS_ENV}=DIR {KEY_ENV}=NAME)"
                )
            server_key = security.server_key(key_name)
            if server_key is None and security.refresh(0.0):
                server_key = security.server_key(key_name)
            if server_key is None:
                raise ChoreoUsageError(f"cannot ask {endpoint}: {key_name!r} is not a trusted key "
                                       f"(no {key_name}.key in {security.keys_dir or 'the trusted keys'})")
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._monitor: zmq.Socket | None = None
        if security is not None and server_key is not None:
            self._socket.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            self._socket.setsockopt(zmq.CURVE_PUBLICKEY, security.public_key)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, security.secret_key)
            # a refused key looks like silence; the monitor tells the two apart
            self._monitor = self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._socket.connect(address)
        self._me = int.from_bytes(os.urandom(8), "little") | 1

    def call(self, method: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Send one request and return its result; :class:`DeliveryTimeout` or :class:`RpcError`."""
        request_id = next(_ids)
        self._socket.send(wire.encode_control(wire.RPC, self._me, 0, wire.Rpc(request_id, method, args or {})))
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(remaining * 1000) + 1))
            if not ready:
                break
            if self._monitor is not None and self._monitor in ready:
                self._monitor.recv_multipart()
                assert self.security is not None
                raise RpcError(f"{self.endpoint} refused the key {self.security.key_name!r}: it is not in that "
                               "node's trusted keys directory")
            if self._socket not in ready:
                continue
            data = self._socket.recv()
            frame_type, *_ = wire.parse_header(data)
            if frame_type != wire.RPC_REPLY:
                continue
            reply: wire.RpcReply = wire.decode_control(frame_type, data)
            if reply.id != request_id:
                continue  # a late answer to an earlier request that timed out
            if not reply.ok:
                raise RpcError(f"{self.endpoint} {method}: {reply.error}")
            return reply.result
        hint = "" if self.security is not None else " (a node of a secure mesh answers only at KEY@tcp://HOST:PORT)"
        raise DeliveryTimeout(
            f"no answer from {self.endpoint} to {method!r} within {timeout:.1f} s: is a node running there?{hint}"
        )

    def close(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(0)
        self._socket.close(0)

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def rpc(
    endpoint: str,
    method: str,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
    *,
    security: Security | None = None,
) -> Any:
    """One system query to the node at ``endpoint`` (``KEY@tcp://...``: over CURVE with ``security``)."""
    with RpcClient(endpoint, security=security) as client:
        return client.call(method, args, timeout)


def fetch_system_spec(peer: str, timeout: float = 5.0, *, security: Security | None = None) -> SystemSpec:
    """The declarations of every service a running mesh knows, asked of one of its nodes."""
    return msgspec.convert(rpc(peer, "spec", timeout=timeout, security=security), SystemSpec)
