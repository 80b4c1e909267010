"""The system queries a node answers (``choreo top``, ``dlq``, ``peers``...): a table of methods.

How this works. A system query is an RPC frame from a client (the CLI, ``choreo.client``) on the
connection it came on: a method name and its arguments. :class:`SystemQueries` keeps the table of
methods (:mod:`choreo.introspect` registers them all), checks with
:class:`~choreo.runtime.admission.Admission` that the caller's key may call it, and answers with
an RPC_REPLY on that connection: the result, or an error that says what was wrong (an unknown
method lists the known ones; a method that raises answers with the exception)::

    >>> answers = []
    >>> queries = SystemQueries(Admission(None, None), refused=print, reply=lambda who, frame: answers.append(frame),
    ...                         incarnation=lambda: 1)
    >>> queries.register("ping", lambda args: "pong")
    >>> queries.on_rpc(b"cli", wire.Rpc(7, "ping", {}))
    >>> wire.decode_control(wire.RPC_REPLY, answers[-1])
    RpcReply(id=7, ok=True, result='pong', error='')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .. import wire
from ..errors import ProtocolError
from .admission import Admission

__all__ = ["SystemQueries", "RpcHandler"]

RpcHandler = Callable[[dict[str, Any]], Any]


class SystemQueries:
    """The system query methods of one node, and its answers (see the module docstring)."""

    def __init__(
        self,
        admission: Admission,
        *,
        refused: Callable[[str, str], None],
        reply: Callable[[bytes, bytes], None],
        incarnation: Callable[[], int],
    ) -> None:
        """``refused(reason, detail)`` counts a refusal; ``reply(identity, frame)`` answers on a
        connection; ``incarnation()`` is the node's current one (it changes when it rejoins)."""
        self.admission = admission
        self.refused = refused
        self.reply = reply
        self.incarnation = incarnation
        self.methods: dict[str, RpcHandler] = {}

    def register(self, method: str, fn: RpcHandler) -> None:
        """Answer the system query ``method`` with ``fn(args)`` (see :mod:`choreo.introspect`)."""
        self.methods[method] = fn

    def on_rpc(self, identity: bytes | None, rpc: wire.Rpc, principal: str | None = None) -> None:
        if identity is None:
            raise ProtocolError("malformed", "rpc without a connection to answer on")
        fn = self.methods.get(rpc.method)
        refused = self.admission.may_call(principal, rpc.method) if fn is not None else None
        if refused is not None:
            self.refused("not_allowed", f"system query {rpc.method}: {refused}")
            reply = wire.RpcReply(rpc.id, False, error=f"not allowed: {refused}")
        elif fn is None:
            reply = wire.RpcReply(rpc.id, False, error=f"unknown method {rpc.method!r}; known: {sorted(self.methods)}")
        else:
            try:
                reply = wire.RpcReply(rpc.id, True, result=fn(rpc.args))
            except Exception as exc:  # the client asked for something impossible: tell it why
                reply = wire.RpcReply(rpc.id, False, error=f"{type(exc).__name__}: {exc}")
        incarnation = self.incarnation()
        try:
            frame = wire.encode_control(wire.RPC_REPLY, incarnation, 0, reply)
        except (TypeError, msgspec.EncodeError) as exc:
            frame = wire.encode_control(wire.RPC_REPLY, incarnation, 0, wire.RpcReply(rpc.id, False, error=str(exc)))
        self.reply(identity, frame)
