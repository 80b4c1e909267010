"""The compiled core against its pure-Python twin, under arbitrary operation sequences.

Each state machine holds one object of each implementation and applies every operation to both:
return values (or the exception raised) and ``stats()`` must agree after every step. The
operations include what a hostile or broken network produces: acks out of order, duplicated,
stale or for sequence numbers never sent; frames dropped, duplicated, reordered or corrupted;
time jumping forward (and, for the dedup window, backward).

The end-to-end property at the bottom runs a sender window, a lossy link and a receiver
(InboundReorder + DedupWindow) and checks every message is processed exactly once, in order.

CI (``CI=true``) runs fewer examples to keep the suite within its time budget.
"""

from __future__ import annotations

import math
import os
import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from choreo import _core as C
from choreo import _pycore as P

CI = os.environ.get("CI") == "true"
MACHINE_SETTINGS = settings(
    max_examples=40 if CI else 150,
    stateful_step_count=40 if CI else 60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
Z = bytes(16)
U64 = (1 << 64) - 1


def outcome(fn, *args):
    """``("ok", value)`` or ``("raise", type name, reason)``, comparable across implementations."""
    try:
        return ("ok", normalise(fn(*args)))
    except (C.MalformedFrame, P.MalformedFrame) as exc:
        return ("raise", "MalformedFrame", exc.reason)
    except (ValueError, OverflowError, TypeError, KeyError) as exc:
        return ("raise", type(exc).__name__)


def normalise(value):
    if isinstance(value, (C.Envelope, P.Envelope)):
        return ("env", value.seq, value.kind, value.flags, value.partition, value.type, value.key, value.msg_id,
                value.trace_id, value.cause_id, value.payload, value.raw, value.size)
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(normalise(v) for v in value)
    return value


def same(c_fn, p_fn, *args):
    oc, op = outcome(c_fn, *args), outcome(p_fn, *args)
    assert oc == op, f"compiled {oc!r} != pure {op!r} for args {args!r}"
    return oc


def ident(i: int) -> bytes:
    return i.to_bytes(16, "little")


# -------------------------------------------------------------------------------------------------
# OutboundWindow


class WindowMachine(RuleBasedStateMachine):
    @initialize(
        max_messages=st.integers(1, 12),
        max_bytes=st.sampled_from([1, 100, 300, 1 << 20]),
        rto=st.sampled_from([0.1, 0.5, 1.0]),
        backoff=st.sampled_from([1.0, 2.0, 3.5]),
        first_seq=st.sampled_from([1, 2, 1000, (1 << 63)]),
    )
    def setup(self, max_messages, max_bytes, rto, backoff, first_seq):
        kw = dict(max_messages=max_messages, max_bytes=max_bytes, rto=rto, rto_max=rto * 4, backoff=backoff,
                  first_seq=first_seq)
        self.c, self.p = C.OutboundWindow(**kw), P.OutboundWindow(**kw)
        self.now = 0.0
        self.first = first_seq

    def seq_near(self, data):
        """A sequence number around what was sent: old, in flight, unsent, or far away."""
        ns = self.c.next_seq
        return data.draw(st.one_of(
            st.integers(max(0, self.first - 2), ns + 2),
            st.sampled_from([0, U64, ns + 1000]),
        ))

    @rule(payload=st.binary(max_size=120), key=st.binary(max_size=4), kind=st.integers(0, 16),
          partition=st.integers(0, 3), dt=st.sampled_from([0.0, 0.01, 0.3]))
    def append(self, payload, key, kind, partition, dt):
        self.now += dt
        mid = os.urandom(16)
        args = (kind, 0, b"Evt", key, partition, mid, Z, Z, payload, self.now)
        same(self.c.append, self.p.append, *args)

    @rule(payloads=st.lists(st.binary(max_size=60), max_size=8), keyed=st.booleans(), each_partition=st.booleans(),
          traced=st.booleans(), caused=st.booleans(), kind=st.integers(0, 3),
          bad=st.sampled_from([None, None, None, "id", "key", "partition", "count"]), data=st.data())
    def append_many(self, payloads, keyed, each_partition, traced, caused, kind, bad, data):
        """A whole batch in one call: the same seqs, bytes and credit as one append() each would give."""
        n = len(payloads)
        keys = [b"k%d" % i for i in range(n)] if keyed else None
        ids = [os.urandom(16) for _ in range(n)]
        partitions = [data.draw(st.integers(0, 3)) for _ in range(n)] if each_partition else 2
        if bad and n:
            i = data.draw(st.integers(0, n - 1))
            if bad == "id":
                ids[i] = ids[i][:15]
            elif bad == "key" and keys is not None:
                keys[i] = None
            elif bad == "partition" and each_partition:
                partitions[i] = 70000
            elif bad == "count":
                ids.pop()
        kw = dict(kind=kind, partitions=partitions, trace_ids=ids[::-1] if traced else None,
                  cause_ids=[Z] * len(ids) if caused else None)
        same(lambda: self.c.append_many(b"Evt", keys, ids, payloads, self.now, **kw),
             lambda: self.p.append_many(b"Evt", keys, ids, payloads, self.now, **kw))

    @rule(payload=st.binary(max_size=40), seq=st.integers(0, 50), garbage=st.booleans())
    def append_raw(self, payload, seq, garbage):
        raw = P.pack_envelope(seq, 2, 1, b"Fwd", b"k", 1, ident(seq), Z, Z, payload)
        if garbage:
            raw = raw + raw[:10]
        same(self.c.append_raw, self.p.append_raw, raw, self.now)

    @rule()
    def flush(self):
        same(self.c.flush, self.p.flush)

    @rule(data=st.data())
    def ack(self, data):
        cum = self.seq_near(data)
        rec = max(cum, self.seq_near(data)) if data.draw(st.booleans()) else self.seq_near(data)
        n = data.draw(st.integers(0, 3))
        ranges = []
        for _ in range(n):
            lo = self.seq_near(data)
            hi = data.draw(st.sampled_from([lo, lo + 1, lo + 3, max(0, lo - 1)]))
            ranges.append((lo, min(hi, U64)))
        same(self.c.on_ack, self.p.on_ack, cum, rec, ranges, self.now)

    @rule(data=st.data(), corrupt=st.sampled_from(["none", "cut", "extra", "count", "reverse"]))
    def ack_frame(self, data, corrupt):
        cum = self.seq_near(data)
        hi = self.seq_near(data)
        lo = min(cum + 2, U64)
        ranges = [(lo, max(lo, hi))] if data.draw(st.booleans()) else []
        frame = bytearray(P.encode_ack(cum, max(cum, hi), ranges))
        if corrupt == "cut":
            frame = frame[:-1]
        elif corrupt == "extra":
            frame += b"\x00"
        elif corrupt == "count":
            frame[16] = 40
        elif corrupt == "reverse" and ranges:
            frame[18:26], frame[26:34] = frame[26:34], frame[18:26]
            if ranges[0][0] == ranges[0][1]:
                frame[18:26] = min(ranges[0][0] + 1, U64).to_bytes(8, "little")
        same(self.c.on_ack_frame, self.p.on_ack_frame, bytes(frame), 0, self.now)

    @rule(dt=st.sampled_from([0.05, 0.5, 2.0, 10.0, 1000.0]))
    def due(self, dt):
        self.now += dt
        same(self.c.due, self.p.due, self.now)

    @rule(data=st.data())
    def take(self, data):
        same(self.c.take, self.p.take, self.seq_near(data))

    @rule(nbytes=st.integers(0, 400))
    def has_credit(self, nbytes):
        same(self.c.has_credit, self.p.has_credit, nbytes)

    @rule()
    def unacked(self):
        same(self.c.unacked, self.p.unacked)

    @invariant()
    def agree(self):
        if not hasattr(self, "c"):
            return
        assert self.c.stats() == self.p.stats()
        assert (self.c.pending, self.c.in_flight, self.c.in_flight_bytes) == (
            self.p.pending, self.p.in_flight, self.p.in_flight_bytes)
        assert self.c.next_deadline() == self.p.next_deadline()
        s = self.c.stats()
        assert 0 <= s.in_flight <= s.window and s.peak_in_flight <= s.window


# -------------------------------------------------------------------------------------------------
# InboundReorder


class ReorderMachine(RuleBasedStateMachine):
    @initialize(window=st.integers(1, 10), first_seq=st.sampled_from([1, 5, 1 << 40]))
    def setup(self, window, first_seq):
        self.c, self.p = C.InboundReorder(window=window, first_seq=first_seq), P.InboundReorder(window, first_seq)
        self.first = first_seq

    def seq_near(self, data):
        base = self.c.done_upto
        return data.draw(st.one_of(st.integers(max(0, base - 2), base + self.c.window + 2),
                                   st.integers(max(0, self.first - 2), self.first + 30)))

    @rule(data=st.data())
    def accept(self, data):
        seq = self.seq_near(data)
        same(self.c.accept, self.p.accept, seq, ("item", seq))

    @rule()
    def release(self):
        same(self.c.release, self.p.release)

    @rule(data=st.data(), n=st.integers(0, 6), split=st.booleans(), corrupt=st.booleans(), prefix=st.integers(0, 3))
    def feed(self, data, n, split, corrupt, prefix):
        seqs = [self.seq_near(data) for _ in range(n)]
        body = b"".join(P.pack_envelope(s, 1, 0, b"E", b"k", 0, ident(s), Z, Z, b"p%d" % s) for s in seqs)
        if corrupt and body:
            body = body[:-1]
        if split and not corrupt:
            calls = [(e.raw, 0) for e in P.parse_envelopes(body)]  # one envelope at a time
        else:
            calls = [(b"\xee" * prefix + body, prefix)]  # the whole batch, after a header
        for args in calls:
            same(self.c.feed, self.p.feed, *args)

    @rule(data=st.data())
    def complete(self, data):
        same(self.c.complete, self.p.complete, self.seq_near(data))

    @rule(data=st.data())
    def complete_many(self, data):
        seqs = data.draw(st.lists(st.integers(0, self.c.released_upto + 2), max_size=5))
        same(self.c.complete_many, self.p.complete_many, seqs)

    @rule(data=st.data())
    def complete_some_released(self, data):
        """Complete a random subset of what is in progress: gaps make selective-ack ranges."""
        in_progress = list(range(self.c.done_upto + 1, self.c.released_upto + 1))
        seqs = data.draw(st.lists(st.sampled_from(in_progress), unique=True)) if in_progress else []
        same(self.c.complete_many, self.p.complete_many, seqs)

    @rule(step=st.integers(2, 3))
    def complete_leaving_gaps(self, step):
        """Complete every other (or third) in-progress seq, but not the oldest: ranges above cumulative."""
        seqs = list(range(self.c.done_upto + 2, self.c.released_upto + 1, step))
        same(self.c.complete_many, self.p.complete_many, seqs)

    @rule()
    def complete_all_released(self):
        seqs = list(range(self.c.done_upto + 1, self.c.released_upto + 1))
        random.Random(len(seqs)).shuffle(seqs)
        same(self.c.complete_many, self.p.complete_many, seqs)

    @rule()
    def ack(self):
        same(self.c.ack, self.p.ack)

    @rule()
    def ack_frame(self):
        assert self.c.ack_pending == self.p.ack_pending
        frame = same(self.c.ack_frame, self.p.ack_frame)[1]
        assert P.decode_ack(frame) == self.p.ack()

    @invariant()
    def agree(self):
        if not hasattr(self, "c"):
            return
        assert self.c.stats() == self.p.stats()
        assert (self.c.buffered, self.c.in_progress, self.c.ack_pending) == (
            self.p.buffered, self.p.in_progress, self.p.ack_pending)
        assert self.c.ack() == self.p.ack()
        s = self.c.stats()
        assert s.done_upto <= s.released_upto and s.buffered <= s.window
        assert s.released_upto - s.done_upto <= s.window


# -------------------------------------------------------------------------------------------------
# DedupWindow


class DedupMachine(RuleBasedStateMachine):
    @initialize(ttl=st.sampled_from([0.1, 1.0, 7.5]), max_entries=st.integers(1, 12),
                seq_limit=st.sampled_from([None, None, 33, 40]))
    def setup(self, ttl, max_entries, seq_limit):
        self.c, self.p = C.DedupWindow(ttl, max_entries), P.DedupWindow(ttl, max_entries)
        if seq_limit is not None:
            self.c._set_seq_limit(seq_limit)  # renumber every few dozen inserts, as after 2**32
        self.now = 0.0
        self.ttl = ttl
        self.inserted_at: list[float] = [0.0]
        self.exports: list[bytes] = []

    ids = st.one_of(st.integers(0, 20).map(ident), st.binary(max_size=20))

    @rule(dt=st.sampled_from([0.0, 0.0, 0.05, 0.1, 0.7, 3.0, 8.0, -0.5, -5.0]))
    def tick(self, dt):
        self.now += dt

    @rule(data=st.data(), nudge=st.sampled_from([0, 0, -1, 1]))
    def tick_to_a_boundary(self, data, nudge):
        """Jump exactly to when an entry expires (t + ttl), or one float step either side."""
        t = data.draw(st.sampled_from(self.inserted_at))
        end = t + self.ttl
        self.now = end if nudge == 0 else math.nextafter(end, math.inf * nudge)

    @rule(i=ids, partition=st.sampled_from([0, 1, 2, 65535, 65536, -1]))
    def insert(self, i, partition):
        same(self.c.insert, self.p.insert, i, self.now, partition)
        self.inserted_at.append(self.now)

    @rule(ids_=st.lists(ids, max_size=6), partition=st.integers(0, 2))
    def insert_many(self, ids_, partition):
        same(self.c.insert_many, self.p.insert_many, ids_, self.now, partition)

    @rule(keys=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2)), max_size=40))
    def insert_envelopes(self, keys):
        body = b"".join(P.pack_envelope(n + 1, 1, 0, b"E", b"", part, ident(i), Z, Z, b"")
                        for n, (i, part) in enumerate(keys))
        c = self.c.insert_envelopes(C.parse_envelopes(body), self.now)
        p = self.p.insert_envelopes(P.parse_envelopes(body), self.now)
        assert c == p

    @rule(i=ids)
    def contains(self, i):
        same(self.c.contains, self.p.contains, i, self.now)

    @rule(i=ids)
    def remove(self, i):
        same(self.c.remove, self.p.remove, i)

    @rule()
    def expire(self):
        same(self.c.expire, self.p.expire, self.now)

    @rule(partition=st.integers(0, 2))
    def export(self, partition):
        blob = same(self.c.export_partition, self.p.export_partition, partition)[1]
        self.exports.append(blob)

    @precondition(lambda self: self.exports)
    @rule(data=st.data(), partition=st.integers(0, 3), cut=st.booleans())
    def import_(self, data, partition, cut):
        blob = data.draw(st.sampled_from(self.exports))
        if cut:
            blob = blob[:-1]
        same(self.c.import_entries, self.p.import_entries, blob, partition)

    @rule(partition=st.integers(0, 3))
    def drop(self, partition):
        same(self.c.drop_partition, self.p.drop_partition, partition)

    @invariant()
    def agree(self):
        if not hasattr(self, "c"):
            return
        assert self.c.stats() == self.p.stats()
        assert len(self.c) == len(self.p) <= self.c.max_entries
        self.c._audit()  # the compiled table agrees with its ring (stale slots counted)
        for part in (0, 1, 2, 3):
            assert self.c.export_partition(part) == self.p.export_partition(part)


