"""Every system query a node answers (what ``choreo top``, ``trace``, ``dlq`` and ``graph --peer`` ask).

How this works: :func:`install` registers them all on an engine (``Engine.register_rpc``) when a
:class:`~choreo.node.Node` starts; a client asks with :func:`choreo.client.rpc`:

* ``spec``: the declared system the node knows, live instances or not (one system, for the analyzer);
* ``stats``: the node's counters and gauges (:func:`node_stats`, as
  :meth:`~choreo.runtime.stats.NodeStats.to_dict`);
* ``peers``: the nodes it knows, with their state;
* ``spans`` ``{"trace_id": HEX?, "limit": N}``: its recent spans (of one trace);
* ``trace`` ``{"trace_id": HEX}``: its finished spans of one trace, plus what is still running,
  queued for its key or waiting for a retry (so ``choreo trace --follow`` shows work in
  progress), with the node's name and service;
* ``dlq.list``, ``dlq.show`` ``{"id": N}``, ``dlq.replay`` ``{"id": N}``: its dead letters;
* ``retire`` ``{"service": NAME}``: forget a service with no live instance, in the whole mesh
  (``choreo retire``): the one way to scale a service to zero;
* ``traces`` ``{"limit": N}``: a summary of each recent trace this node saw (its entry message,
  first and last times, steps, types, keys, failed steps, whether it still runs here), most
  recent first, for ``choreo traces``;
* ``rates`` ``{"window": S}``: the handler attempts of the last S seconds by type, handler and
  outcome, with how many seconds the span ring covered, and the node's lag, in-flight envelopes,
  dead letters and refusals (the live map of ``choreo graph --live``);
* ``dlq.letters`` ``{"payload": bool, "limit": N}``: the dead letters with their payload
  (decoded from MessagePack when it is), reason and attempts, in one answer;
* ``dlq.outcome`` ``{"id": N, "msg_id": HEX, "replay": n}``: how the n-th replay of a dead letter
  ended: ``failed`` (the letter is back in the store, with its error), ``handled`` (its span
  says ok), ``running`` (neither yet), or ``gone`` (not back, and no span to tell: tracing off);

All read what the node keeps anyway (the span ring, the in-progress table, the dead-letter
store) at the moment they are asked: nothing here runs per message.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from .runtime.stats import NodeStats, PeerStats
from .terminal import plural
from .tracing import SPAN_ATTEMPT, SPAN_FINISHED, SPAN_HANDLER, SPAN_IDS, SPAN_OUTCOME, SPAN_REPLAY, SPAN_TYPE

if TYPE_CHECKING:  # pragma: no cover
    from .runtime.engine import Engine

__all__ = ["install", "node_stats", "payload_view", "join_hint", "unacknowledged", "undrained", "replay_outcome"]


def install(engine: Engine) -> None:
    """Register every system query on ``engine``."""
    engine.register_rpc("spec", lambda args: engine.membership.system_spec())
    engine.register_rpc("stats", lambda args: node_stats(engine).to_dict())
    engine.register_rpc("peers", partial(_peers, engine))
    engine.register_rpc("spans", partial(_spans, engine))
    engine.register_rpc("trace", partial(_trace, engine))
    engine.register_rpc("dlq.list", lambda args: [letter.summary() for letter in engine.dispatcher.dead_letters])
    engine.register_rpc("dlq.show", partial(_letter, engine))
    engine.register_rpc("dlq.replay", lambda args: engine.dispatcher.replay(int(args["id"])).summary())
    engine.register_rpc("dlq.letters", partial(_letters, engine))
    engine.register_rpc("dlq.outcome", partial(replay_outcome, engine))
    engine.register_rpc("traces", partial(_traces, engine))
    engine.register_rpc("rates", partial(_rates, engine))
    engine.register_rpc("retire", lambda args: engine.retire(str(args["service"])))


def node_stats(engine: Engine) -> NodeStats:
    """Counters and gauges of one node (what ``Node.stats()``, ``choreo top`` and metrics read)."""
    d = engine.dispatcher.stats
    c = engine.counters
    ownership = engine.ownership
    return NodeStats(
        node=engine.name,
        service=engine.service.name if engine.service else None,
        incarnation=f"{engine.incarnation:016x}",
        endpoint=engine.transport.endpoint,
        state=engine.lifecycle.state,
        time=engine.wall(),
        received=d.received,
        processed=d.processed,
        failed_attempts=d.failed_attempts,
        dead_letters=len(engine.dispatcher.dead_letters),
        dead_lettered=d.dead_lettered,
        duplicates=d.duplicates,
        in_handler=d.in_handler,
        lag=engine.lag(),
        emitted=engine.router.emitted(),
        sent=c.sent,
        in_flight=engine.outbox.in_flight(),
        redelivered=engine.outbox.redelivered(),
        backpressure_waits=c.backpressure_waits,
        backpressure_errors=c.backpressure_errors,
        unrouted=c.unrouted,
        forwarded=c.forwarded,
        reincarnations=c.reincarnations,
        resent_requests=c.resent_requests,
        partitions=ownership.summary() if ownership is not None else {},
        holds=len(engine.holds.by_key),
        kept=engine.outbox.kept,
        relieved=d.relieved,
        owed=len(engine.dispatcher.data.owed),
        redials=c.redials,
        refused=dict(c.refused),
        frames_in=c.frames_in,
        frames_out=c.frames_out,
        peers=tuple(
            PeerStats(p.node, p.state, p.service_name, p.endpoint) for p in engine.membership.peers.values()
        ),
        store=engine.journal.stats() if engine.journal is not None else {},
        handler_state=_state_stats(engine),
    )

def _state_stats(engine: Engine) -> dict[str, Any]:
    """What ``stats`` says of handler state: keys held, partitions moved, standby copies."""
    tables = engine.dispatcher.state
    if tables is None or engine.moves is None:
        return {}
    out: dict[str, Any] = {"keys": tables.keys(), "moves": engine.moves.transfers.to_dict()}
    if engine.moves.replicas is not None:
        out["replicas"] = engine.moves.replicas.stats()
    return out


def _peers(engine: Engine, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"node": p.node, "endpoint": p.endpoint, "service": p.service_name, "state": p.state,
         # a member known by name only (gossip) until its declarations arrive: nothing routes to it yet
         "declared": p.service is not None or p.claims is None}
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
    now = engine.clock()  # the spans' clock
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


def _rates(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    window = float(args.get("window", 5.0))
    if not window > 0:
        raise ValueError(f"window must be > 0 seconds, got {window}")
    tracer = engine.tracer
    now = engine.clock()  # the spans' clock
    since = now - window
    counts: dict[tuple[str, str, str], int] = {}
    covered = window
    for t in reversed(tracer.spans):  # newest first: stop at the window's start
        if t[SPAN_FINISHED] < since:
            break
        key = (t[SPAN_TYPE], t[SPAN_HANDLER], t[SPAN_OUTCOME])
        counts[key] = counts.get(key, 0) + 1
    else:  # every span is in the window: when the ring is full, it covers less than the window
        if tracer.enabled and len(tracer.spans) == tracer.spans.maxlen:
            covered = max(now - tracer.spans[0][SPAN_FINISHED], 1e-3)
    stats = node_stats(engine)
    return {
        "node": engine.name,
        "service": engine.service.name if engine.service else None,
        "covered": covered,  # seconds the counts are over
        "handled": [{"type": k[0], "handler": k[1], "outcome": k[2], "count": n} for k, n in sorted(counts.items())],
        "lag": sum(stats.lag.values()),
        "in_flight": stats.in_flight,
        "dead_letters": stats.dead_letters,
        "refused": sum(stats.refused.values()),
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


def replay_outcome(engine: Engine, args: dict[str, Any]) -> dict[str, Any]:
    """How replay number ``args["replay"]`` of dead letter ``args["id"]`` ended (``dlq.outcome``):
    ``handled`` (on a durable node: once the letter's removal is safe on disk), ``failed`` (a
    dead letter again), ``running``, or ``gone`` (no spans kept to tell)."""
    letter_id, replay = int(args["id"]), int(args["replay"])
    msg_id = bytes.fromhex(str(args["msg_id"]))
    letter = engine.dispatcher.dead_letters.get(letter_id)
    if letter is not None and letter.replays >= replay:
        return {"state": "failed", "error": f"{letter.error_type}: {letter.error}", "attempts": letter.attempts}
    journal, committing = engine.journal, engine.dispatcher.replays_committing
    if journal is not None and letter_id in committing:
        if journal.safe < committing[letter_id]:
            return {"state": "running", "error": None, "attempts": None}  # handled, not yet safe on disk
        del committing[letter_id]
    tracer = engine.tracer
    for t in reversed(tracer.spans):
        if len(t) > SPAN_REPLAY and t[SPAN_REPLAY] == replay and t[SPAN_IDS][:16] == msg_id and t[SPAN_OUTCOME] == "ok":
            return {"state": "handled", "error": None, "attempts": t[SPAN_ATTEMPT]}
    if not tracer.enabled:
        return {"state": "gone", "error": None, "attempts": None}
    return {"state": "running", "error": None, "attempts": None}


def _waiting_on(engine: Engine) -> list[str]:
    """``12 to payments#2b (tcp://10.0.0.7:7001), nothing heard from it for 9.8 s``, per peer with envelopes in flight."""
    now = engine.clock()
    out = []
    for ch in engine.outbox.out.values():
        n = ch.window.in_flight + len(ch.backlog)
        if not (n or ch.custody) or ch.closed or not ch.peer.live:
            continue
        silent = now - ch.peer.last_heard
        heard = f", nothing heard from it for {silent:.1f} s" if silent >= 2 * engine.config.heartbeat else ""
        early = f" ({len(ch.custody)} of them acknowledged early, not yet done there)" if ch.custody else ""
        out.append(f"{n + len(ch.custody)} to {ch.peer.node} ({ch.peer.endpoint}){early}{heard}")
    return out


