"""Micro-benchmarks of the delivery core: the compiled core beside its pure-Python twin.

Every operation is fed the way the runtime feeds it: events in batches of 256 (one batch body
per ZeroMQ message, one cumulative ack per batch). Each benchmark processes one batch per round;
pytest-benchmark's table shows the compiled and pure rows of an operation side by side, and the
module's teardown turns their medians into the figures of bench/results.json:

* ``core.<op>.speedup_vs_pure``: pure / compiled time per batch, same operation stream, same run;
* ``core.per_event.ratio_vs_raw_sendrecv``: the core's whole per-event cost (sender and receiver
  side, each crossing into the core once per batch) over one raw pyzmq PUSH/PULL send + recv of a
  100-byte frame, measured in the same run; ``core.per_event.one_call_ratio_vs_raw_sendrecv`` the
  same with one ``append()`` call per event on the sender;
* ``core.dedup.ns_per_op.<n>`` at 1k..1m live entries, ``core.dedup.flatness`` (max/min) and
  ``core.dedup.bytes_per_entry`` with a million live 16-byte ids; ``core.window.*`` the same for
  the window's in-flight count.

Timings are never asserted here (the machine is shared and noisy): they are reported.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import zmq

from bench.results import record
from choreo import _core, _pycore

B = 256  # envelopes per batch body, as the runtime batches them
PAYLOAD = b"x" * 100
TYPE = b"OrderPlaced"
Z = bytes(16)
IMPLS = {"compiled": _core, "pure": _pycore}
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}

# best round (seconds per batch of B events) of each benchmark, turned into figures at teardown.
# The best round, not the median: the machine is shared (other jobs, other tenants), and the best
# round is what the code costs when nothing else interferes; the pytest-benchmark table printed
# by the run shows the medians and spreads beside it.
MEDIANS: dict[str, float] = {}


def ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def bodies(core, n_batches: int, seed: int, first_seq: int = 1) -> list[bytes]:
    """Batch bodies of B envelopes each, consecutive seqs, random ids, 100-byte payloads."""
    out = []
    all_ids = ids(n_batches * B, seed)
    seq = first_seq
    for b in range(n_batches):
        parts = []
        for i in range(B):
            key = b"order-%d" % ((b * B + i) % 1000)
            parts.append(core.pack_envelope(seq, 1, 0, TYPE, key, (b * B + i) % 64, all_ids[b * B + i], Z, Z,
                                            PAYLOAD))
            seq += 1
        out.append(b"".join(parts))
    return out


def run(benchmark, key: str, step: Callable[[], object], rounds: int, warmup: int = 3) -> None:
    """Benchmark one round = one batch; keep the best round (the machine is shared: see the module doc)."""
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEDIANS[key] = benchmark.stats.stats.min


# -------------------------------------------------------------------------------------------------
# the three operation streams, compiled vs pure


class DedupStream:
    """insert_envelopes of each released batch into a window holding ``live`` ids (every insert evicts)."""

    def __init__(self, core, n_batches: int, live: int, seed: int = 1) -> None:
        self.d = core.DedupWindow(ttl=300.0, max_entries=live)
        prefill = ids(live, seed + 1000)
        for i in range(0, live, 65536):
            self.d.insert_many(prefill[i : i + 65536], 0.0, 0)
        self.batches = [core.parse_envelopes(b) for b in bodies(core, n_batches, seed)]
        self.i = 0
        self.now = 1.0

    def step(self) -> None:
        self.d.insert_envelopes(self.batches[self.i], self.now)
        self.i += 1
        self.now += 0.001


class WindowStream:
    """256 appends + flush + on_ack_frame of the cumulative ack for the batch."""

    def __init__(self, core, n_batches: int, in_flight: int = 0, seed: int = 2) -> None:
        self.w = core.OutboundWindow(max_messages=max(4096, in_flight + 2 * B), max_bytes=1 << 40)
        self.keys = [b"order-%d" % i for i in range(B)]
        self.ids = ids(B * n_batches, seed)
        mid = bytes(16)
        for start in range(0, in_flight, B):  # a standing backlog of unacknowledged envelopes
            for _ in range(min(B, in_flight - start)):
                self.w.append(1, 0, TYPE, b"k", 0, mid, Z, Z, PAYLOAD, 0.0)
            self.w.flush()
        first = self.w.next_seq
        self.acks = [core.encode_ack(first + B * (r + 1) - 1 - in_flight, first + B * (r + 1) - 1)
                     for r in range(n_batches)]
        self.r = 0

    def step(self) -> None:
        w, keys, ids_, base, now = self.w, self.keys, self.ids, self.r * B, self.r * 0.001
        append = w.append
        for i in range(B):
            append(1, 0, TYPE, keys[i], 3, ids_[base + i], Z, Z, PAYLOAD, now)
        w.flush()
        w.on_ack_frame(self.acks[self.r], 0, now)
        self.r += 1


class ReorderStream:
    """feed a 256-envelope batch body + complete_envelopes + ack_frame."""

    def __init__(self, core, n_batches: int, seed: int = 3) -> None:
        self.r = core.InboundReorder(window=4096)
        self.bodies = bodies(core, n_batches, seed)
        self.i = 0

    def step(self) -> None:
        r = self.r
        envs = r.feed(self.bodies[self.i])
        r.complete_envelopes(envs)
        r.ack_frame()
        self.i += 1


ROUNDS = {"compiled": 400, "pure": 60}


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_dedup_insert_envelopes(benchmark, impl: str) -> None:
    stream = DedupStream(IMPLS[impl], ROUNDS[impl] + 5, live=100_000)
    run(benchmark, f"dedup.{impl}", stream.step, ROUNDS[impl])
    assert stream.d.stats().duplicates == 0 and len(stream.d) == 100_000


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_window_append_flush_ack(benchmark, impl: str) -> None:
    stream = WindowStream(IMPLS[impl], ROUNDS[impl] + 5)
    run(benchmark, f"window.{impl}", stream.step, ROUNDS[impl])
    assert stream.w.in_flight == 0


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_reorder_feed_complete_ack(benchmark, impl: str) -> None:
    stream = ReorderStream(IMPLS[impl], ROUNDS[impl] + 5)
    run(benchmark, f"reorder.{impl}", stream.step, ROUNDS[impl])
    assert stream.r.done_upto == stream.r.released_upto == B * stream.i


# -------------------------------------------------------------------------------------------------
# the core's whole per-event cost vs one raw pyzmq send + recv


class PerEvent:
    """Sender pack+flush, receiver feed + dedup + .payload + complete + ack_frame, sender on_ack_frame.

    ``one_call``: the sender appends each envelope with its own append() call instead of packing
    the batch with one append_many(); the difference is what CPython's call costs per event.
    """

    def __init__(self, core, n_batches: int, seed: int = 4, one_call: bool = False) -> None:
        self.w = core.OutboundWindow(max_messages=4096)
        self.rx = core.InboundReorder(window=4096)
        self.d = core.DedupWindow(ttl=300.0, max_entries=100_000)
        self.keys = [b"order-%d" % i for i in range(B)]
        self.payloads = [PAYLOAD] * B
        all_ids = ids(B * n_batches, seed)
        self.ids = [all_ids[i : i + B] for i in range(0, len(all_ids), B)]  # one list per batch
        self.one_call = one_call
        self.r = 0
        self.delivered = 0

    def step(self) -> None:
        w, rx, now = self.w, self.rx, self.r * 0.001
        if self.one_call:
            append = w.append
            # the loop as lean as the raw baseline's: no slicing or index arithmetic charged to the core
            for key, msg_id in zip(self.keys, self.ids[self.r]):
                append(1, 0, TYPE, key, 3, msg_id, Z, Z, PAYLOAD, now)
        else:
            w.append_many(TYPE, self.keys, self.ids[self.r], self.payloads, now, partitions=3)
        envs = rx.feed(w.flush())
        fresh = self.d.insert_envelopes(envs, now)
        for env in envs:
            env.payload  # the handler reads it
        rx.complete_envelopes(envs)
        w.on_ack_frame(rx.ack_frame(), 0, now)
        self.delivered += fresh.count(True)  # not sum(): it takes the slow path for bools
        self.r += 1


RAW_CHUNK = 1000  # messages sent before they are received, so neither queue grows without bound


class RawSendRecv:
    """pyzmq PUSH -> PULL over tcp://127.0.0.1 in one process, one 100-byte frame per message."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.push = self.ctx.socket(zmq.PUSH)
        for s in (self.pull, self.push):
            s.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, 10 * RAW_CHUNK)
        self.push.setsockopt(zmq.SNDHWM, 10 * RAW_CHUNK)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.push.send(PAYLOAD)
        self.pull.recv()  # connected
        self.received = 0

    def step(self) -> None:
        send, recv, msg = self.push.send, self.pull.recv, PAYLOAD
        for _ in range(RAW_CHUNK):
            send(msg)
        for _ in range(RAW_CHUNK):
            recv()
        self.received += RAW_CHUNK

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()