# -------------------------------------------------------------------------------------------------
# KeyedDispatch


class DispatchMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.c, self.p = C.KeyedDispatch(), P.KeyedDispatch()
        self.n = 0

    keys = st.sampled_from([b"a", b"b", b"c"])

    @rule(key=keys, none=st.booleans())
    def admit(self, key, none):
        self.n += 1
        same(self.c.admit, self.p.admit, key, None if none and self.n % 5 == 0 else self.n)

    @rule(key=keys)
    def done(self, key):
        same(self.c.done, self.p.done, key)

    @rule(ks=st.lists(keys, max_size=3))
    def drain(self, ks):
        same(self.c.drain_keys, self.p.drain_keys, ks)

    @invariant()
    def agree(self):
        assert (self.c.queued, self.c.busy_keys) == (self.p.queued, self.p.busy_keys)
        for k in (b"a", b"b", b"c"):
            assert self.c.busy(k) == self.p.busy(k)


# -------------------------------------------------------------------------------------------------
# EmitLane: emit and emit_many with the runtime's bookkeeping (dirty set, full batches, ids)


class _LaneEv(msgspec.Struct):
    k: str
    n: int


class _OtherEv(msgspec.Struct):
    n: int


_lane_encode = msgspec.msgpack.Encoder().encode
_lane_check = msgspec.msgpack.Decoder(_LaneEv).decode


