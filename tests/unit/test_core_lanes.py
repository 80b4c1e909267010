"""The lanes (the runtime's per-message loops) behave the same in both cores."""

from __future__ import annotations

import msgspec
import pytest

from choreo import _core, _pycore

CORES = [pytest.param(_core, id="compiled"), pytest.param(_pycore, id="pure")]
Z = bytes(16)


class Ev(msgspec.Struct):
    k: str
    n: int


encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Ev).decode


def lane(core, windows, key_name="k", partitions=4, max_batch=3):
    return core.EmitLane(b"Ev", key_name, partitions, windows, encode, lambda v: str(v).encode(),
                         core.IdSource(b"\x01" * 8), max_batch, 1 << 20, 1 << 20)


@pytest.mark.parametrize("core", CORES)
def test_emit_lane_writes_what_append_would(core) -> None:
    windows = [core.OutboundWindow(max_messages=8) for _ in range(4)]
    emit = lane(core, windows)
    ids = [emit.emit(Ev(f"key{i}", i), now=0.0) for i in range(6)]
    assert ids == [b"\x01" * 8 + (i + 1).to_bytes(8, "little") for i in range(6)]
    envs = [e for w in windows for e in core.parse_envelopes(w.flush() or b"")]
    assert sorted(e.msg_id for e in envs) == sorted(ids)
    for e in envs:
        assert e.trace_id == e.msg_id and e.cause_id == Z and e.type == "Ev" and e.flags == 0
        assert e.partition == core.partition_of(e.key, 4)
        assert windows[e.partition] is not None
        assert decode(e.payload).k == e.key.decode()


def test_both_cores_emit_identical_bytes() -> None:
    bodies = []
    for core in (_core, _pycore):
        windows = [core.OutboundWindow(max_messages=64) for _ in range(4)]
        emit = lane(core, windows)
        for i in range(40):
            emit.emit(Ev(f"k{i % 7}", i), now=1.0)
        bodies.append([w.flush() for w in windows])
    assert bodies[0] == bodies[1]


@pytest.mark.parametrize("core", CORES)
def test_emit_lane_steps_aside_without_credit_or_when_held(core) -> None:
    w = core.OutboundWindow(max_messages=2)
    emit = lane(core, [w], partitions=1)
    assert emit.emit(Ev("a", 1), 0.0) is not None and emit.emit(Ev("a", 2), 0.0) is not None
    assert emit.emit(Ev("a", 3), 0.0) is None, "no credit: the caller's slow path waits"
    w2 = core.OutboundWindow()
    w2.held = True
    assert lane(core, [w2], partitions=1).emit(Ev("a", 1), 0.0) is None
    assert emit.full is False and emit.last == 0


@pytest.mark.parametrize("core", CORES)
def test_emit_lane_unkeyed_picks_the_least_loaded_and_reports_a_full_batch(core) -> None:
    a, b = core.OutboundWindow(), core.OutboundWindow()
    emit = lane(core, [a, b], key_name=None, max_batch=2)
    emit.emit(Ev("x", 1), 0.0)
    first = emit.last
    assert not emit.full
    emit.emit(Ev("x", 2), 0.0)
    assert emit.last == 1 - first, "the other one had nothing in flight"
    picks = set()
    for n in range(3, 7):  # equally loaded: they take turns
        emit.emit(Ev("x", n), 0.0)
        picks.add(emit.last)
        if emit.full:
            [a, b][emit.last].flush()
    assert picks == {0, 1}
    (env, *_) = core.parse_envelopes(a.flush() or b.flush())
    assert env.flags == 0x01 and env.key == b""


def test_both_cores_choose_the_same_unkeyed_windows() -> None:
    picks = []
    for core in (_core, _pycore):
        ws = [core.OutboundWindow() for _ in range(3)]
        emit = lane(core, ws, key_name=None)
        seq = []
        for n in range(20):
            emit.emit(Ev("x", n), 0.0)
            seq.append(emit.last)
            if n % 5 == 4:
                ws[n % 3].on_ack(ws[n % 3].next_seq - 1, ws[n % 3].next_seq - 1, [], 0.0)
        picks.append(seq)
    assert picks[0] == picks[1]