def test_core_per_event_vs_raw_sendrecv(benchmark) -> None:
    """Alternate a raw chunk (1000 send + recv) and core batches, so all see the same machine."""
    passes = 80
    core_batches = 2
    streams = {name: PerEvent(_core, (passes + 2) * core_batches + 5, one_call=name == "one_call")
               for name in ("batch", "one_call")}
    raw = RawSendRecv()
    raw_times: list[float] = []
    core_times: dict[str, list[float]] = {name: [] for name in streams}

    def one_pass() -> None:
        t0 = time.perf_counter_ns()
        raw.step()
        raw_times.append((time.perf_counter_ns() - t0) / 1e9 / RAW_CHUNK)
        for name, stream in streams.items():
            for _ in range(core_batches):
                t0 = time.perf_counter_ns()
                stream.step()
                core_times[name].append((time.perf_counter_ns() - t0) / 1e9 / B)

    try:
        benchmark.pedantic(one_pass, rounds=passes, iterations=1, warmup_rounds=2)
    finally:
        raw.close()
    MEDIANS["raw.per_msg"] = min(raw_times)
    MEDIANS["per_event.compiled"] = min(core_times["batch"])
    MEDIANS["per_event.one_call"] = min(core_times["one_call"])
    for stream in streams.values():
        assert stream.delivered == B * stream.r  # every event went through, once
    assert raw.received == len(raw_times) * RAW_CHUNK  # every raw message came back (any round count)