def unacknowledged(engine: Engine, timeout: float) -> str:
    """Why a flush timed out, by peer: what each one has not acknowledged and whether it is heard from.

    A peer that is never heard from while it holds our envelopes usually cannot dial back to this
    node's endpoint: acks travel on connections the peer opens to the endpoint we advertise.
    """
    waiting = _waiting_on(engine)
    text = (
        f"{engine.name}: not everything sent was acknowledged within {timeout:.1f} s: "
        + ("; ".join(waiting) or "messages wait for a live instance of the service that consumes them")
    )
    if any("nothing heard" in w for w in waiting):
        text += (
            f". A peer that is not heard from may be unable to dial back to this node's endpoint "
            f"{engine.transport.endpoint}: bind an address it reaches, or pass --advertise (advertise= in Python)"
        )
    return text


def undrained(engine: Engine, timeout: float) -> str | None:
    """What a node leaves behind when its drain did not finish within ``timeout`` (for its log);
    None when nothing is left (only the quiet period after the last message was cut short)."""
    stats = node_stats(engine)
    lag = sum(stats.lag.values())
    if not stats.in_flight and not stats.kept and not lag and not stats.in_handler:
        return None
    waiting = _waiting_on(engine)
    return (
        f"{engine.name}: leaving before its drain finished ({timeout:.1f} s allowed): "
        f"{plural(stats.in_flight + stats.kept, 'message')} it sent not yet done"
        + (f" ({'; '.join(waiting)})" if waiting else "")
        + f", {lag} received and not yet handled. Their senders resend what it received to the instances "
        "that take over; what it sent is resent only while it lives, so messages it originated itself may be lost"
    )


def join_hint(engine: Engine, seeds: list[str]) -> str:
    """Why a node may not see the services it waits for, when no node of the mesh answered it ('' otherwise)."""
    from .endpoints import is_loopback

    if not seeds or any(p.live and p.incarnation != engine.incarnation for p in engine.membership.peers.values()):
        return ""
    endpoint = engine.transport.endpoint
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    remote = [s for s in seeds if not is_loopback(s.removeprefix("tcp://").rsplit(":", 1)[0])]
    hint = f"; no node answered: the seeds ({', '.join(seeds)}) are down, or cannot dial back to this node at {endpoint}"
    if is_loopback(host) and remote:
        hint += " (a loopback address: bind an address they reach, or pass --advertise)"
    return hint