def _batch(core, items):
    w = core.OutboundWindow(max_messages=64)
    for tname, key, payload, msg_id in items:
        w.append(1, 0, tname, key, core.partition_of(key, 4), msg_id, msg_id, Z, payload, 0.0)
    r = core.InboundReorder(window=64)
    return r, r.feed(w.flush())


def _run(core):
    """A batch exercising every stop of the fast lane; returns what happened."""
    seen: list[int] = []

    def handler(ev: Ev) -> None:
        if ev.n == 13:
            raise RuntimeError("unlucky")
        seen.append(ev.n)

    ids = [bytes([i]) * 16 for i in range(10)]
    items = [
        (b"Ev", b"a", encode(Ev("a", 1)), ids[0]),
        (b"Ev", b"b", encode(Ev("b", 2)), ids[1]),
        (b"Ev", b"a", encode(Ev("a", 3)), ids[0]),  # duplicate id
        (b"Other", b"a", encode(Ev("a", 4)), ids[3]),  # not for the lane
        (b"Ev", b"c", b"\xc1", ids[4]),  # body fails to decode
        (b"Ev", b"d", encode(Ev("d", 13)), ids[5]),  # handler raises
        (b"Ev", b"busy", encode(Ev("busy", 6)), ids[6]),  # its key is busy
        (b"Ev", b"e", encode(Ev("e", 7)), ids[7]),
    ]
    reorder, envs = _batch(core, items)
    fast = core.FastLane()
    fast.set("Ev", decode, core.DedupWindow(60.0, 100), handler, "h", False)
    keyed = core.KeyedDispatch()
    keyed.admit(b"busy", "someone")
    spans: list[tuple] = []
    clock = iter(range(100)).__next__
    stops, i = [], 0
    while True:
        handled, i, status, a, b, started = fast.run(envs, i, reorder, 5.0, clock, 1.5, None, keyed, spans.append, None)
        stops.append((handled, i, status, type(b).__name__ if status == core.LANE_FAILED else None))
        if status == core.LANE_END:
            break
        i += 1
    from choreo.tracing import unpack

    spans = [unpack(s) for s in spans]
    assert all(s[0] == s[1] for s in spans), "the trace id of a message from outside is its id"
    return stops, seen, [(s[3], s[4], s[5], s[6], s[7], s[8], s[10], s[11], s[12]) for s in spans], reorder.stats().done_upto


def test_fast_lane_stops_where_the_caller_is_needed_in_both_cores() -> None:
    compiled, pure = _run(_core), _run(_pycore)
    assert compiled == pure
    stops, seen, spans, done_upto = compiled
    assert [s[2] for s in stops] == [
        _core.LANE_DUPLICATE, _core.LANE_SLOW, _core.LANE_BAD, _core.LANE_FAILED, _core.LANE_SLOW, _core.LANE_END
    ]
    assert stops[3][3] == "RuntimeError"
    assert seen == [1, 2, 7]
    assert spans[0] == ("Ev", "h", 1.5, 0, 1, "ok", 1, b"a", _core.partition_of(b"a", 4))
    assert done_upto == 2, "the lane completed what it handled; the rest is the caller's"


def test_the_compiled_lane_reads_the_monotonic_clock_it_is_handed_as_a_capsule() -> None:
    import time

    from choreo import _clock, core

    assert core.lane_clock(time.monotonic) is (_clock.MONOTONIC if core.IMPLEMENTATION == "compiled" else time.monotonic)
    fake = iter(range(100)).__next__
    assert core.lane_clock(fake) is fake, "any other clock (a simulation's) is called as it is"
    before = time.monotonic()
    assert before <= _clock.monotonic() <= time.monotonic(), "the same clock as time.monotonic"
    items = [(b"Ev", k.encode(), encode(Ev(k, n)), bytes([n + 1]) * 16) for n, k in enumerate("abcdef")]
    reorder, envs = _batch(_core, items)
    fast = _core.FastLane()
    fast.set("Ev", decode, _core.DedupWindow(60.0, 100), lambda ev: None, "h", False)
    spans = _core.SpanRing(16)
    assert fast.run(envs, 0, reorder, 5.0, _clock.MONOTONIC, before, None, _core.KeyedDispatch(), spans, None)[:3] \
        == (6, 6, _core.LANE_END)
    after = time.monotonic()
    times = [t for span in spans for t in (span[4], span[5])]
    assert len(times) == 12 and times == sorted(times) and before <= times[0] and times[-1] <= after
    assert all(span[4] == prev[5] for prev, span in zip(spans, list(spans)[1:])), "each starts as the last ended"


