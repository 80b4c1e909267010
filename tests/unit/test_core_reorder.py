"""InboundReorder edge cases, and feeding batches whole vs one envelope at a time, against both cores."""

from __future__ import annotations

import random

import pytest

from choreo import _core, _pycore

Z = bytes(16)


@pytest.fixture(params=[_core, _pycore], ids=["compiled", "pure"])
def core(request):
    return request.param


def raw(core, seq: int, payload: bytes = b"") -> bytes:
    return core.pack_envelope(seq, 1, 0, b"T", b"k", 0, seq.to_bytes(16, "little"), Z, Z, payload or b"%d" % seq)


def test_doc_example(core) -> None:
    r = core.InboundReorder(window=8)
    assert (r.accept(2, "b"), r.accept(1, "a"), r.accept(1, "a")) == (core.ACCEPTED, core.ACCEPTED, core.DUPLICATE)
    assert r.release() == ["a", "b"]
    assert r.complete(2) is True
    assert r.ack() == (0, 2, [(2, 2)])


@pytest.mark.parametrize("kwargs,message", [(dict(window=0), "window must be >= 1"),
                                            (dict(first_seq=0), "first_seq must be >= 1")])
def test_constructor_errors(core, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        core.InboundReorder(**kwargs)


def test_releases_strictly_in_sequence(core) -> None:
    r = core.InboundReorder(window=16)
    assert r.accept(3, "c") == core.ACCEPTED
    assert r.release() == []
    assert r.accept(1, "a") == core.ACCEPTED
    assert r.release() == ["a"]
    assert r.release() == []  # each is released once
    assert r.accept(2, "b") == core.ACCEPTED
    assert r.release() == ["b", "c"]
    assert (r.released_upto, r.done_upto, r.in_progress, r.buffered) == (3, 0, 3, 0)


def test_duplicates_of_every_state(core) -> None:
    r = core.InboundReorder(window=16)
    r.accept(1, "a")
    r.accept(2, "b")
    r.accept(4, "d")
    r.release()
    r.complete(1)
    r.ack_frame()
    assert not r.ack_pending
    assert r.accept(1, "a") == core.DUPLICATE  # done
    assert r.ack_pending  # the sender missed our ack: say it again
    assert r.accept(2, "b") == core.DUPLICATE  # released, in progress
    assert r.accept(4, "d") == core.DUPLICATE  # buffered
    assert r.stats().duplicates == 3 and r.stats().accepted == 3


def test_window_bound(core) -> None:
    r = core.InboundReorder(window=4)
    assert r.accept(5, "e") == core.BEYOND_WINDOW
    assert r.accept(4, "d") == core.ACCEPTED
    r.ack_frame()
    assert r.accept(1000, "x") == core.BEYOND_WINDOW
    assert not r.ack_pending  # a refusal says nothing new
    assert r.stats().beyond_window == 2 and r.buffered == 1
    # the window slides with done_upto, not with released_upto
    for s in (1, 2, 3):
        r.accept(s, s)
    assert r.release() == [1, 2, 3, "d"]
    assert r.accept(5, "e") == core.BEYOND_WINDOW
    r.complete(1)
    assert r.accept(5, "e") == core.ACCEPTED
    assert r.accept(6, "f") == core.BEYOND_WINDOW


def test_window_of_one(core) -> None:
    r = core.InboundReorder(window=1)
    assert r.accept(2, "b") == core.BEYOND_WINDOW
    assert r.accept(1, "a") == core.ACCEPTED
    assert r.release() == ["a"]
    assert r.accept(2, "b") == core.BEYOND_WINDOW  # 1 is not done yet
    assert r.complete(1)
    assert r.ack() == (1, 1, [])
    assert r.accept(2, "b") == core.ACCEPTED and r.release() == ["b"]


def test_complete_out_of_order_and_ranges(core) -> None:
    r = core.InboundReorder(window=64)
    for s in range(1, 11):
        r.accept(s, s)
    r.release()
    for s in (2, 3, 5, 8, 9, 10):
        assert r.complete(s)
    assert r.ack() == (0, 10, [(2, 3), (5, 5), (8, 10)])
    assert not r.complete(3)  # twice
    assert not r.complete(11)  # never released
    assert not r.complete(0)
    assert r.complete(1)
    assert r.ack() == (3, 10, [(5, 5), (8, 10)])
    assert r.complete_many([4, 6, 7, 7]) == 3
    assert r.ack() == (10, 10, [])
    assert r.stats().completed == 10


def test_complete_only_after_release(core) -> None:
    r = core.InboundReorder(window=8)
    r.accept(2, "b")  # buffered, not released (1 missing)
    assert not r.complete(2)
    assert r.stats().completed == 0


def test_ack_ranges_are_capped(core) -> None:
    r = core.InboundReorder(window=1000)
    for s in range(1, 201):
        r.accept(s, s)
    r.release()
    for s in range(2, 201, 2):  # 100 separate ranges above cumulative 0
        r.complete(s)
    cum, rec, ranges = r.ack()
    assert (cum, rec) == (0, 200) and len(ranges) == core.MAX_ACK_RANGES
    assert ranges == [(s, s) for s in range(2, 2 + 2 * core.MAX_ACK_RANGES, 2)]
    assert core.decode_ack(r.ack_frame()) == (cum, rec, ranges)


def test_acks_take_turns_with_more_ranges_than_one_carries_so_the_sender_hears_of_every_done_one(core) -> None:
    # an envelope whose partition waits for a hand-over holds the cumulative ack for seconds while
    # those around it are done: always the lowest 32 ranges, the sender never heard of the rest, and
    # sent them all again (to be run twice) when either end started a new life (a long partition's
    # heal, durable instances with standby copies: hundreds of events)
    r = core.InboundReorder(window=1000)
    window = core.OutboundWindow(max_messages=1000, rto=1.0)
    for s in range(1, 201):
        window.append(1, 0, b"T", b"k", 0, s.to_bytes(16, "little"), Z, Z, b"x", now=0.0)
        r.accept(s, s)
    r.release()
    for s in range(2, 201, 2):  # 100 separate ranges above cumulative 0: every odd one waits
        r.complete(s)
    sent = []
    while r.ack_pending:
        frame = r.ack_frame()
        sent.append(core.decode_ack(frame)[2])
        window.on_ack_frame(frame, 0, now=0.1)
    assert [len(ranges) for ranges in sent] == [32, 32, 32, 4]
    assert [lo for ranges in sent for lo, _ in ranges] == list(range(2, 201, 2)), "each done one, once"
    assert window.in_flight == 100 and sorted(int.from_bytes(e[:8], "little") for e in window.unacked()) == \
        list(range(1, 201, 2)), "the sender holds only what is not done"
    assert r.ack()[2][0] == (2, 2), "then from the bottom again (an ack lost on the way is made up for)"


def test_ack_pending_flag(core) -> None:
    r = core.InboundReorder(window=8)
    assert not r.ack_pending
    r.accept(1, "a")
    assert not r.ack_pending  # arrival alone: nothing to acknowledge yet
    r.release()
    assert r.ack_pending
    assert r.ack_frame() == core.encode_ack(0, 1, [])
    assert not r.ack_pending
    r.complete(1)
    assert r.ack_pending
    assert core.decode_ack(r.ack_frame()) == (1, 1, [])


def test_first_seq(core) -> None:
    r = core.InboundReorder(window=8, first_seq=100)
    assert r.accept(99, "old") == core.DUPLICATE
    assert r.accept(100, "a") == core.ACCEPTED
    assert r.release() == ["a"]
    assert r.ack() == (99, 100, [])


def test_seq_is_u64(core) -> None:
    r = core.InboundReorder()
    with pytest.raises(OverflowError):
        r.accept(-1, "x")
    with pytest.raises(OverflowError):
        r.complete(-1)


def test_stats_fields(core) -> None:
    r = core.InboundReorder(window=8)
    r.accept(1, "a")
    r.accept(3, "c")
    r.accept(3, "c")
    r.accept(20, "z")
    r.release()
    r.complete(1)
    s = r.stats()
    assert s == (1, 1, 1, 8, 2, 1, 1, 1, 1)
    assert s._fields == ("released_upto", "done_upto", "buffered", "window", "accepted", "duplicates",
                         "beyond_window", "released", "completed")


# -- feeding batch bodies ----------------------------------------------------------------------------


def test_feed_releases_envelopes_in_order(core) -> None:
    r = core.InboundReorder(window=16)
    assert [e.seq for e in r.feed(raw(core, 2) + raw(core, 3))] == []
    out = r.feed(b"pre" + raw(core, 1) + raw(core, 2), 3)
    assert [e.seq for e in out] == [1, 2, 3]
    assert [e.payload for e in out] == [b"1", b"2", b"3"]
    assert r.stats().duplicates == 1
    assert r.complete_envelopes(out) == 3
    assert r.ack() == (3, 3, [])
    assert r.complete_envelopes(out) == 0


def test_feed_counts_refusals_without_keeping_them(core) -> None:
    r = core.InboundReorder(window=2)
    out = r.feed(raw(core, 1) + raw(core, 1) + raw(core, 3) + raw(core, 2))
    assert [e.seq for e in out] == [1, 2]
    s = r.stats()
    assert (s.accepted, s.duplicates, s.beyond_window) == (2, 1, 1)


def _simulate(core, frames: list[bytes], whole: bool, window: int):
    """Feed each frame whole or envelope by envelope; complete at the same points either way (after a frame)."""
    r = core.InboundReorder(window=window)
    released = []
    for n, frame in enumerate(frames):
        pieces = [frame] if whole else [e.raw for e in core.parse_envelopes(frame)]
        out = []
        for piece in pieces:
            out.extend(r.feed(piece))
        released.extend((e.seq, e.payload) for e in out)
        # every other frame completes what it released; the others leave it in progress a while
        if n % 2 == 0:
            r.complete_envelopes(out)
        else:
            r.complete_many([s for s, _ in released])
    return released, r.stats(), r.ack()


@pytest.mark.parametrize("seed", range(5))
def test_feed_whole_vs_one_envelope_at_a_time(core, seed: int) -> None:
    rng = random.Random(seed)
    seqs = list(range(1, 121))
    arrivals = seqs + rng.sample(seqs, 30)  # duplicates
    rng.shuffle(arrivals)
    frames = []
    i = 0
    while i < len(arrivals):
        n = rng.randrange(1, 20)
        frames.append(b"".join(raw(core, s) for s in arrivals[i : i + n]))
        i += n
    whole = _simulate(core, frames, True, window=200)
    single = _simulate(core, frames, False, window=200)
    assert whole == single
    assert [s for s, _ in whole[0]] == seqs


def test_feed_whole_vs_single_with_a_small_window(core) -> None:
    # refusals beyond the window and duplicates come out the same either way
    frames = [b"".join(raw(core, s) for s in seqs) for seqs in ((3, 1, 2, 4, 9, 5), (5, 6, 9, 7), (8, 9, 8), (10,))]
    whole = _simulate(core, frames, True, window=4)
    assert whole == _simulate(core, frames, False, window=4)
    assert whole[1].beyond_window > 0 and whole[1].duplicates > 0