def _lane_key_bytes(value):
    return str(value).encode()


class EmitLaneMachine(RuleBasedStateMachine):
    """Both cores' emit lanes over windows of their own core: the same ids, statuses, dirty sets,
    batches sent when full, and bytes on the wire, whatever mix of emits, batches, flushes and acks."""

    @initialize(keyed=st.booleans(), n_windows=st.integers(1, 3), max_messages=st.integers(1, 10),
                max_batch=st.integers(1, 6), idem=st.booleans(), fields=st.booleans())
    def setup(self, keyed, n_windows, max_messages, max_batch, idem, fields):
        self.sides = {}
        for name, core in (("c", C), ("p", P)):
            windows = [core.OutboundWindow(max_messages=max_messages) for _ in range(n_windows if not keyed else 3)]
            side = {"windows": windows, "dirty": {}, "sent": [], "scheduled": [0]}
            channels = [f"ch{i}" for i in range(len(windows))]

            def send_full(ch, side=side, windows=windows):
                side["sent"].append((ch, windows[int(ch[2:])].flush()))

            def schedule(side=side):
                side["scheduled"][0] += 1

            side["lane"] = core.EmitLane(
                b"Ev", "k" if keyed else None, 3 if keyed else 1, windows, _lane_encode, _lane_key_bytes,
                core.IdSource(b"\x07" * 8), max_batch, 1 << 20, 200, _lane_check, channels=channels,
                dirty=side["dirty"], schedule=schedule, send_full=send_full, clock=lambda: 1.0, cls=_LaneEv,
                idempotency=(lambda ev: ev.n.to_bytes(16, "little")) if idem else None,
                fields=(("k", (str,)), ("n", (int,))) if fields else None,
            )
            self.sides[name] = side
        self.n = 0

    def events(self, data, size):
        out = []
        for _ in range(size):
            kind = data.draw(st.sampled_from(["ok", "ok", "ok", "other", "bad", "big"]))
            self.n += 1
            if kind == "other":
                out.append(_OtherEv(self.n))
            elif kind == "bad":
                out.append(_LaneEv(k="x", n="not an int"))  # type: ignore[arg-type]
            elif kind == "big":
                out.append(_LaneEv(k="y" * 300, n=self.n))  # above max_bytes
            else:
                out.append(_LaneEv(k=data.draw(st.sampled_from(["a", "b", "c", "d"])), n=self.n))
        return out

    @rule(data=st.data())
    def emit(self, data):
        (ev,) = self.events(data, 1)
        if type(ev) is not _LaneEv:
            return
        c, p = self.sides["c"]["lane"], self.sides["p"]["lane"]
        same(c.emit, p.emit, ev)
        assert (c.last, c.full, c.emitted) == (p.last, p.full, p.emitted)

    @rule(data=st.data(), size=st.integers(0, 8), start=st.integers(0, 2))
    def emit_many(self, data, size, start):
        evs = self.events(data, size)
        ids = {"c": [], "p": []}
        same(lambda: self.sides["c"]["lane"].emit_many(evs, min(start, len(evs)), ids["c"]),
             lambda: self.sides["p"]["lane"].emit_many(evs, min(start, len(evs)), ids["p"]))
        assert ids["c"] == ids["p"]

    @rule(i=st.integers(0, 2))
    def flush(self, i):
        for side in self.sides.values():
            if i < len(side["windows"]):
                side["dirty"].pop(f"ch{i}", None)
                side["sent"].append((f"ch{i}", side["windows"][i].flush()))

    @rule(i=st.integers(0, 2))
    def ack_all(self, i):
        for side in self.sides.values():
            if i < len(side["windows"]):
                w = side["windows"][i]
                w.on_ack(w.next_seq - 1, w.next_seq - 1, [], 2.0)

    @rule(i=st.integers(0, 2), held=st.booleans())
    def hold(self, i, held):
        for side in self.sides.values():
            if i < len(side["windows"]):
                side["windows"][i].held = held

    @invariant()
    def agree(self):
        if not hasattr(self, "sides"):
            return
        c, p = self.sides["c"], self.sides["p"]
        assert c["sent"] == p["sent"] and list(c["dirty"]) == list(p["dirty"]) and c["scheduled"] == p["scheduled"]
        assert [w.stats() for w in c["windows"]] == [w.stats() for w in p["windows"]]
        for side in (c, p):  # a window with pending envelopes is always in the dirty set
            for i, w in enumerate(side["windows"]):
                assert not w.pending or f"ch{i}" in side["dirty"]


