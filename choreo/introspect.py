"""Every system query a node answers (what ``choreo top``, ``trace``, ``dlq`` and ``graph --peer`` ask).

How this works: :func:`install` registers them all on an engine (``Engine.register_rpc``) when a
:class:`~choreo.node.Node` starts; a client asks with :func:`choreo.client.rpc`:

* ``spec``: the declarations of every live service the node knows (one system, for the analyzer);
* ``stats``: the node's counters and gauges (:meth:`~choreo.runtime.stats.NodeStats.to_dict`);
* ``peers``: the nodes it knows, with their state;
* ``spans`` ``{"trace_id": HEX?, "limit": N}``: its recent spans (of one trace);
* ``trace`` ``{"trace_id": HEX}``: its finished spans of one trace, plus what is still running,
  queued for its key or waiting for a retry (so ``choreo trace --follow`` shows work in
  progress), with the node's name and service;
* ``dlq.list``, ``dlq.show`` ``{"id": N}``, ``dlq.replay`` ``{"id": N}``: its dead letters;
* ``dlq.letters`` ``{"payload": bool, "limit": N}``: the dead letters with their payload
  (decoded from MessagePack when it is), reason and attempts, in one answer;
* ``retire`` ``{"service": NAME}``: forget a service with no live instance, in the whole mesh
  (``choreo retire``): the one way to scale a service to zero.

All read what the node keeps anyway (the span ring, the in-progress table, the dead-letter
store) at the moment they are asked: nothing here runs per message.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:  # pragma: no cover
    from .runtime.engine import Engine

__all__ = ["install", "payload_view"]


def install(engine: Engine) -> None:
    """Register every system query on ``engine``."""
    engine.register_rpc("spec", lambda args: engine.membership.system_spec())
    engine.register_rpc("stats", lambda args: engine.stats().to_dict())
    engine.register_rpc("peers", partial(_peers, engine))
    engine.register_rpc("spans", partial(_spans, engine))
    engine.register_rpc("trace", partial(_trace, engine))
    engine.register_rpc("dlq.list", lambda args: [letter.summary() for letter in engine.dispatcher.dead_letters])
    engine.register_rpc("dlq.show", partial(_letter, engine))
    engine.register_rpc("dlq.replay", lambda args: engine.dispatcher.replay(int(args["id"])).summary())
    engine.register_rpc("dlq.letters", partial(_letters, engine))
    engine.register_rpc("retire", lambda args: engine.retire(str(args["service"])))


def _peers(engine: Engine, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"node": p.node, "endpoint": p.endpoint, "service": p.service_name, "state": p.state}
        for p in engine.membership.peers.values()
    ]


def _spans(engine: Engine, args: dict[str, Any]) -> list[Any]:
    raw = args.get("trace_id")
    return engine.tracer.query(bytes.fromhex(raw) if raw else None, int(args.get("limit", 1000)))


def _letter(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    letter = engine.dispatcher.dead_letters[int(args["id"])]
    out = letter.summary()
    out["payload"] = payload_view(letter.payload)
    out["traceback"] = letter.traceback
    return out


def _trace(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    raw = args.get("trace_id")
    if not isinstance(raw, str) or len(raw) != 32:
        raise ValueError(f"trace_id must be 32 hex digits, got {raw!r}")
    trace_id = bytes.fromhex(raw)
    limit = int(args.get("limit", 10_000))
    tracer = engine.tracer
    return {
        "node": engine.name,
        "service": engine.service.name if engine.service else None,
        "endpoint": engine.transport.endpoint,
        "time": engine.wall(),
        "spans": tracer.query(trace_id, limit),
        "running": tracer.running(list(engine.dispatcher.in_progress.values()), trace_id, engine.wall()),
        "span_ring": engine.config.span_ring,
    }


def payload_view(payload: bytes) -> Any:
    """A message body as data: decoded MessagePack when it is, else its hex."""
    try:
        return msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return payload.hex()


def _letters(engine: Engine, args: dict[str, Any]) -> list[dict[str, Any]]:
    with_payload = bool(args.get("payload", True))
    limit = int(args.get("limit", 1000))
    out = []
    for letter in list(engine.dispatcher.dead_letters)[-limit:]:
        item = letter.summary()
        item["node"] = engine.name
        item["first_failed_at"] = letter.first_failed
        if with_payload:
            item["payload"] = payload_view(letter.payload)
        out.append(item)
    return out