@pytest.mark.parametrize("core", CORES)
def test_no_handler_starts_once_the_clock_reads_until_in_both_cores(core) -> None:
    """A process stopped in a batch and continued past ``until`` (its clock jumped) runs no more of
    it: the lane hands the rest back (LANE_LATE, with that reading) for the caller to look first."""
    items = [(b"Ev", k.encode(), encode(Ev(k, n)), bytes([n + 1]) * 16) for n, k in enumerate("abcde")]
    reorder, envs = _batch(core, items)
    seen: list[int] = []
    readings = iter([0.0, 0.1, 9.0, 9.1, 9.2, 9.3, 9.4]).__next__  # stopped for 9 s while the second ran
    fast = core.FastLane()
    fast.set("Ev", decode, core.DedupWindow(60.0, 100), lambda ev: seen.append(ev.n), "h", False)
    handled, i, status, a, b, started = fast.run(
        envs, 0, reorder, 0.0, readings, 0.0, None, core.KeyedDispatch(), None, None, None, None, 5.0
    )
    assert (handled, i, status, a, b, started) == (2, 2, core.LANE_LATE, None, None, 9.0)
    assert seen == [0, 1] and reorder.stats().done_upto == 2, "what ran is complete, the rest is untouched"
    assert fast.run(envs, 2, reorder, 9.0, readings, 9.0, None, core.KeyedDispatch(), None, None, None, None,
                    15.0)[:3] == (3, 5, core.LANE_END), "given a later until, it goes on where it stopped"
    assert seen == [0, 1, 2, 3, 4]


def test_spans_keep_as_many_key_bytes_whoever_records_them() -> None:
    from choreo import tracing

    assert _core.SPAN_KEY_BYTES == _pycore.SPAN_KEY_BYTES == tracing.SPAN_KEY_BYTES == 128


def _bookkept_lane(core, windows, sent, dirty, scheduled, max_batch=3):
    channels = [f"ch{i}" for i in range(len(windows))]
    return core.EmitLane(
        b"Ev", "k", len(windows), windows, encode, lambda v: str(v).encode(), core.IdSource(b"\x02" * 8), max_batch,
        1 << 20, 1 << 20, decode, channels=channels, dirty=dirty, schedule=lambda: scheduled.append(1),
        send_full=lambda ch: sent.append((ch, windows[int(ch[2:])].flush())), clock=lambda: 3.0, cls=Ev,
    )


@pytest.mark.parametrize("core", CORES)
def test_emit_many_writes_a_run_marks_channels_and_sends_full_batches(core) -> None:
    windows = [core.OutboundWindow(max_messages=64)]
    sent, dirty, scheduled = [], {}, []
    emit = _bookkept_lane(core, windows, sent, dirty, scheduled)
    ids: list[bytes] = []
    assert emit.emit_many([Ev("a", n) for n in range(7)], 0, ids) == (7, core.EMIT_END)
    assert len(ids) == 7 and emit.emitted == 7
    assert [len(core.parse_envelopes(body)) for _, body in sent] == [3, 3], "two full batches left at once"
    assert list(dirty) == ["ch0"] and scheduled == [1], "the seventh waits for the flush it scheduled"