# -------------------------------------------------------------------------------------------------
# FastLane: handlers per message and per batch, duplicates, bad bodies, failures, busy keys


@settings(max_examples=40 if CI else 150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(
        st.tuples(st.sampled_from(["Ev", "Ev", "Ev", "Bt", "Bt", "Other"]), st.sampled_from([b"a", b"b", b"busy", b""]),
                  st.integers(0, 12), st.sampled_from(["ok", "ok", "ok", "bad", "boom"])),
        max_size=30,
    ),
    gate_closed=st.sets(st.integers(0, 3), max_size=2),
    ring=st.booleans(),
)
def test_both_fast_lanes_run_the_same_way(items, gate_closed, ring):
    """Compiled and pure lanes stop at the same places with the same results, call the handlers
    with the same messages (batch handlers with the same runs), and complete the same seqs."""
    outcomes = []
    for core in (C, P):
        w = core.OutboundWindow(max_messages=64)
        for i, (tname, key, id_n, body) in enumerate(items):
            payload = b"\xc1" if body == "bad" else _lane_encode(_LaneEv(k=body, n=i))
            flags = 0 if key else core.FLAG_UNKEYED
            w.append(1, flags, tname.encode(), key, core.partition_of(key, 4), ident(id_n), ident(id_n), Z, payload, 0.0)
        reorder = core.InboundReorder(window=64)
        envs = reorder.feed(w.flush() or b"") if items else []
        calls = []

        def one(ev):
            calls.append(("one", ev.n))
            if ev.k == "boom":
                raise RuntimeError("boom")

        def many(evs):
            calls.append(("many", [e.n for e in evs]))
            if any(e.k == "boom" for e in evs):
                raise RuntimeError("boom")

        decode = msgspec.msgpack.Decoder(_LaneEv).decode
        lane = core.FastLane()
        lane.set("Ev", decode, core.DedupWindow(60.0, 100), one, "one", False)
        lane.set("Bt", decode, core.DedupWindow(60.0, 100), many, "many", False, None, True)
        keyed = core.KeyedDispatch()
        keyed.admit(b"busy", "someone")
        gate = bytearray(0 if p in gate_closed else 1 for p in range(4))
        spans = core.SpanRing(64) if ring else []
        clock = iter(range(10_000)).__next__
        stops, i = [], 0
        while True:
            handled, i, status, a, b, started = lane.run(envs, i, reorder, 5.0, clock, 1.5, gate, keyed,
                                                         spans if ring else spans.append, None)
            msgs = [m.n for m in a] if status == core.LANE_BATCH_FAILED else (a.n if a is not None else None)
            stops.append((handled, i, status, msgs, type(b).__name__ if b is not None else None, started))
            if status == core.LANE_END:
                break
            i += len(a) if status == core.LANE_BATCH_FAILED else 1
        outcomes.append((stops, calls, list(spans), reorder.stats()))
    assert outcomes[0] == outcomes[1]


