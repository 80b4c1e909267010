"""Where the CPU time of one event and of one command round trip goes, stage by stage.

``python -m bench.budget`` runs every stage in this one process, with no socket and no other
process, so its figures do not move with what other jobs take from the machine (the end-to-end
benchmarks' wall-clock ratios do). Each figure is the best of several timed passes, in ns per
event (or µs per round trip), CPU time (``time.process_time``):

* sender stages: building the event (the application's), encoding it, checking its fields
  (the decode that ``encode_checked`` does), the compiled emit lane alone (encode, check,
  route, write into the window), ``engine.emit_now`` (the router's path: plan lookup, lane,
  batches leaving as frames through a transport that drops them) and ``engine.emit_fast`` (what
  ``node.try_emit`` calls, where this checkout has it: the compiled emit table, then the lane);
  ``emit_many`` the same per event, 256 at a time, where this checkout has it;
* receiver stages: ``InboundReorder.feed`` of a 256-envelope body, a dedup insert with
  100,000 ids remembered, decoding a body, calling a plain handler, the compiled fast lane over a
  released batch (dedup with 100,000 ids remembered, decode, handler, span, complete; then without
  spans, without dedup), and the whole ``Engine.on_frame`` +
  run turn of a DATA frame (the receive path through the runtime; its acks dropped); a batch
  handler and a handler that reads and writes its key's state (``bench.nodes``' ``counter_state``)
  the same way where this checkout has them;
* a command round trip between two engines wired in one process (both sides' runtime and
  asyncio, each frame read at a turn of the loop; no sockets): CPU per round trip.

The figures of two checkouts compare stage by stage (bench/README.md has those of issue 20,
before and after). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bench.nodes import Echo, Tick, body_for
from choreo import Service, core
from choreo.config import NodeConfig
from choreo.messages import decoder_for

N = 256 * 40  # events per pass
PASSES = 7
KEYS = [f"k{i}" for i in range(1000)]
BODY = body_for(100, "k500", 150_000)


def best(fn: Callable[[], int], passes: int = PASSES) -> float:
    """Best CPU ns per unit over ``passes`` runs of ``fn`` (which returns how many units it did)."""
    out = float("inf")
    for _ in range(passes):
        t0 = time.process_time()
        units = fn()
        out = min(out, (time.process_time() - t0) / units * 1e9)
    return out


class _Drop:
    """A transport that takes every frame and keeps the last DATA bodies (for the receiver)."""

    endpoint = "inproc://fake/budget"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.keep = False

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...

    def redial(self, endpoint: str) -> None: ...

    def send(self, endpoint: str, frame: bytes) -> None:
        if self.keep:
            self.frames.append(frame)

    def reply(self, identity: bytes, frame: bytes) -> None: ...


def events(n: int, offset: int = 0) -> list[Tick]:
    return [Tick(k=KEYS[i % 1000], n=offset + i, body=BODY) for i in range(n)]


def sender() -> dict[str, float]:
    out: dict[str, float] = {}
    evs = events(N)
    encode = msgspec.msgpack.Encoder().encode
    check = decoder_for(Tick).decode
    out["construct"] = best(lambda: len(events(N)))
    out["encode"] = best(lambda: [encode(e) for e in evs] and N)
    bodies = [encode(e) for e in evs]
    out["check (decode)"] = best(lambda: [check(b) for b in bodies] and N)

    windows = [core.OutboundWindow(max_messages=N, max_bytes=1 << 40) for _ in range(64)]
    lane = core.EmitLane(b"Tick", "k", 64, windows, encode, lambda v: str(v).encode(),
                         core.IdSource(b"\x01" * 8), 256, 256 << 10, 1 << 20, check)

    def lane_pass() -> int:
        emit = lane.emit
        for e in evs:
            emit(e, 0.0)
        for w in windows:  # (untimed in spirit: a flush and an ack per window per pass)
            w.flush()
            w.on_ack(w.next_seq - 1, w.next_seq - 1, [], 0.0)
        return N

    out["emit lane (encode+check+route+write)"] = best(lane_pass)
    engine, drop = _runtime_sender()
    if True:

        def emitting(emit: Callable[[Any], bytes | None]) -> Callable[[], int]:
            """A pass of ``emit`` over every event (each must go: the window has room), then a
            flush and everything acknowledged."""
            def emit_pass() -> int:
                for e in evs:
                    if emit(e) is None:
                        raise RuntimeError("no credit in the budget's window")
                engine.outbox.flush()
                _ack_all(engine)
                return N
            return emit_pass

        out["engine.emit_now (the router's plan, then the lane)"] = best(emitting(engine.emit_now))
        emit_fast = getattr(engine, "emit_fast", None)  # the compiled emit table (node.try_emit's one call)
        if emit_fast is not None:
            out["engine.emit_fast (what node.try_emit calls: the emit table)"] = best(emitting(emit_fast))
        out["node.try_emit (the application's call, whole)"] = best(emitting(_node_on(engine).try_emit))
        many = getattr(engine.router, "emit_many_now", None)
        if many is not None:
            def many_pass() -> int:
                for i in range(0, N, 256):
                    ids: list[bytes] = []
                    if many(evs[i:i + 256], 0, ids) != 256:
                        raise RuntimeError("no credit in the budget's window")
                engine.outbox.flush()
                _ack_all(engine)
                return N

            out["emit_many, per event (256 a call)"] = best(many_pass)
    return out


def _node_on(engine: Any) -> Any:
    """A Node around an engine made by hand (never started: no socket)."""
    from choreo.node import Node

    node = Node(None, config=engine.config)
    node.engine = engine
    if hasattr(node, "_use_emit_table"):  # as start() does, in checkouts that have it
        node._use_emit_table(engine)
    elif hasattr(node, "_emit_fast"):
        node._emit_fast = engine.emit_fast
    return node


def _ack_all(engine: Any) -> None:
    """Everything the budget sent is acknowledged (credit back for the next pass)."""
    for ch in engine.outbox.out.values():
        w = ch.window
        w.on_ack(w.next_seq - 1, w.next_seq - 1, [], 0.0)


def _runtime_sender() -> tuple[Any, _Drop]:
    """A client engine that has joined a mesh with one consumer service (membership by hand)."""
    from choreo.runtime.engine import Engine
    from choreo.runtime.membership import Peer

    consumer = Service("consumer")

    @consumer.on(Tick)
    def on_tick(ev: Tick) -> None: ...

    drop = _Drop()
    config = NodeConfig(window=1 << 20, window_bytes=1 << 40)
    engine = Engine(None, drop, config=config, clock=lambda: 0.0)
    loop = asyncio.new_event_loop()
    engine._loop = loop  # the flushes it schedules are never run: the passes flush themselves
    engine.outbox.start(loop, engine.incarnation)
    peer = Peer(incarnation=7, endpoint="inproc://fake/consumer", node="consumer#1", service=consumer.spec(),
                window=config.window, max_message_bytes=config.max_message_bytes, last_heard=0.0)
    engine.membership.upsert(peer)
    engine.lifecycle.state = "joined"
    return engine, drop


def receiver() -> dict[str, float]:
    out: dict[str, float] = {}
    encode = msgspec.msgpack.Encoder().encode
    decode = decoder_for(Tick).decode
    evs = events(N)
    bodies = [encode(e) for e in evs]
    ids = [i.to_bytes(16, "little") for i in range(1, N + 1)]
    w = core.OutboundWindow(max_messages=1 << 20, max_bytes=1 << 40)
    frames = []
    for i in range(0, N, 256):
        for j in range(i, i + 256):
            kb = evs[j].k.encode()
            w.append(1, 0, b"Tick", kb, core.partition_of(kb, 64), ids[j], ids[j], bytes(16), bodies[j], 0.0)
        frames.append(w.flush())

    def feed_pass() -> int:
        r = core.InboundReorder(window=N + 1)
        for f in frames:
            r.feed(f)
        return N

    out["reorder.feed (parse, order)"] = best(feed_pass)
    full = core.DedupWindow(300.0, 100_000)
    for i in range(100_000):
        full.insert((10**9 + i).to_bytes(16, "little"), 0.0)
    fresh = iter(range(2 * 10**9, 3 * 10**9))
    out["dedup insert (100k remembered)"] = best(lambda: [full.insert(next(fresh).to_bytes(16, "little"), 0.0)
                                                          for _ in range(N)] and N) - best(
        lambda: [next(fresh).to_bytes(16, "little") for _ in range(N)] and N)
    out["decode"] = best(lambda: [decode(b) for b in bodies] and N)
    seen = {"n": 0}

    def handler(ev: Tick) -> None:
        seen["n"] += 1

    out["handler call (a counter)"] = best(lambda: [handler(e) for e in evs] and N)

    def lane_pass(batch: bool, spans_on: bool = True, dedup_on: bool = True) -> float:
        """The lane alone (the feed before each run is not counted), best of the passes."""
        ring = getattr(core, "SpanRing", None)  # as the tracer keeps them (a deque before the span ring)
        spans: Any = ring(10_000) if ring is not None else __import__("collections").deque(maxlen=10_000)
        append = (spans if ring is not None else spans.append) if spans_on else None
        keyed = core.KeyedDispatch()
        window = core.DedupWindow(300.0, 100_000) if dedup_on else None
        for i in range(100_000 if dedup_on else 0):  # full, as in a running consumer: each insert evicts one
            window.insert((5 * 10**9 + i).to_bytes(16, "little"), 0.0)  # type: ignore[union-attr]
        lane = core.FastLane()
        fn = (lambda evs: None) if batch else handler
        if batch:
            lane.set("Tick", decode, window, fn, "h", False, None, True)
        else:
            lane.set("Tick", decode, window, fn, "h", False)
        best_ns = float("inf")
        for p in range(PASSES):
            r = core.InboundReorder(window=N + 1)
            released = [r.feed(_renumbered(f, p)) for f in frames]
            t0 = time.process_time()
            for envs in released:
                lane.run(envs, 0, r, 0.0, time.monotonic, 0.0, None, keyed, append, None)
            best_ns = min(best_ns, (time.process_time() - t0) / N * 1e9)
        return best_ns

    out["fast lane (dedup, decode, handler, span, complete)"] = lane_pass(False)
    out["  the same without spans"] = lane_pass(False, spans_on=False)
    out["  the same without dedup"] = lane_pass(False, dedup_on=False)
    try:
        core.FastLane().set("x", decode, None, handler, "h", False, None, True)
        out["fast lane, batch handler"] = lane_pass(True)
    except TypeError:
        pass
    out.update(_runtime_receiver(frames))
    return out


def _renumbered(body: bytes, p: int) -> bytes:
    """The same envelopes with ids of pass ``p`` (each pass's ids are new to the dedup window)."""
    view = core.parse_envelopes(body)
    w = core.OutboundWindow(max_messages=len(view) + 1, max_bytes=1 << 40)
    for e in view:
        mid = (int.from_bytes(e.msg_id, "little") + (p + 1) * 10**9).to_bytes(16, "little")
        w.append(1, 0, b"Tick", e.key, e.partition, mid, mid, bytes(16), e.payload, 0.0)
    return _reseq(w.flush(), view[0].seq)  # the original's sequence numbers: the reorder buffer expects them


def _reseq(body: bytes, first: int) -> bytes:
    out = bytearray(body)
    pos, seq = 0, first
    while pos < len(out):
        out[pos:pos + 8] = seq.to_bytes(8, "little")
        tlen, klen = out[pos + 18], int.from_bytes(out[pos + 12:pos + 14], "little")
        plen = int.from_bytes(out[pos + 8:pos + 12], "little")
        pos += core.HEADER_SIZE + tlen + klen + plen
        seq += 1
    return bytes(out)


def _receiving_service(variant: str) -> Service | None:
    """The consumer of a receive-path stage, or None where this checkout lacks what it needs: a
    plain handler, a batch handler, or ``bench.nodes``' ``counter_state`` (a state read and write)."""
    if variant == "state":
        try:
            from bench.nodes import counter_state
        except ImportError:
            return None
        return counter_state  # type: ignore[no-any-return]
    svc = Service("consumer")
    if variant == "batch":
        try:
            svc.on(Tick, batch=True)(lambda evs: None)
        except TypeError:
            return None
    else:
        svc.on(Tick)(lambda ev: None)
    return svc


def _runtime_receiver(frames: list[bytes]) -> dict[str, float]:
    """The whole receive path: DATA frames into a consumer engine, handled by a plain handler."""
    from choreo import wire
    from choreo.runtime.engine import Engine
    from choreo.runtime.membership import Peer

    out: dict[str, float] = {}
    for variant in ("plain", "batch", "state"):
        svc = _receiving_service(variant)
        if svc is None:
            continue
        drop = _Drop()
        config = NodeConfig(window=1 << 20, window_bytes=1 << 40)
        engine = Engine(svc, drop, config=config, clock=time.monotonic)
        loop = asyncio.new_event_loop()
        engine._loop = loop
        engine.outbox.start(loop, engine.incarnation)
        engine.lifecycle.state = "joined"
        engine.moves = None
        engine.dispatcher.moves = None  # every partition is this node's
        producer = Peer(incarnation=9, endpoint="inproc://fake/producer", node="producer#1", service=None,
                        window=config.window, max_message_bytes=config.max_message_bytes, last_heard=0.0)
        engine.membership.upsert(producer)
        seq = [0]

        def run_pass() -> int:
            for body in frames:  # fresh sequence numbers and ids each pass
                envs = core.parse_envelopes(body)
                w = core.OutboundWindow(max_messages=1 << 20, max_bytes=1 << 40, first_seq=seq[0] + 1)
                for e in envs:
                    seq[0] += 1
                    mid = (seq[0] + 10**12).to_bytes(16, "little")
                    w.append(1, 0, b"Tick", e.key, e.partition, mid, mid, bytes(16), e.payload, 0.0)
                frame = wire.frame(wire.DATA, 9, engine.incarnation, w.flush())
                t0 = time.process_time()
                engine.on_frame(frame, b"producer", None)
                while engine.intake.queue:
                    engine.intake.run()
                engine.flush()
                run_pass.cpu += time.process_time() - t0  # type: ignore[attr-defined]
            return N

        def timed() -> float:
            run_pass.cpu = 0.0  # type: ignore[attr-defined]
            run_pass()
            return run_pass.cpu / N * 1e9  # type: ignore[attr-defined,no-any-return]

        name = {
            "plain": "engine.on_frame + run turn (whole receive path)",
            "batch": "engine.on_frame + run turn, batch handler",
            "state": "engine.on_frame + run turn, a state read and write",
        }[variant]
        out[name] = min(timed() for _ in range(PASSES))
    return out


class _Wire:
    """Two engines in one process: a frame sent is read by its receiver at the next loop turn, as
    a socket's reader callback would (``on_frame``, then ``flush``)."""

    def __init__(self, endpoint: str, loop: asyncio.AbstractEventLoop, peers: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.loop = loop
        self.peers = peers

    def connect(self, endpoint: str) -> None: ...

    def disconnect(self, endpoint: str) -> None: ...

    def redial(self, endpoint: str) -> None: ...

    def send(self, endpoint: str, frame: bytes) -> None:
        self.loop.call_soon(self._deliver, self.peers[endpoint], frame)

    def _deliver(self, engine: Any, frame: bytes) -> None:
        engine.on_frame(frame, self.endpoint.encode(), None)
        engine.flush()

    def reply(self, identity: bytes, frame: bytes) -> None: ...


def round_trip(n: int = 3000) -> dict[str, float]:
    """CPU per command round trip between two engines wired in one process (no sockets): both
    sides' runtime and asyncio, each frame read at a turn of the loop as a reader callback would."""
    from choreo.runtime.engine import Engine
    from choreo.runtime.membership import Peer

    owner = Service("owner")

    @owner.command(Echo)
    def echo(cmd: Echo) -> bytes:
        return cmd.body

    loop = asyncio.new_event_loop()
    peers: dict[str, Any] = {}
    config = NodeConfig()
    client = Engine(None, _Wire("inproc://fake/client", loop, peers), config=config, clock=time.monotonic)
    server = Engine(owner, _Wire("inproc://fake/owner", loop, peers), config=config, clock=time.monotonic)
    peers.update({"inproc://fake/client": client, "inproc://fake/owner": server})
    for engine in (client, server):
        engine._loop = loop
        engine.calls.loop = loop
        engine.outbox.start(loop, engine.incarnation)
        engine.lifecycle.state = "joined"
    server.moves = None
    server.dispatcher.moves = None  # every partition is the owner's
    for me, other, spec in ((client, server, owner.spec()), (server, client, None)):
        me.membership.upsert(Peer(incarnation=other.incarnation, endpoint=other.transport.endpoint, node=other.name,
                                  service=spec, window=config.window, max_message_bytes=config.max_message_bytes,
                                  last_heard=0.0))
    body = b"x" * 100

    async def pings(count: int) -> float:
        t0 = time.process_time()
        for _ in range(count):
            await client.send(Echo(body=body))
        return (time.process_time() - t0) / count * 1e6

    loop.run_until_complete(pings(300))
    result = {"command round trip, both engines and asyncio (µs)": min(
        loop.run_until_complete(pings(n)) for _ in range(5))}
    loop.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print(f"choreo core: {core.IMPLEMENTATION}; ns per event, CPU time, best of {PASSES} passes of {N} events")
    for title, figures in (("sender", sender()), ("receiver", receiver()), ("round trip", round_trip())):
        print(f"\n{title}")
        for name, value in figures.items():
            print(f"  {name:58s} {value:9.0f}" if "µs" not in name else f"  {name:58s} {value:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