@pytest.mark.parametrize("core", CORES)
def test_an_emit_lane_reads_its_clock_once_per_batch_and_times_the_batch_from_its_start(core) -> None:
    windows = [core.OutboundWindow(max_messages=64, rto=1.0), core.OutboundWindow(max_messages=64, rto=1.0)]
    readings: list[float] = []

    def clock() -> float:
        readings.append(10.0 * (len(readings) + 1))
        return readings[-1]

    emit = core.EmitLane(b"Ev", "k", 2, windows, encode, lambda v: str(v).encode(), core.IdSource(b"\x03" * 8), 100,
                         1 << 20, 1 << 20, clock=clock)
    keys = {core.partition_of(k.encode(), 2): k for k in ("a", "b", "c", "d", "e")}
    for n in range(5):
        assert emit.emit(Ev(keys[0], n)) is not None
    assert readings == [10.0] and windows[0].pending_since == 10.0, "one reading for the batch, at its start"
    assert emit.emit(Ev(keys[1], 0)) is not None
    assert readings == [10.0, 20.0] and windows[1].pending_since == 20.0, "another window's batch reads its own"
    assert windows[0].flush() is not None and windows[0].pending_since is None
    assert windows[0].next_deadline() == 11.0, "every envelope of the batch is timed from the batch's start"
    assert windows[0].due(10.99) is None and len(core.parse_envelopes(windows[0].due(11.0))) == 5
    emit.emit(Ev(keys[0], 5))
    assert readings == [10.0, 20.0, 30.0] and windows[0].pending_since == 30.0, "after a flush, a new batch"
    emit.emit(Ev(keys[0], 6), now=35.0)
    assert len(readings) == 3 and windows[0].pending_since == 30.0, "a time given is used, not read"


@pytest.mark.parametrize("core", CORES)
def test_emit_many_stops_at_another_type_at_no_credit_and_writes_nothing_of_an_invalid_run(core) -> None:
    windows = [core.OutboundWindow(max_messages=4)]
    sent, dirty, scheduled = [], {}, []
    emit = _bookkept_lane(core, windows, sent, dirty, scheduled, max_batch=100)
    ids: list[bytes] = []
    assert emit.emit_many([Ev("a", 1), Ev("a", 2), "other", Ev("a", 3)], 0, ids) == (2, core.EMIT_OTHER)
    assert emit.emit_many([Ev("a", 3), Ev("a", "x"), Ev("a", 5)], 0, ids) == (1, core.EMIT_INVALID)
    assert len(ids) == 2 and windows[0].pending == 2, "a run with an invalid event writes nothing"
    assert emit.emit_many([Ev("a", n) for n in range(3, 9)], 0, ids) == (2, core.EMIT_BLOCKED)
    assert len(ids) == 4 and windows[0].pending == 4, "credit ran out part-way: the prefix went"


@pytest.mark.parametrize("core", CORES)
def test_a_batch_handler_gets_each_run_and_a_failing_one_comes_back_whole(core) -> None:
    ids = [bytes([i]) * 16 for i in range(10)]
    items = [(b"Ev", b"a", encode(Ev("a", n)), ids[n]) for n in range(4)]
    items.append((b"Ev", b"a", encode(Ev("a", 9)), ids[0]))  # a duplicate: the run ends before it
    items += [(b"Ev", b"b", encode(Ev("b", n)), ids[n]) for n in range(5, 8)]
    reorder, envs = _batch(core, items)
    calls: list[list[int]] = []

    def handler(evs: list[Ev]) -> None:
        calls.append([e.n for e in evs])
        if any(e.n == 6 for e in evs):
            raise ValueError("six")

    fast = core.FastLane()
    fast.set("Ev", decode, core.DedupWindow(60.0, 100), handler, "h", False, None, True)
    clock = iter(range(100)).__next__
    first = fast.run(envs, 0, reorder, 5.0, clock, 1.5, None, core.KeyedDispatch(), None, None)
    assert first[:3] == (4, 4, core.LANE_DUPLICATE) and calls == [[0, 1, 2, 3]]
    handled, i, status, messages, error, _ = fast.run(envs, 5, reorder, 5.0, clock, 1.5, None, core.KeyedDispatch(),
                                                      None, None)
    assert (handled, i, status) == (0, 5, core.LANE_BATCH_FAILED) and [m.n for m in messages] == [5, 6, 7]
    assert isinstance(error, ValueError) and reorder.stats().done_upto == 4, "only the first run is complete"


@pytest.mark.parametrize("core", CORES)
def test_a_lane_with_plain_fields_checks_a_body_only_when_a_value_is_of_another_type(core) -> None:
    checked: list[bytes] = []

    def check(body: bytes) -> Ev:
        checked.append(body)
        return decode(body)

    emit = core.EmitLane(b"Ev", "k", 1, [core.OutboundWindow()], encode, lambda v: str(v).encode(),
                         core.IdSource(b"\x03" * 8), 100, 1 << 20, 1 << 20, check,
                         fields=(("k", (str,)), ("n", (int, bool))))
    assert emit.emit(Ev("a", 1), 0.0) is not None and checked == [], "exact types: the check could only pass"
    assert emit.emit(Ev("a", 2.0), 0.0) is None and len(checked) == 1, "another type: the check decides (no)"
    assert emit.emit(Ev(None, 3), 0.0) is None and len(checked) == 2, "another type: the check decides (no)"
    assert emit.emit(Ev("a", True), 0.0) is not None and len(checked) == 2, "one of the listed types"