# -------------------------------------------------------------------------------------------------
# SpanRing: appended tuples and lane records, read like a deque, the same in both cores


class SpanRingMachine(RuleBasedStateMachine):
    @initialize(maxlen=st.integers(1, 6))
    def setup(self, maxlen):
        self.c, self.p = C.SpanRing(maxlen), P.SpanRing(maxlen)
        self.n = 0

    @rule(data=st.data())
    def append(self, data):
        self.n += 1
        span = data.draw(st.sampled_from([(self.n,), (b"x" * 48, "T", "h", 1.0, 2.0, 3.0, "error", "boom", 2, b"k", 3)]))
        same(self.c.append, self.p.append, span)

    @rule(key=st.binary(max_size=200), partition=st.integers(0, 3), t=st.sampled_from([0, 1.5, 2.25]))
    def record(self, key, partition, t):
        self.n += 1
        raw = P.pack_envelope(self.n, 1, 0, b"Evt", key, partition, ident(self.n), ident(self.n + 1000), Z, b"body")
        for ring, core in ((self.c, C), (self.p, P)):
            ring.record(core.Envelope(raw), "Evt", "handler", t, t + 1, t + 2)

    @rule(data=st.data())
    def index(self, data):
        i = data.draw(st.integers(-8, 8))
        if -len(self.c) <= i < len(self.c):
            assert self.c[i] == self.p[i]
            assert self.c[i] is self.c[i], "a span read twice is the same object"
        else:
            for ring in (self.c, self.p):
                with pytest.raises(IndexError):
                    ring[i]

    @rule()
    def clear(self):
        same(self.c.clear, self.p.clear)

    @invariant()
    def agree(self):
        if not hasattr(self, "c"):
            return
        assert (len(self.c), self.c.total, self.c.maxlen) == (len(self.p), self.p.total, self.p.maxlen)
        assert list(self.c) == list(self.p) and list(reversed(self.c)) == list(reversed(self.p))