# -------------------------------------------------------------------------------------------------
# flat cost per operation from 1k to 1m live entries; memory per entry
#
# The four sizes are measured in turns (a block of batches each per pass, the first batch of a
# block not counted), so whatever else runs on the machine weighs on every size alike.

BLOCK_STEPS = 4


def interleaved(benchmark, key: str, streams: dict[str, object], passes: int) -> None:
    samples: dict[str, list[float]] = {size: [] for size in streams}

    def one_pass() -> None:
        for size, stream in streams.items():
            for n in range(BLOCK_STEPS):
                t0 = time.perf_counter_ns()
                stream.step()
                if n:
                    samples[size].append((time.perf_counter_ns() - t0) / 1e9)

    benchmark.pedantic(one_pass, rounds=passes, iterations=1, warmup_rounds=1)
    for size, times in samples.items():
        MEDIANS[f"{key}.{size}"] = min(times)


def test_dedup_cost_by_live_entries(benchmark) -> None:
    passes = 60
    streams = {size: DedupStream(_core, (passes + 1) * BLOCK_STEPS + 2, live=n, seed=10 + i)
               for i, (size, n) in enumerate(SIZES.items())}
    big = streams["1m"].d
    record("core.dedup.bytes_per_entry", big.memory_bytes / len(big))
    record("core.dedup.memory_mb.1m", big.memory_bytes / 2**20)
    interleaved(benchmark, "dedup.live", streams, passes)
    for size, stream in streams.items():
        assert len(stream.d) == SIZES[size] and stream.d.stats().evicted >= B


def test_window_cost_by_in_flight(benchmark) -> None:
    passes = 30
    streams = {size: WindowStream(_core, (passes + 1) * BLOCK_STEPS + 2, in_flight=n)
               for size, n in SIZES.items()}
    interleaved(benchmark, "window.inflight", streams, passes)
    for size, stream in streams.items():
        assert abs(stream.w.in_flight - SIZES[size]) < B


# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def figures():
    """After the module ran: turn the medians into the named figures of bench/results.json."""
    yield
    m = MEDIANS
    for op in ("dedup", "window", "reorder"):
        if f"{op}.compiled" in m and f"{op}.pure" in m:
            record(f"core.{op}.speedup_vs_pure", m[f"{op}.pure"] / m[f"{op}.compiled"])
            record(f"core.{op}.compiled_ns_per_event", m[f"{op}.compiled"] / B * 1e9)
            record(f"core.{op}.pure_ns_per_event", m[f"{op}.pure"] / B * 1e9)
    if "raw.per_msg" in m and "per_event.compiled" in m:
        raw_ns = m["raw.per_msg"] * 1e9
        core_ns = m["per_event.compiled"] * 1e9
        record("raw.sendrecv_ns", raw_ns)
        record("core.per_event_ns", core_ns)
        record("core.per_event.ratio_vs_raw_sendrecv", core_ns / raw_ns)
    if "raw.per_msg" in m and "per_event.one_call" in m:
        one_call_ns = m["per_event.one_call"] * 1e9
        record("core.per_event.one_call_ns", one_call_ns)
        record("core.per_event.one_call_ratio_vs_raw_sendrecv", one_call_ns / (m["raw.per_msg"] * 1e9))
    for what, prefix in (("dedup", "dedup.live"), ("window", "window.inflight")):
        per_op = {size: m[f"{prefix}.{size}"] / B * 1e9 for size in SIZES if f"{prefix}.{size}" in m}
        for size, ns in per_op.items():
            record(f"core.{what}.ns_per_op.{size}", ns)
        if len(per_op) == len(SIZES):
            record(f"core.{what}.flatness", max(per_op.values()) / min(per_op.values()))
