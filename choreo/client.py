"""System queries to a running node, for the CLI and for tests: no mesh membership needed.

Every node answers a few built-in requests on its ROUTER socket (``spec``, ``stats``,
``spans``, ``peers``, ``dlq.list``/``dlq.show``/``dlq.replay``). This client opens one DEALER,
asks, and waits for the answer with a timeout::

    spec = fetch_system_spec("tcp://127.0.0.1:7000")     # every service the mesh knows
    print(rpc("tcp://127.0.0.1:7000", "stats")["processed"])

It is synchronous on purpose (the CLI is), and independent of the node runtime.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import msgspec
import zmq

from . import wire
from .errors import ChoreoError, DeliveryTimeout
from .spec import SystemSpec

__all__ = ["rpc", "RpcClient", "RpcError", "fetch_system_spec"]

_ids = itertools.count(1)


class RpcError(ChoreoError):
    """The node answered, with an error."""


class RpcClient:
    """One connection to one node for several requests (close it, or use ``with``)."""

    def __init__(self, endpoint: str, *, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._me = int.from_bytes(os.urandom(8), "little") | 1

    def call(self, method: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Send one request and return its result; :class:`DeliveryTimeout` or :class:`RpcError`."""
        request_id = next(_ids)
        self._socket.send(wire.encode_control(wire.RPC, self._me, 0, wire.Rpc(request_id, method, args or {})))
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not poller.poll(int(remaining * 1000) + 1):
                break
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
        raise DeliveryTimeout(f"no answer from {self.endpoint} to {method!r} within {timeout:.1f} s: is a node running there?")

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def rpc(endpoint: str, method: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """One system query to the node at ``endpoint``."""
    with RpcClient(endpoint) as client:
        return client.call(method, args, timeout)


def fetch_system_spec(peer: str, timeout: float = 5.0) -> SystemSpec:
    """The declarations of every service a running mesh knows, asked of one of its nodes."""
    return msgspec.convert(rpc(peer, "spec", timeout=timeout), SystemSpec)
