"""OutboundWindow edge cases: credit, acks (unknown, duplicate, stale), retransmission, against both cores."""

from __future__ import annotations

import sys

import pytest

from choreo import _core, _pycore

Z = bytes(16)


@pytest.fixture(params=[_core, _pycore], ids=["compiled", "pure"])
def core(request):
    return request.param


def add(w, payload: bytes = b"x", now: float = 0.0, key: bytes = b"") -> int:
    return w.append(1, 0, b"T", key, 0, Z, Z, Z, payload, now)


ENV = 68 + 1  # header + type b"T", empty key: the size of add()'s envelope without payload


def test_sequence_numbers_and_flush(core) -> None:
    w = core.OutboundWindow(max_messages=10)
    assert w.flush() is None
    assert [add(w, b"%d" % i) for i in range(3)] == [1, 2, 3]
    assert w.pending == 3 and w.in_flight == 3
    body = w.flush()
    assert [e.seq for e in core.parse_envelopes(body)] == [1, 2, 3]
    assert [e.payload for e in core.parse_envelopes(body)] == [b"0", b"1", b"2"]
    assert w.pending == 0 and w.flush() is None
    assert core.OutboundWindow(first_seq=100).append(1, 0, b"T", b"", 0, Z, Z, Z, b"", 0.0) == 100


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_messages=0), "window must be >= 1, got 0"),
        (dict(max_bytes=0), "max_bytes must be >= 1"),
        (dict(rto=0.0), "need 0 < rto <= rto_max"),
        (dict(rto=6.0, rto_max=5.0), "need 0 < rto <= rto_max"),
        (dict(backoff=0.5), "backoff must be >= 1.0"),
        (dict(first_seq=0), "first_seq must be >= 1"),
    ],
)
def test_constructor_errors(core, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        core.OutboundWindow(**kwargs)


def test_window_of_one(core) -> None:
    w = core.OutboundWindow(max_messages=1, rto=1.0)
    assert w.has_credit()
    assert add(w) == 1
    assert not w.has_credit()
    with pytest.raises(OverflowError, match=r"window full: 1/1 sequence numbers"):
        add(w)
    assert w.next_seq == 2 and w.stats().sent == 1  # the refused append left no trace
    w.flush()
    assert w.on_ack(0, 0, [], 0.1) == 0 and not w.has_credit()
    assert w.on_ack(1, 1, [], 0.2) == 1
    assert w.has_credit() and w.in_flight == 0
    assert add(w) == 2


def test_credit_is_a_span_from_the_oldest_unfinished(core) -> None:
    w = core.OutboundWindow(max_messages=4)
    for _ in range(4):
        add(w)
    w.flush()
    # 2..4 acked selectively: 1 still holds the span, so no credit although 3 are free
    assert w.on_ack(0, 4, [(2, 4)], 0.0) == 3
    assert w.in_flight == 1 and not w.has_credit()
    assert w.on_ack(1, 4, [], 0.0) == 1
    assert w.has_credit() and w.in_flight == 0


def test_credit_by_bytes(core) -> None:
    w = core.OutboundWindow(max_messages=100, max_bytes=3 * (ENV + 10))
    for _ in range(3):
        add(w, b"p" * 10)
    assert w.in_flight_bytes == 3 * (ENV + 10)
    assert not w.has_credit(1) and w.has_credit(0)
    with pytest.raises(OverflowError, match="bytes in flight"):
        add(w, b"p")
    w.flush()
    w.on_ack(1, 1, [], 0.0)
    assert w.in_flight_bytes == 2 * (ENV + 10) and w.has_credit(ENV + 10) and not w.has_credit(ENV + 11)


def test_one_large_envelope_allowed_when_nothing_in_flight(core) -> None:
    w = core.OutboundWindow(max_messages=100, max_bytes=100)
    big = b"B" * 1000
    assert w.has_credit(ENV + 1000)
    assert add(w, big) == 1  # larger than max_bytes, but nothing else is in flight
    assert not w.has_credit(1)
    with pytest.raises(OverflowError):
        add(w, b"")
    w.flush()
    w.on_ack(1, 1, [], 0.0)
    assert add(w, big) == 2


def test_ack_of_unknown_sequence_is_counted_and_ignored(core) -> None:
    w = core.OutboundWindow(max_messages=8)
    for _ in range(3):
        add(w)
    w.flush()
    assert w.on_ack(0, 0, [(7, 9)], 0.0) == 0  # never sent
    assert w.stats().bogus_acks == 1 and w.in_flight == 3
    # a cumulative ack beyond what was sent finishes what was sent, and is counted
    assert w.on_ack(99, 99, [], 0.0) == 3
    assert w.stats().bogus_acks == 2 and w.in_flight == 0
    # the next sequence numbers are not pre-acknowledged by that bogus ack
    s = add(w)
    w.flush()
    assert s == 4 and w.in_flight == 1
    assert w.due(100.0) is not None


def test_duplicate_and_stale_acks_are_harmless(core) -> None:
    w = core.OutboundWindow(max_messages=8)
    for _ in range(5):
        add(w)
    w.flush()
    assert w.on_ack(3, 3, [], 0.0) == 3
    assert w.on_ack(3, 3, [], 0.0) == 0  # duplicate
    assert w.on_ack(1, 1, [], 0.0) == 0  # stale
    assert w.on_ack(0, 5, [(1, 2)], 0.0) == 0  # stale ranges
    s = w.stats()
    assert (s.acked, s.in_flight, s.bogus_acks) == (3, 2, 0)
    assert w.on_ack(5, 5, [], 0.0) == 2 and w.stats().acked == 5


def test_selective_ranges_and_ack_frame(core) -> None:
    w = core.OutboundWindow(max_messages=16)
    for _ in range(10):
        add(w)
    w.flush()
    assert w.on_ack_frame(b"xx" + core.encode_ack(2, 10, [(4, 5), (8, 8)]), 2, 0.0) == 5
    assert w.in_flight == 5
    assert sorted(e.seq for e in core.parse_envelopes(b"".join(w.unacked()))) == [3, 6, 7, 9, 10]


def test_ack_values_are_u64(core) -> None:
    w = core.OutboundWindow()
    add(w)
    w.flush()
    for args in ((-1, 0, []), (0, -1, []), (0, 0, [(-1, 2)]), (1 << 64, 0, [])):
        with pytest.raises(OverflowError):
            w.on_ack(*args, 0.0)
    assert w.in_flight == 1 and w.stats().bogus_acks == 0


def test_retransmission_backoff_and_cap(core) -> None:
    w = core.OutboundWindow(max_messages=8, rto=1.0, rto_max=5.0, backoff=2.0)
    add(w, now=0.0)
    assert w.next_deadline() == float("inf")  # not flushed: nothing can be due
    assert w.due(100.0) is None
    w.flush()
    assert w.next_deadline() == 1.0
    assert w.due(0.999) is None
    times = []
    now = 1.0
    for _ in range(6):
        body = w.due(now)
        assert body is not None and [e.seq for e in core.parse_envelopes(body)] == [1]
        times.append(now)
        now = w.next_deadline()
    # waits 2, 4, then capped at 5
    assert [b - a for a, b in zip(times, times[1:])] == [2.0, 4.0, 5.0, 5.0, 5.0]
    assert w.stats().retransmitted == 6


def test_many_retries_do_not_overflow(core) -> None:
    w = core.OutboundWindow(rto=1.0, rto_max=5.0, backoff=1e6)
    add(w)
    w.flush()
    now = 1.0
    for _ in range(200):  # 1e6 ** 200 overflows a float
        assert w.due(now) is not None
        assert w.next_deadline() == now + 5.0
        now += 5.0


def test_received_but_not_done_is_not_resent_and_holds_credit(core) -> None:
    w = core.OutboundWindow(max_messages=2, rto=1.0)
    add(w)
    add(w)
    w.flush()
    assert w.on_ack(0, 2, [], 0.5) == 0  # arrived, handlers still running
    assert w.due(10.0) is None
    assert w.next_deadline() == float("inf")
    assert not w.has_credit()
    assert w.on_ack(2, 2, [], 11.0) == 2 and w.has_credit()


def test_due_returns_only_overdue_in_seq_order(core) -> None:
    w = core.OutboundWindow(max_messages=8, rto=1.0)
    add(w, b"a", now=0.0)
    add(w, b"b", now=0.5)
    w.flush()
    add(w, b"c", now=0.6)  # pending: never retransmitted before its first flush
    assert [e.payload for e in core.parse_envelopes(w.due(1.2))] == [b"a"]
    assert [e.payload for e in core.parse_envelopes(w.due(1.5))] == [b"b"]
    assert w.flush() is not None
    assert [e.payload for e in core.parse_envelopes(w.due(3.5))] == [b"a", b"b", b"c"]


def test_ack_while_pending(core) -> None:
    w = core.OutboundWindow(max_messages=8)
    add(w, b"a")
    add(w, b"b")
    assert w.on_ack(1, 1, [], 0.0) == 1  # odd but harmless: finished before it was flushed
    body = w.flush()
    assert [e.payload for e in core.parse_envelopes(body)] == [b"a", b"b"]  # the body still carries it
    assert w.in_flight == 1
    assert w.due(10.0) is not None and [e.seq for e in core.parse_envelopes(w.due(20.0))] == [2]


def test_take_and_unacked(core) -> None:
    w = core.OutboundWindow(max_messages=8)
    for p in (b"a", b"b", b"c"):
        add(w, p)
    w.flush()
    add(w, b"d")  # pending
    assert [core.Envelope(r).payload for r in w.unacked()] == [b"a", b"b", b"c", b"d"]
    assert w.take(4) is None  # not flushed: left alone
    assert w.take(99) is None and w.take(0) is None
    raw = w.take(2)
    assert core.Envelope(raw).payload == b"b" and core.Envelope(raw).seq == 2
    assert w.take(2) is None
    s = w.stats()
    assert (s.in_flight, s.acked) == (3, 0)  # taken is not acknowledged
    assert w.take(1) is not None and w.has_credit()
    assert w.on_ack(3, 3, [], 0.0) == 1
    with pytest.raises(OverflowError):
        w.take(-1)


def test_append_raw_resequences(core) -> None:
    other = core.OutboundWindow(first_seq=500)
    other.append(2, 3, b"Type", b"key", 9, bytes(range(16)), Z, Z, b"payload", 0.0)
    raw = other.unacked()[0]
    w = core.OutboundWindow(first_seq=7)
    assert w.append_raw(bytearray(raw), 0.0) == 7
    (e,) = core.parse_envelopes(w.flush())
    assert (e.seq, e.kind, e.flags, e.type, e.key, e.partition, e.payload) == (7, 2, 3, "Type", b"key", 9, b"payload")
    assert e.msg_id == bytes(range(16))


def test_append_raw_refuses_zero_or_several_envelopes(core) -> None:
    raw = core.pack_envelope(1, 1, 0, b"T", b"", 0, Z, Z, Z, b"x")
    w = core.OutboundWindow()
    for bad in (b"", raw + raw, raw[:-1]):
        with pytest.raises(core.MalformedFrame) as info:
            w.append_raw(bad, 0.0)
        assert info.value.reason == "truncated"
    assert w.next_seq == 1 and w.pending == 0


def test_stats_fields(core) -> None:
    w = core.OutboundWindow(max_messages=4, max_bytes=1000)
    add(w)
    add(w)
    w.flush()
    w.on_ack(1, 1, [], 0.0)
    s = w.stats()
    assert s == (3, 1, ENV + 1, 4, 1000, 2, 2, 1, 0, 0)
    assert s._fields == ("next_seq", "in_flight", "in_flight_bytes", "window", "max_bytes", "peak_in_flight",
                         "sent", "acked", "retransmitted", "bogus_acks")


def test_whole_window_cycles_many_times(core) -> None:
    w = core.OutboundWindow(max_messages=5)
    seq = 0
    for round_ in range(50):
        while w.has_credit():
            seq = add(w, b"%d" % round_)
        body = w.flush()
        assert len(core.parse_envelopes(body)) == 5
        assert w.on_ack(seq, seq, [], 0.0) == 5
    assert w.stats().sent == 250 and w.stats().acked == 250 and w.in_flight_bytes == 0


def test_acks_of_unflushed_envelopes_with_a_small_window(core) -> None:
    # Acks of envelopes not yet flushed free credit, so one batch body can hold more envelopes
    # than the window has slots. The compiled core once counted such a body's live envelopes
    # through aliased ring slots, kept the body forever and, a few bodies later, overwrote its
    # ring of bodies (a crash). Observable: the window must let go of a body once all of its
    # envelopes are finished.
    w = core.OutboundWindow(max_messages=2, rto=1.0)
    for cycle in range(50):
        seqs = []
        for _ in range(3):
            seqs.append(add(w, b"acked early"))
            assert w.on_ack(seqs[-1], seqs[-1], [], 0.0) == 1
        last = add(w, b"in flight")
        body = w.flush()
        assert [e.seq for e in core.parse_envelopes(body)] == seqs + [last]
        assert [e.payload for e in core.parse_envelopes(w.due(10.0 + cycle))] == [b"in flight"]
        assert w.on_ack(last, last, [], 0.0) == 1
        assert sys.getrefcount(body) == 2, "the window still holds a finished batch body"
        del body
    assert w.in_flight == 0 and w.stats().acked == 200


# -- append_many: a whole outgoing batch in one call --------------------------------------------


def ident(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_append_many_writes_what_append_would(core) -> None:
    keys = [b"k%d" % i for i in range(5)]
    ids = [ident(i) for i in range(5)]
    traces = [ident(100 + i) for i in range(5)]
    causes = [ident(200 + i) for i in range(5)]
    payloads = [b"p" * i for i in range(5)]
    one, many = core.OutboundWindow(), core.OutboundWindow()
    for i in range(5):
        one.append(2, 7, b"Cmd", keys[i], i, ids[i], traces[i], causes[i], payloads[i], 1.0)
    assert many.append_many(b"Cmd", keys, ids, payloads, 1.0, kind=2, flags=7, partitions=range(5),
                            trace_ids=traces, cause_ids=causes) == 5
    assert many.flush() == one.flush()
    assert many.stats() == one.stats() and many.next_deadline() == one.next_deadline()


def test_append_many_defaults(core) -> None:
    """No keys: unkeyed; no trace ids: each envelope starts its own trace; no cause: zeros."""
    w = core.OutboundWindow()
    ids = (ident(1), ident(2))  # a tuple serves as well as a list
    assert w.append_many(b"Evt", None, ids, (b"a", b"b"), 0.0, partitions=3) == 2
    envs = core.parse_envelopes(w.flush())
    assert [(e.seq, e.kind, e.flags, e.key, e.partition) for e in envs] == [(1, 1, 0, b"", 3), (2, 1, 0, b"", 3)]
    assert [(e.msg_id, e.trace_id, e.cause_id) for e in envs] == [(ident(1), ident(1), Z), (ident(2), ident(2), Z)]
    assert w.append_many(b"Evt", [], [], [], 0.0) == 0 and w.flush() is None


def test_append_many_stops_where_credit_ends(core) -> None:
    """By count and by bytes: the front goes in, the return value says how much, the rest waits."""
    w = core.OutboundWindow(max_messages=3)
    assert w.append_many(b"T", None, [ident(i) for i in range(5)], [b"x"] * 5, 0.0) == 3
    assert not w.has_credit() and w.next_seq == 4
    assert w.append_many(b"T", None, [ident(9)], [b"x"], 0.0) == 0
    w.on_ack(2, 2, [], 0.0)
    assert w.append_many(b"T", None, [ident(3), ident(4)], [b"x", b"x"], 0.0) == 2
    assert [e.msg_id for e in core.parse_envelopes(w.flush())] == [ident(i) for i in (0, 1, 2, 3, 4)]

    w = core.OutboundWindow(max_bytes=3 * (ENV + 10))
    assert w.append_many(b"T", None, [ident(i) for i in range(4)], [b"0123456789"] * 4, 0.0) == 3
    assert w.in_flight_bytes == 3 * (ENV + 10)
    big = core.OutboundWindow(max_bytes=10)  # one envelope always fits when nothing is in flight
    assert big.append_many(b"T", None, [ident(0), ident(1)], [b"y" * 50] * 2, 0.0) == 1


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(payloads=[b"ok", "text"]), TypeError, r"payloads\[1\] must be bytes, got str"),
        (dict(msg_ids=[ident(0), b"short"]), ValueError, r"msg_ids\[1\] must be 16 bytes, got 5"),
        (dict(keys=[b"k", None]), TypeError, r"keys\[1\] must be bytes, got NoneType"),
        (dict(keys=[b"k", b"k" * 70000]), ValueError, r"key must be at most 65535 bytes"),
        (dict(keys=[b"k"]), ValueError, r"keys has 1 items for 2 payloads"),
        (dict(keys=b"kk"), TypeError, r"keys must be a sequence with one item per envelope, not bytes"),
        (dict(partitions=[0, 65536]), ValueError, r"partitions\[1\] must be in 0..65535, got 65536"),
        (dict(partitions=[0, 1 << 80]), ValueError, r"partitions\[1\] must be in 0..65535"),
        (dict(partitions=[0, "1"]), TypeError, r"partitions\[1\] must be an int, got str"),
        (dict(partitions=-1), ValueError, r"partition must be in 0..65535, got -1"),
        (dict(trace_ids=[ident(0), Z + b"!"]), ValueError, r"trace_ids\[1\] must be 16 bytes, got 17"),
        (dict(cause_ids=[ident(0)]), ValueError, r"cause_ids has 1 items for 2 payloads"),
        (dict(kind=0), ValueError, r"kind must be in 1..15"),
        (dict(flags=256), ValueError, r"flags must fit in one byte"),
        (dict(type=b""), ValueError, r"type must be 1 to 255 bytes"),
    ],
)
def test_append_many_refuses_a_bad_batch_whole(core, change, error, message) -> None:
    w = core.OutboundWindow()
    args = dict(type=b"T", keys=[b"a", b"b"], msg_ids=[ident(0), ident(1)], payloads=[b"ok", b"ok"], now=0.0)
    args.update(change)
    with pytest.raises(error, match=message):
        w.append_many(**args)
    assert w.next_seq == 1 and w.pending == 0 and w.in_flight == 0  # nothing went in
    assert w.append_many(b"T", None, [ident(0)], [b"fine"], 0.0) == 1  # the window is unharmed


def test_append_many_takes_any_iterable(core) -> None:
    w = core.OutboundWindow()
    assert w.append_many(b"T", (k for k in [b"a", b"b"]), iter([ident(0), ident(1)]), map(bytes, [b"1", b"2"]),
                         0.0, partitions=iter([4, 5])) == 2
    assert [(e.key, e.partition, e.payload) for e in core.parse_envelopes(w.flush())] == [
        (b"a", 4, b"1"), (b"b", 5, b"2")]