class IntKeyed(msgspec.Struct):
    k: int
    body: bytes


_encoder = msgspec.msgpack.Encoder()


@pytest.mark.parametrize("core", CORES)
def test_a_lane_encoding_into_its_own_buffer_writes_what_encode_would_even_when_a_write_reenters_it(core) -> None:
    def written(encode_into, reenter: bool) -> list[bytes]:
        windows = [core.OutboundWindow(max_messages=1000) for _ in range(2)]
        inner: list[bytes | None] = []

        def key_bytes(value: int) -> bytes:
            if reenter and value == 7:  # a key's function that emits through the same lane, mid-write
                inner.append(lanes[0].emit(IntKeyed(8, b"inner" * 30), 0.0))
            return str(value).encode()

        lanes = [core.EmitLane(b"IntKeyed", "k", 2, windows, _encoder.encode, key_bytes, core.IdSource(b"\x05" * 8),
                               1000, 1 << 30, 1 << 30, clock=lambda: 1.0, cls=IntKeyed, encode_into=encode_into)]
        emit = lanes[0]
        assert emit.emit(IntKeyed(1, b"a" * 100), 0.0) is not None
        assert emit.emit(IntKeyed(2, b"b" * 600_000), 0.0) is not None, "a body over what the buffer keeps"
        assert emit.emit(IntKeyed(3, b"c"), 0.0) is not None
        ids: list[bytes] = []
        assert emit.emit_many([IntKeyed(n, bytes([n]) * (n * 37)) for n in range(4, 12)], 0, ids) == (8, core.EMIT_END)
        assert emit.emit(IntKeyed(7, b"d" * 50), 0.0) is not None
        assert len(inner) == (2 if reenter else 0) and all(inner), "key 7 was written twice, each time re-entering"
        return [w.flush() for w in windows]

    offsets: list[int] = []

    def encode_into(message: IntKeyed, buffer: bytearray, offset: int) -> None:
        offsets.append(offset)
        _encoder.encode_into(message, buffer, offset)

    plain = written(None, reenter=False)
    assert written(encode_into, reenter=False) == plain, "the same envelopes, byte for byte"
    if core is _core:  # (the twin makes bytes with encode either way)
        run = offsets[3:11]
        assert len(offsets) == 12 and offsets[:3] == [0, 0, 0] and offsets[11] == 0, "each body at the start"
        assert run[0] == 0 and run == sorted(run) and len(set(run)) == 8, "emit_many's bodies one after another"
    else:
        assert offsets == []
    both = written(encode_into, reenter=True)
    bodies = [msgspec.msgpack.decode(e.payload, type=IntKeyed)
              for body in both for e in core.parse_envelopes(body)]
    assert sorted((b.k, b.body) for b in bodies) == sorted(
        [(1, b"a" * 100), (2, b"b" * 600_000), (3, b"c"), (7, b"d" * 50), (8, b"inner" * 30), (8, b"inner" * 30)]
        + [(n, bytes([n]) * (n * 37)) for n in range(4, 12)]
    ), "every body whole: the outer write's was not overwritten by the one it caused"


class _Life:
    fatal: Exception | None = None


class Other(msgspec.Struct):
    k: str