TestWindow = WindowMachine.TestCase
TestWindow.settings = MACHINE_SETTINGS
TestReorder = ReorderMachine.TestCase
TestReorder.settings = MACHINE_SETTINGS
TestDedup = DedupMachine.TestCase
TestDedup.settings = MACHINE_SETTINGS
TestDispatch = DispatchMachine.TestCase
TestDispatch.settings = settings(MACHINE_SETTINGS, max_examples=30 if CI else 80)
TestEmitLane = EmitLaneMachine.TestCase
TestEmitLane.settings = MACHINE_SETTINGS
TestSpanRing = SpanRingMachine.TestCase
TestSpanRing.settings = MACHINE_SETTINGS


# -------------------------------------------------------------------------------------------------
# End to end: window -> lossy link -> reorder -> dedup, exactly once and in order


def run_channel(core, seed: int, n_messages: int, loss: float, dup: float, reorder: float, resend: float,
                window: int, batch: int, max_steps: int = 50_000):
    """Simulate one channel; returns (processed msg ids, the ids the producer emitted, stats)."""
    rng = random.Random(seed)
    sender = core.OutboundWindow(max_messages=window, rto=0.05, rto_max=0.4, backoff=2.0)
    receiver = core.InboundReorder(window=window)
    dedup = core.DedupWindow(ttl=1e6, max_entries=10 * n_messages + 10)
    to_receiver: list[tuple[float, bytes]] = []  # (arrival time, frame)
    to_sender: list[tuple[float, bytes]] = []
    emitted: list[bytes] = []  # unique ids in the order the producer first emitted them
    processed: list[bytes] = []
    next_msg = 0
    now = 0.0

    def send(link, frame):
        if rng.random() < loss:
            return
        copies = 2 if rng.random() < dup else 1
        for _ in range(copies):
            delay = rng.uniform(0.001, 0.2) if rng.random() < reorder else 0.01
            link.append((now + delay, frame))

    steps = 0
    while steps < max_steps:
        steps += 1
        # advance to the next thing that can happen: an arrival, a retransmission, or (with credit
        # and messages left) the producer's next batch a moment later
        producer_ready = next_msg < n_messages and sender.has_credit(200)
        events = [t for t, _ in to_receiver] + [t for t, _ in to_sender] + [sender.next_deadline()]
        now = max(now + 0.001, min(events)) if not producer_ready else now + 0.001
        if now == float("inf"):
            break  # nothing can ever happen again: the assertions below say what is missing
        # producer: append while there is credit; sometimes re-emit an earlier id (a client retry)
        appended = 0
        while sender.has_credit(200) and appended < batch and (next_msg < n_messages or not emitted):
            if emitted and rng.random() < resend:
                mid = rng.choice(emitted)
            else:
                if next_msg >= n_messages:
                    break
                mid = ident(next_msg + 1)
                emitted.append(mid)
                next_msg += 1
            sender.append(1, 0, b"Evt", b"key", 0, mid, Z, Z, mid, now)
            appended += 1
        body = sender.flush()
        if body is not None:
            send(to_receiver, body)
        again = sender.due(now)
        if again is not None:
            send(to_receiver, again)
        # receiver: frames that have arrived, in arrival order
        arrived = sorted((f for f in to_receiver if f[0] <= now), key=lambda f: f[0])
        to_receiver[:] = [f for f in to_receiver if f[0] > now]
        for _, frame in arrived:
            released = receiver.feed(frame)
            fresh = dedup.insert_envelopes(released, now)
            for env, new in zip(released, fresh):
                if new:
                    assert env.payload == env.msg_id
                    processed.append(env.msg_id)
            receiver.complete_envelopes(released)
        if receiver.ack_pending:
            send(to_sender, receiver.ack_frame())
        acks = sorted((f for f in to_sender if f[0] <= now), key=lambda f: f[0])
        to_sender[:] = [f for f in to_sender if f[0] > now]
        for _, frame in acks:
            sender.on_ack_frame(frame, 0, now)
        if next_msg >= n_messages and sender.in_flight == 0 and sender.pending == 0:
            break
    return processed, emitted, sender.stats(), receiver.stats(), steps


