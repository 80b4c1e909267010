"""The services the end-to-end benchmarks run, one node process each (see bench/harness.py).

Every node reads what to do from the ``CHOREO_BENCH`` environment variable (a JSON object the
harness writes), and a node that measures something writes one JSON object to the file named
there by ``"out"``: no parsing of logs, no shared memory.

* ``producer``: a background task waits for the consumers, then emits keyed (or unkeyed)
  ``Tick`` events as fast as credit allows (``try_emit``, and ``await emit`` only when the
  window is full), or ``TickB`` events ``batch`` at a time with ``emit_many``, or at a fixed rate
  (the same, and a durable producer waits for the commit of each millisecond's events: ``await
  node.sync()``); it stops after ``count`` events or ``seconds``,
  whichever comes first, waits until every event is acknowledged (handled downstream), and
  reports how many it sent and how long that took, from the first emit to the last ack.
  With ``hold`` (a durable producer whose consumer was stopped) it waits for its commit
  instead of the acks, reports its store, and holds what it sent until it is stopped.
* ``consumer`` (and ``consumer_1`` .. ``consumer_7`` for fan-out): handle ``Tick`` keyed by
  ``k`` (or ``TickU``, unkeyed; ``TickB`` with a batch handler), check per-key order, answer the ``Echo`` command (latency), and
  answer the system query ``bench`` with what they saw.
* ``pinger``: sends ``Echo`` commands one after another and reports each round trip.
* ``counter_state`` / ``counter_plain``: count ``Tick`` per key, in ``ctx.state`` or in a dict
  (the same handler otherwise), and answer ``bench`` with their counts, memory and moves.

Event bodies: ``k`` (the key), ``n`` (the producer's sequence number, for the order check) and
``body`` (padding): ``body_for`` sizes the padding so the encoded event has the wanted size.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import msgspec

from choreo import Backpressure, Command, Event, Service

__all__ = [
    "CONSUMERS", "Count", "Echo", "Tick", "TickB", "TickU", "body_for", "consumer", "counter_plain", "counter_state",
    "encoded", "pinger", "producer",
]


class Tick(Event, key="k"):
    """A keyed event: per-key order is kept for it."""

    k: str
    n: int
    body: bytes


class TickU(Event):
    """The same event without a key: no per-key order (spread over instances by load)."""

    k: str
    n: int
    body: bytes


class TickB(Event, key="k"):
    """The keyed event of the batch variant: emitted with ``emit_many``, handled by a batch handler."""

    k: str
    n: int
    body: bytes


class Echo(Command, returns=bytes):
    """A command whose result is its body (the same bytes both ways, like a raw ping-pong)."""

    body: bytes


def _params() -> dict[str, Any]:
    return json.loads(os.environ.get("CHOREO_BENCH", "{}"))


if _params().get("timeline"):  # python -m bench.timeline: this process notes its round trips' stages
    from bench.timeline import install

    install(_params()["timeline"])


def _write(out: str | None, data: dict[str, Any]) -> None:
    if not out:
        return
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, out)  # the harness never reads half a file


def encoded(key: str, n: int, body: bytes) -> bytes:
    """The bytes of one event on the wire (its payload), as the runtime encodes it."""
    from choreo.messages import encode

    return encode(Tick(k=key, n=n, body=body))


def body_for(size: int, key: str = "k500", n: int = 1 << 20) -> bytes:
    """Padding that makes an event with this key and sequence number encode to ``size`` bytes
    (to at least the fixed fields, ~20 B, when ``size`` is smaller)."""
    fixed = len(encoded(key, n, b""))
    pad = max(size - fixed, 0)
    body = b"x" * pad
    # a bin header grows from 2 to 3 to 5 bytes at 256 and 65536 bytes of body
    while pad > 0 and len(encoded(key, n, body)) > size:
        pad -= 1
        body = b"x" * pad
    return body


# ---------------------------------------------------------------------------------------- producer

producer = Service("producer", emits=[Tick, TickU, TickB])


@producer.task
async def produce(node: Any) -> None:
    p = _params()
    if p.get("role") != "producer":
        return
    out = p.get("out")
    try:
        result = await _produce(node, p)
    except Exception as exc:  # reported, not swallowed: the harness raises with it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["stats"] = {k: v for k, v in node.stats().to_dict().items() if isinstance(v, (int, float))}
    result["store"] = node.stats().store  # a durable producer's store (empty without a data dir)
    _write(out, result)


async def _produce(node: Any, p: dict[str, Any]) -> dict[str, Any]:
    await node.wait_for(p.get("wait", {"consumer": 1}), timeout=60)
    count = int(p["count"])
    seconds = float(p.get("seconds", 10.0))
    nkeys = int(p.get("keys", 1000))
    rate = float(p.get("rate", 0.0))  # events/s; 0: as fast as credit allows
    batch = int(p.get("batch", 0))  # > 0: emit_many of this many events at a time (to a batch handler)
    cls = TickB if batch else TickU if p.get("unkeyed") else Tick
    keys = [f"k{i}" for i in range(nkeys)]
    body = body_for(int(p.get("size", 100)), keys[nkeys // 2], count // 2)
    try_emit = node.try_emit
    emit = node.emit

    async def send(lo: int, hi: int) -> int:
        """Events lo..hi-1: try_emit each, await emit only when credit is out; how often it waited."""
        waited = 0
        for i in range(lo, hi):
            ev = cls(k=keys[i % nkeys], n=i, body=body)
            try:
                try_emit(ev)
            except Backpressure:
                waited += 1
                await emit(ev, timeout=30)
        return waited

    # a short warm-up: connections made, emit plans compiled, the consumer's decoders built (sent the
    # way the measured part sends: an await per event would cost a durable node a commit each)
    await send(-min(2000, count), 0)
    await node.flush(timeout=30)
    if p.get("started"):  # tells a pinger that the load is on (latency under load), or that the warm-up is over
        _write(p["started"], {"store": node.stats().store})
        if p.get("hold"):
            deadline = time.monotonic() + 30
            while not os.path.exists(p["started"] + ".go") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    perf = time.perf_counter
    cpu0 = time.process_time()
    start = perf()
    deadline = start + seconds
    waits = 0
    sent = 0
    if batch and rate <= 0:
        emit_many = node.emit_many
        while sent < count:
            stop = min(sent + batch, count)
            await emit_many([cls(k=keys[i % nkeys], n=i, body=body) for i in range(sent, stop)], timeout=30)
            sent = stop
            if perf() > deadline:
                break
            await asyncio.sleep(0)
    elif rate <= 0:
        while sent < count:
            # time is read once per 256 events; an await per batch lets acks in
            stop = min(sent + 256, count)
            waits += await send(sent, stop)
            sent = stop
            if perf() > deadline:
                break
            await asyncio.sleep(0)
    else:
        tick = 0.001
        while sent < count:
            now = perf()
            if now > deadline:
                break
            due = min(int((now - start) * rate) + 1, count)
            waits += await send(sent, due)
            sent = max(sent, due)
            await node.sync()  # a durable producer: this tick's events committed (no-op without a data dir)
            await asyncio.sleep(tick)
    emitted_s = perf() - start
    if p.get("hold"):  # nobody acknowledges: what was sent stays in the outbox (a durable producer's store)
        await node.sync(timeout=30)
        return {"count": sent, "elapsed": emitted_s, "in_flight": node.stats().in_flight}
    await node.flush(timeout=60)
    elapsed = perf() - start
    return {"count": sent, "elapsed": elapsed, "emit_elapsed": emitted_s, "waits": waits,
            "cpu_s": time.process_time() - cpu0,
            "payload_bytes": len(encoded(keys[nkeys // 2], count // 2, body))}


# ---------------------------------------------------------------------------------------- consumers

def _make_consumer(name: str) -> Service:
    svc = Service(name)
    seen = {"handled": 0, "out_of_order": 0}
    last: dict[str, int] = {}
    check = os.environ.get("CHOREO_BENCH_CHECK", "1") == "1"

    @svc.on(Tick)
    def on_tick(ev: Tick) -> None:
        seen["handled"] += 1
        if check:
            k = ev.k
            if ev.n <= last.get(k, -1 << 62):
                seen["out_of_order"] += 1
            last[k] = ev.n

    @svc.on(TickU)
    def on_ticku(ev: TickU) -> None:
        seen["handled"] += 1

    @svc.on(TickB, batch=True)
    def on_tickb(events: list[TickB]) -> None:
        seen["handled"] += len(events)
        if check:
            for ev in events:
                k = ev.k
                if ev.n <= last.get(k, -1 << 62):
                    seen["out_of_order"] += 1
                last[k] = ev.n

    if name == "consumer":

        @svc.command(Echo)
        def on_echo(cmd: Echo) -> bytes:
            return cmd.body

    @svc.task
    async def report(node: Any) -> None:
        def answer(args: dict[str, Any]) -> dict[str, Any]:
            d = node.engine.dispatcher
            return {
                **seen,
                "keys_seen": len(last),
                "rss_kb": rss_kb(),
                "hwm_kb": rss_kb("VmHWM"),
                # the runtime's own per-message and per-key state
                "dedup_entries": sum(len(w) for w in d.dedup.values()),
                "dedup_bytes": sum(w.memory_bytes for w in d.dedup.values()),
                "busy_keys": d.keyed.busy_keys,
            }

        node.engine.register_rpc("bench", answer)

    return svc


def rss_kb(field: str = "VmRSS", pid: int | str = "self") -> int:
    """Resident memory of a process in KiB (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


consumer = _make_consumer("consumer")
CONSUMERS = [consumer] + [_make_consumer(f"consumer_{i}") for i in range(1, 8)]
consumer_1, consumer_2, consumer_3, consumer_4, consumer_5, consumer_6, consumer_7 = CONSUMERS[1:]


# ---------------------------------------------------------------------------------------- pinger

pinger = Service("pinger", sends=[Echo])


@pinger.task
async def ping(node: Any) -> None:
    p = _params()
    if p.get("role") != "pinger":
        return
    try:
        await node.wait_for({"consumer": 1}, timeout=60)
        body = b"x" * int(p.get("size", 100))
        send = node.send
        for _ in range(int(p.get("warmup", 500))):
            await send(Echo(body=body), timeout=10)
        if p.get("after"):  # start when the producer has begun (latency under load)
            deadline = time.monotonic() + 60
            while not os.path.exists(p["after"]) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        count = int(p["count"])
        stop = time.perf_counter() + float(p.get("seconds", 10.0))
        rtts = []
        perf_ns = time.perf_counter_ns
        cpu0 = time.process_time()
        for _ in range(count):
            t0 = perf_ns()
            result = await send(Echo(body=body), timeout=10)
            rtts.append(perf_ns() - t0)
            if result != body:
                raise RuntimeError("Echo returned something else than its body")
            if len(rtts) % 256 == 0 and time.perf_counter() > stop:
                break
        result = {"rtt_ns": rtts, "cpu_s": time.process_time() - cpu0}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    _write(p.get("out"), result)


# ---------------------------------------------------------------------------------------- state

class Count(msgspec.Struct):
    """A counter per key: the value a read-modify-write handler keeps."""

    n: int = 0


def _make_counter(name: str, stateful: bool) -> Service:
    """A consumer that counts ``Tick`` per key: in ``ctx.state`` (``counter_state``) or in a module
    dict (``counter_plain``), with the same read, the same new value and the same write."""
    svc = Service(name, state=[Count] if stateful else [])
    seen = {"handled": 0}
    plain: dict[str, Count] = {}

    if stateful:

        @svc.on(Tick)
        def count_in_state(ev: Tick, ctx: Any) -> None:
            state = ctx.state
            c = state.get(Count)
            state.put(Count(c.n + 1) if c is not None else Count(1))

    else:

        @svc.on(Tick)
        def count_in_dict(ev: Tick) -> None:
            c = plain.get(ev.k)
            plain[ev.k] = Count(c.n + 1) if c is not None else Count(1)

    @svc.task
    async def report(node: Any) -> None:
        rss_start = rss_kb()

        def answer(args: dict[str, Any]) -> dict[str, Any]:
            engine = node.engine
            tables = engine.dispatcher.state
            if tables is not None:
                decode = msgspec.msgpack.Decoder(Count).decode
                counts = [decode(v).n for per_type in tables.tables for t in per_type for v in t.values()]
            else:
                counts = [c.n for c in plain.values()]
            moves = engine.moves
            return {
                "handled": engine.dispatcher.stats.processed,
                "keys": len(counts),
                "counted": sum(counts),
                "state_bytes": tables.size() if tables is not None else 0,
                "rss_start_kb": rss_start,
                "rss_kb": rss_kb(),
                "transfers": moves.transfers.to_dict() if moves is not None else {},
                "store": engine.journal.stats() if engine.journal is not None else {},
                "moving": bool(moves is not None and moves.busy),
            }

        node.engine.register_rpc("bench", answer)

    return svc


counter_plain = _make_counter("counter_plain", stateful=False)
counter_state = _make_counter("counter_state", stateful=True)