@pytest.mark.parametrize("core", CORES)
def test_the_emit_table_writes_through_its_types_lane_until_anything_it_depends_on_changes(core) -> None:
    windows = [core.OutboundWindow(max_messages=2)]
    sent, dirty, scheduled = [], {}, []
    emit = _bookkept_lane(core, windows, sent, dirty, scheduled, max_batch=100)
    holds: dict[object, object] = {}
    life = _Life()
    table = core.EmitTable(holds, life)
    assert table.emit(Ev("a", 1)) is None and windows[0].pending == 0, "no lane registered: the general path"
    table.put(Ev, emit)
    first = table.emit(Ev("a", 1))
    assert first is not None and windows[0].pending == 1 and emit.emitted == 1
    assert table.emit(Other("a")) is None, "another type has no lane here"
    holds["held"] = object()
    assert table.emit(Ev("a", 2)) is None and windows[0].pending == 1, "messages held per key: never past them"
    holds.clear()
    life.fatal = RuntimeError("refused")
    assert table.emit(Ev("a", 2)) is None and windows[0].pending == 1, "a refused node emits nothing this way"
    life.fatal = None
    assert table.emit(Ev("a", 2)) is not None
    assert table.emit(Ev("a", 3)) is None, "no credit: the lane's own answer"
    table.clear()
    assert len(table) == 0 and table.emit(Ev("a", 3)) is None
    table.put(Ev, emit)
    table.put(Ev, None)
    assert len(table) == 0, "a type whose plan has no lane is taken out"
    with pytest.raises(TypeError):
        table.put(Ev, "not a lane")
    with pytest.raises(TypeError):
        table.put("not a class", emit)


@pytest.mark.parametrize("core", CORES)
def test_the_emit_tables_try_emit_is_the_lanes_id_or_else_the_general_paths_answer(core) -> None:
    """``node.try_emit`` of a running node: the lane when it takes the event, else (and always
    with a traceparent) the fallback, whose answer or error is the caller's."""
    windows = [core.OutboundWindow(max_messages=1)]
    emit = _bookkept_lane(core, windows, [], {}, [], max_batch=100)
    life = _Life()
    table = core.EmitTable({}, life)
    with pytest.raises(ValueError, match="fallback"):
        table.try_emit(Ev("a", 1))
    general: list[tuple[object, object]] = []

    def fallback(event: object, traceparent: object) -> bytes:
        general.append((event, traceparent))
        if isinstance(event, Other):
            raise LookupError("nobody consumes Other")
        return b"general"

    table.fallback = fallback
    table.put(Ev, emit)
    first = table.try_emit(Ev("a", 1))
    assert len(first) == 16 and windows[0].pending == 1 and general == [], "the lane took it"
    assert table.try_emit(Ev("a", 2)) == b"general" and general == [(Ev("a", 2), None)], "no credit: the general path"
    assert table.try_emit(Ev("a", 3), traceparent="00-x") == b"general" and general[-1] == (Ev("a", 3), "00-x")
    with pytest.raises(LookupError, match="nobody consumes Other"):
        table.try_emit(Other("a"))
    life.fatal = RuntimeError("refused")
    assert table.try_emit(Ev("a", 4)) == b"general", "a refused or stopped node: the general path says why"
    assert windows[0].pending == 1


def _command_run(core):
    """Commands through the lane: answered, left to the caller, or not the lane's at all."""
    from choreo.wire import FLAG_REPLAY, KIND_COMMAND

    ids = [bytes([i]) * 16 for i in range(10)]
    w = core.OutboundWindow(max_messages=64)
    rows = [
        (KIND_COMMAND, 0, Ev("a", 1), ids[1]),
        (KIND_COMMAND, 0, Ev("b", 2), ids[2]),  # its answer cannot travel: back to the caller
        (KIND_COMMAND, 0, Ev("a", 1), ids[1]),  # a resend of the first: a duplicate
        (KIND_COMMAND, FLAG_REPLAY, Ev("c", 3), ids[3]),  # a replay flag from the wire: the caller refuses it
        (1, 0, Ev("d", 4), ids[4]),  # an event of a command's type: not the lane's
    ]
    for kind, flags, ev, msg_id in rows:
        key = ev.k.encode()
        w.append(kind, flags, b"Ev", key, core.partition_of(key, 4), msg_id, msg_id, Z, encode(ev), 0.0)
    reorder = core.InboundReorder(window=64)
    envs = reorder.feed(w.flush())
    answered: list[tuple] = []

    def answer(channel, env, result):
        answered.append((channel, env.msg_id, result))
        return result != "B"

    fast = core.FastLane()
    fast.set("Ev", decode, core.DedupWindow(60.0, 100), lambda ev: ev.k.upper(), "h", False, kind=KIND_COMMAND)
    clock = iter(range(100)).__next__
    stops, i = [], 0
    while True:
        handled, i, status, a, b, _ = fast.run(envs, i, reorder, 5.0, clock, 1.5, None, core.KeyedDispatch(), None,
                                               None, answer, "ch")
        stops.append((handled, i, status, b[1] if status == core.LANE_RESULT else None))
        if status == core.LANE_END:
            break
        i += 1
    without = fast.run(envs, 0, core.InboundReorder(window=64), 5.0, clock, 1.5, None, core.KeyedDispatch(), None, None)
    return stops, answered, reorder.stats().done_upto, without[:3]