e2e_params = dict(
    seed=st.integers(0, 2**32 - 1),
    n_messages=st.integers(1, 120),
    loss=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    dup=st.sampled_from([0.0, 0.2, 0.5]),
    reorder=st.sampled_from([0.0, 0.3, 1.0]),
    resend=st.sampled_from([0.0, 0.1]),
    window=st.sampled_from([1, 4, 32]),
    batch=st.sampled_from([1, 8, 256]),
)


@pytest.mark.parametrize("core", [C, P], ids=["compiled", "pure"])
@settings(max_examples=25 if CI else 100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**e2e_params)
def test_exactly_once_in_order_through_a_lossy_link(core, seed, n_messages, loss, dup, reorder, resend, window,
                                                    batch):
    processed, emitted, sstats, rstats, steps = run_channel(core, seed, n_messages, loss, dup, reorder, resend,
                                                            window, batch)
    where = (f"seed={seed} n={n_messages} loss={loss} dup={dup} reorder={reorder} resend={resend} "
             f"window={window} batch={batch}: {steps} steps, sender {sstats}, receiver {rstats}")
    assert len(emitted) == n_messages, f"producer did not finish: {where}"
    assert sstats.in_flight == 0, f"not all acknowledged: {where}"
    assert processed == emitted, (
        f"expected {n_messages} messages once each in order, got {len(processed)} "
        f"({len(set(processed))} distinct); {where}")
    assert sstats.acked == sstats.sent, where


def test_the_end_to_end_check_catches_a_broken_receiver():
    """The property above must be able to fail: without dedup, client retries are processed twice."""

    class NoDedup(P.DedupWindow):
        def insert_envelopes(self, envelopes, now):
            return [True for _ in envelopes]

    class Broken:
        OutboundWindow = P.OutboundWindow
        InboundReorder = P.InboundReorder
        DedupWindow = NoDedup

    processed, emitted, *_ = run_channel(Broken, 1, 60, 0.2, 0.2, 0.5, 0.3, 8, 8)
    assert processed != emitted and len(processed) > len(emitted)
