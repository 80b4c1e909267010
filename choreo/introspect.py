"""The node's side of ``choreo trace`` and ``choreo dlq``: system queries added to every node.

How this works: the engine answers a few built-in system queries (``spec``, ``stats``,
``spans``, ``peers``, ``dlq.*``); :func:`install` adds the ones the observability commands need,
through ``Engine.register_rpc``, when a :class:`~choreo.node.Node` starts:

* ``trace`` ``{"trace_id": HEX}``: this node's finished spans of one trace, plus what is still
  running, queued for its key or waiting for a retry (so ``choreo trace --follow`` shows work in
  progress), with the node's name and service;
* ``traces`` ``{"limit": N}``: a summary of each recent trace this node saw (its entry message,
  first and last times, steps, types, keys, failed steps, whether it still runs here), most
  recent first, for ``choreo traces``;
* ``dlq.letters`` ``{"payload": bool, "limit": N}``: the dead letters with their payload
  (decoded from MessagePack when it is), reason and attempts, in one answer;
* ``dlq.outcome`` ``{"id": N, "msg_id": HEX, "replay": n}``: how the n-th replay of a dead letter
  ended: ``failed`` (the letter is back in the store, with its error), ``handled`` (its span
  says ok), ``running`` (neither yet), or ``gone`` (not back, and no span to tell: tracing off);

Both read what the node keeps anyway (the span ring, the in-progress table, the dead-letter
store) at the moment they are asked: nothing here runs per message.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["install", "payload_view"]


def install(engine: Engine) -> None:
    """Register this module's system queries on ``engine``."""
    engine.register_rpc("trace", partial(_trace, engine))
    engine.register_rpc("traces", partial(_traces, engine))
    engine.register_rpc("dlq.letters", partial(_letters, engine))
    engine.register_rpc("dlq.outcome", partial(_outcome, engine))


def _trace(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    raw = args.get("trace_id")
    if not isinstance(raw, str) or len(raw) != 32:
        raise ValueError(f"trace_id must be 32 hex digits, got {raw!r}")
    trace_id = bytes.fromhex(raw)
    limit = int(args.get("limit", 10_000))
    tracer = engine.tracer
    now = engine.wall()
    return {
        "node": engine.name,
        "service": engine.service.name if engine.service else None,
        "endpoint": engine.transport.endpoint,
        "time": now + tracer.offset,
        "spans": tracer.query(trace_id, limit),
        "running": tracer.running(list(engine.dispatcher.in_progress.values()), trace_id, now),
        "span_ring": engine.config.span_ring,
    }


def _traces(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    limit = int(args.get("limit", 1000))
    tracer = engine.tracer
    return {
        "node": engine.name,
        "service": engine.service.name if engine.service else None,
        "span_ring": engine.config.span_ring,
        "spans": len(tracer.spans) if tracer.enabled else 0,
        "flows": tracer.flows(limit, list(engine.dispatcher.in_progress)),
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
    for letter in list(engine.dispatcher.dead_letters.values())[-limit:]:
        item = letter.summary()
        item["node"] = engine.name
        item["first_failed_at"] = letter.first_failed
        if with_payload:
            item["payload"] = payload_view(letter.payload)
        out.append(item)
    return out


def _outcome(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    letter_id, replay = int(args["id"]), int(args["replay"])
    msg_id = bytes.fromhex(str(args["msg_id"]))
    letter = engine.dispatcher.dead_letters.get(letter_id)
    if letter is not None and letter.replays >= replay:
        return {"state": "failed", "error": f"{letter.error_type}: {letter.error}", "attempts": letter.attempts}
    tracer = engine.tracer
    for t in reversed(tracer.spans):
        if len(t) > 13 and t[13] == replay and t[1] == msg_id and t[8] == "ok":
            return {"state": "handled", "error": None, "attempts": t[10]}
    if not tracer.enabled:
        return {"state": "gone", "error": None, "attempts": None}
    return {"state": "running", "error": None, "attempts": None}