def test_a_command_is_answered_in_the_lane_or_left_to_the_caller_in_both_cores() -> None:
    compiled, pure = _command_run(_core), _command_run(_pycore)
    assert compiled == pure
    stops, answered, done_upto, without = compiled
    assert [(s[1], s[2], s[3]) for s in stops] == [
        (1, _core.LANE_RESULT, "B"),  # the handler ran once; the caller answers (and says why)
        (2, _core.LANE_DUPLICATE, None),
        (3, _core.LANE_SLOW, None),
        (4, _core.LANE_SLOW, None),
        (5, _core.LANE_END, None),
    ]
    assert stops[0][0] == 1, "the first was answered in the lane"
    assert answered == [("ch", bytes([1]) * 16, "A"), ("ch", bytes([2]) * 16, "B")]
    assert done_upto == 1, "only the answered command is complete: the rest are the caller's"
    assert without == (0, 0, _core.LANE_SLOW), "without an answer function the lane takes no command"


class _Channel:
    """What a request lane touches of a channel: its urgent flag and the callbacks by seq."""

    def __init__(self) -> None:
        self.urgent = False
        self.watch: dict[int, object] = {}


def _request_lane(core, windows, channels, sent):
    from choreo.wire import KIND_COMMAND

    return core.EmitLane(
        b"Ev", "k", len(windows), windows, encode, lambda v: str(v).encode(), core.IdSource(b"\x03" * 8), 64,
        1 << 20, 1 << 20, decode, channels=channels, dirty={}, schedule=lambda: None,
        send_full=lambda ch: sent.append(ch), clock=lambda: 3.0, cls=Ev, kind=KIND_COMMAND,
    )


@pytest.mark.parametrize("core", CORES)
def test_a_request_lane_writes_a_command_with_the_callers_ids_marks_it_urgent_and_watches_its_ack(core) -> None:
    from choreo.wire import KIND_COMMAND

    windows = [core.OutboundWindow(max_messages=1) for _ in range(4)]
    channels = [_Channel() for _ in windows]
    lane = _request_lane(core, windows, channels, [])
    msg_id, trace_id, cause_id = b"M" * 16, b"T" * 16, b"C" * 16
    done = []
    assert lane.request(Ev("a", "x"), b"O" * 16) is None, "a body not of its type: the general path says why"
    assert lane.request(Ev("a", 1), msg_id, trace_id, cause_id, lambda: done.append(1)) == msg_id
    p = core.partition_of(b"a", 4)
    (env,) = core.InboundReorder(window=8).feed(windows[p].flush())
    assert (env.kind, env.type, env.key, env.msg_id, env.trace_id, env.cause_id) == (
        KIND_COMMAND, "Ev", b"a", msg_id, trace_id, cause_id)
    assert channels[p].urgent and list(channels[p].watch) == [env.seq]
    channels[p].watch[env.seq]()
    assert done == [1]
    assert not any(ch.urgent or ch.watch for i, ch in enumerate(channels) if i != p)
    assert lane.request(Ev("a", 2), b"N" * 16) is None, "no credit left: the general path waits for it"
    with pytest.raises(ValueError):
        lane.request(Ev("b", 1), b"P" * 16, b"short")


def test_both_cores_write_the_same_request() -> None:
    bodies = []
    for core in (_core, _pycore):
        windows = [core.OutboundWindow(max_messages=8) for _ in range(4)]
        lane = _request_lane(core, windows, [_Channel() for _ in windows], [])
        lane.request(Ev("k", 7), b"M" * 16, b"T" * 16)
        bodies.append(windows[core.partition_of(b"k", 4)].flush())
    assert bodies[0] == bodies[1]
