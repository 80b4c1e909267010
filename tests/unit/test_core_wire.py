"""Envelopes, batch bodies and acks on the wire, and their malformed forms, against both cores."""

from __future__ import annotations

import struct

import pytest

from choreo import _core, _pycore

Z = bytes(16)
MID = bytes(range(16))
TID = bytes(range(16, 32))
CID = bytes(range(32, 48))


@pytest.fixture(params=[_core, _pycore], ids=["compiled", "pure"])
def core(request):
    return request.param


def env(core, seq: int = 1, type: bytes = b"OrderPlaced", key: bytes = b"k1", payload: bytes = b"body", **kw) -> bytes:
    args = dict(kind=1, flags=0, partition=7, msg_id=MID, trace_id=TID, cause_id=CID)
    args.update(kw)
    return core.pack_envelope(seq, args["kind"], args["flags"], type, key, args["partition"], args["msg_id"],
                              args["trace_id"], args["cause_id"], payload)


def test_layout_is_the_documented_one(core) -> None:
    raw = env(core, seq=0x0102030405060708, type=b"T", key=b"kk", payload=b"ppp", kind=3, flags=0x81, partition=513)
    assert core.HEADER_SIZE == 68
    assert len(raw) == 68 + 1 + 2 + 3
    seq, plen, klen, part, kind, flags, tlen, zero = struct.unpack_from("<QIHHBBBB", raw)
    assert (seq, plen, klen, part, kind, flags, tlen, zero) == (0x0102030405060708, 3, 2, 513, 3, 0x81, 1, 0)
    assert raw[20:36] == MID and raw[36:52] == TID and raw[52:68] == CID
    assert raw[68:] == b"Tkkppp"
    assert raw == env(_pycore, seq=0x0102030405060708, type=b"T", key=b"kk", payload=b"ppp", kind=3, flags=0x81,
                      partition=513)


def test_parse_round_trip(core) -> None:
    body = b"".join(env(core, seq=i, key=b"k%d" % i, payload=b"p" * i) for i in range(1, 6))
    envs = core.parse_envelopes(body)
    assert [e.seq for e in envs] == [1, 2, 3, 4, 5]
    e = envs[2]
    assert (e.kind, e.flags, e.partition, e.type, e.key, e.payload) == (1, 0, 7, "OrderPlaced", b"k3", b"ppp")
    assert (e.msg_id, e.trace_id, e.cause_id) == (MID, TID, CID)
    assert e.raw == env(core, seq=3, key=b"k3", payload=b"ppp")
    assert e.size == len(e.raw)
    assert "OrderPlaced" in repr(e)


def test_parse_accepts_bytes_like_and_offset(core) -> None:
    body = env(core, seq=1) + env(core, seq=2)
    assert [e.seq for e in core.parse_envelopes(bytearray(b"HDR" + body), 3)] == [1, 2]
    assert [e.seq for e in core.parse_envelopes(memoryview(body))] == [1, 2]
    assert core.parse_envelopes(b"") == []
    assert core.parse_envelopes(body, len(body)) == []


def test_type_name_with_invalid_utf8_is_replaced(core) -> None:
    (e,) = core.parse_envelopes(env(core, type=b"Bad\xff"))
    assert e.type == "Bad\ufffd"


def test_envelope_constructor_decodes_exactly_one(core) -> None:
    raw = env(core, seq=9, key=b"key", payload=b"x" * 100)
    e = core.Envelope(raw)
    assert (e.seq, e.key, e.payload, e.raw) == (9, b"key", b"x" * 100, raw)
    for bad in (b"", raw[:-1], raw + raw, raw[:67]):
        with pytest.raises(core.MalformedFrame) as info:
            core.Envelope(bad)
        assert info.value.reason == "truncated"


def malformed_bodies(core):
    good = env(core, seq=1)
    bad_kind = bytearray(env(core, seq=2))
    bad_kind[16] = 0
    big_kind = bytearray(env(core, seq=2))
    big_kind[16] = 16
    no_type = bytearray(env(core, seq=2, type=b"T"))
    no_type[18] = 0
    claims_more = bytearray(env(core, seq=2))
    claims_more[8:12] = (10**6).to_bytes(4, "little")
    return {
        "short header": (good + good[:40], "truncated"),
        "kind 0": (good + bytes(bad_kind), "bad_kind"),
        "kind 16": (good + bytes(big_kind), "bad_kind"),
        "empty type": (good + bytes(no_type), "bad_type"),
        "length past the end": (good + bytes(claims_more), "truncated"),
        "cut payload": (good + env(core, seq=2)[:-1], "truncated"),
    }


@pytest.mark.parametrize("case", ["short header", "kind 0", "kind 16", "empty type", "length past the end",
                                  "cut payload"])
def test_malformed_batch_raises_with_reason_and_accepts_nothing(core, case: str) -> None:
    body, reason = malformed_bodies(core)[case]
    with pytest.raises(core.MalformedFrame) as info:
        core.parse_envelopes(body)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason + ": ")
    assert isinstance(info.value, ValueError)
    r = core.InboundReorder(window=16)
    with pytest.raises(core.MalformedFrame):
        r.feed(body)
    # the valid first envelope was not accepted either
    assert r.stats() == core.InboundReorder(window=16).stats()
    assert r.release() == [] and not r.ack_pending
    w = core.OutboundWindow()
    with pytest.raises(core.MalformedFrame):
        w.append_raw(body, 0.0)
    assert w.stats() == core.OutboundWindow().stats()


@pytest.mark.parametrize("offset", [-1, 5])
def test_offset_outside_frame(core, offset: int) -> None:
    with pytest.raises(core.MalformedFrame) as info:
        core.parse_envelopes(b"abcd", offset)
    assert info.value.reason == "truncated"


def test_parse_refuses_non_bytes(core) -> None:
    with pytest.raises(TypeError):
        core.parse_envelopes(5)  # not five zero bytes


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("kind", 0, "kind must be in 1..15"),
        ("kind", 16, "kind must be in 1..15"),
        ("flags", 256, "flags must fit in one byte"),
        ("flags", -1, "flags must fit in one byte"),
        ("type", b"", "type must be 1 to 255 bytes"),
        ("type", b"t" * 256, "type must be 1 to 255 bytes"),
        ("key", b"k" * 65536, "key must be at most 65535 bytes"),
        ("partition", 65536, "partition must be in 0..65535"),
        ("partition", -1, "partition must be in 0..65535"),
        ("msg_id", b"short", "msg_id must be 16 bytes"),
        ("trace_id", b"x" * 17, "trace_id must be 16 bytes"),
        ("cause_id", b"", "cause_id must be 16 bytes"),
    ],
)
def test_pack_envelope_argument_errors(core, field: str, value, message: str) -> None:
    args = dict(seq=1, kind=1, flags=0, type=b"T", key=b"", partition=0, msg_id=Z, trace_id=Z, cause_id=Z,
                payload=b"")
    args[field] = value
    with pytest.raises(ValueError, match=message):
        core.pack_envelope(**args)
    w = core.OutboundWindow()
    del args["seq"]
    with pytest.raises(ValueError, match=message):
        w.append(**args, now=0.0)
    assert w.next_seq == 1 and w.pending == 0


@pytest.mark.parametrize("seq", [-1, 1 << 64])
def test_pack_envelope_seq_is_u64(core, seq: int) -> None:
    with pytest.raises(OverflowError):
        core.pack_envelope(seq, 1, 0, b"T", b"", 0, Z, Z, Z, b"")


# -- acks -------------------------------------------------------------------------------------------


def test_ack_round_trip_and_layout(core) -> None:
    frame = core.encode_ack(41, 47, [(44, 45), (47, 47)])
    assert frame == struct.pack("<QQH", 41, 47, 2) + struct.pack("<QQ", 44, 45) + struct.pack("<QQ", 47, 47)
    assert core.decode_ack(frame) == (41, 47, [(44, 45), (47, 47)])
    assert core.decode_ack(b"xx" + frame, 2) == (41, 47, [(44, 45), (47, 47)])
    assert core.decode_ack(bytearray(frame)) == (41, 47, [(44, 45), (47, 47)])
    assert core.decode_ack(core.encode_ack(0, 0)) == (0, 0, [])
    top = (1 << 64) - 1
    assert core.decode_ack(core.encode_ack(top, top, [(top, top)])) == (top, top, [(top, top)])


def test_encode_ack_keeps_the_lowest_ranges(core) -> None:
    ranges = [(10 * i, 10 * i + 1) for i in range(1, 40)]
    cum, rec, got = core.decode_ack(core.encode_ack(1, 500, ranges))
    assert got == ranges[: core.MAX_ACK_RANGES] and core.MAX_ACK_RANGES == 32


@pytest.mark.parametrize("bad", [(-1, 0, []), (0, 1 << 64, []), (0, 0, [(0, -1)])])
def test_encode_ack_values_are_u64(core, bad) -> None:
    with pytest.raises(OverflowError):
        core.encode_ack(*bad)


def malformed_acks():
    good = struct.pack("<QQH", 3, 5, 1) + struct.pack("<QQ", 5, 5)
    return {
        "empty": (b"", "truncated"),
        "short head": (good[:17], "truncated"),
        "missing range": (good[:-1], "truncated"),
        "trailing byte": (good + b"\x00", "truncated"),
        "too many ranges": (struct.pack("<QQH", 3, 5, 33) + struct.pack("<QQ", 5, 5) * 33, "bad_ack"),
        "reversed range": (struct.pack("<QQH", 3, 9, 2) + struct.pack("<QQ", 5, 5) + struct.pack("<QQ", 9, 7),
                           "bad_ack"),
    }


@pytest.mark.parametrize("case", list(malformed_acks()))
def test_malformed_ack_raises_with_reason_and_changes_nothing(core, case: str) -> None:
    frame, reason = malformed_acks()[case]
    with pytest.raises(core.MalformedFrame) as info:
        core.decode_ack(frame)
    assert info.value.reason == reason
    w = core.OutboundWindow(max_messages=8)
    for _ in range(6):
        w.append(1, 0, b"T", b"", 0, Z, Z, Z, b"x", 0.0)
    w.flush()
    before = w.stats()
    with pytest.raises(core.MalformedFrame):
        w.on_ack_frame(frame, 0, 1.0)
    assert w.stats() == before
    assert w.due(10.0) is not None  # nothing was marked received either


@pytest.mark.parametrize("offset", [-1, 100])
def test_ack_offset_outside_frame(core, offset: int) -> None:
    frame = core.encode_ack(1, 1)
    with pytest.raises(core.MalformedFrame) as info:
        core.decode_ack(frame, offset)
    assert info.value.reason == "truncated"


def _reply(msg_id: bytes, type_name: bytes, body: bytes) -> bytes:
    return msg_id + bytes([len(type_name)]) + type_name + struct.pack("<I", len(body)) + body


def test_reply_entries_decode_in_order_from_an_offset(core) -> None:
    frame = b"head" + _reply(b"a" * 16, b"Echo", b"\x01\xc0") + _reply(b"b" * 16, b"", b"") + _reply(b"c" * 16, b"T\xff", b"x" * 300)
    assert core.decode_replies(frame, 4) == [(b"a" * 16, "Echo", b"\x01\xc0"), (b"b" * 16, "", b""), (b"c" * 16, "T\ufffd", b"x" * 300)]
    assert core.decode_replies(bytearray(frame), 4) == core.decode_replies(frame[4:])
    assert core.decode_replies(frame, len(frame)) == []


@pytest.mark.parametrize("cut", [1, 16, 17, 20, 21, 22, 25])
def test_a_reply_entry_cut_short_is_malformed_whatever_it_lost(core, cut: int) -> None:
    whole = _reply(b"a" * 16, b"Echo", b"\x01\xc0\xc0")  # 16 + 1 + 4 + 4 + 3 = 28 bytes
    with pytest.raises(core.MalformedFrame) as err:
        core.decode_replies(_reply(b"z" * 16, b"Ok", b"") + whole[:cut])
    assert err.value.reason == "truncated"


def test_a_reply_body_longer_than_the_frame_is_malformed_and_offsets_are_checked(core) -> None:
    with pytest.raises(core.MalformedFrame, match="overruns"):
        core.decode_replies(b"a" * 16 + b"\x00" + struct.pack("<I", 0xFFFFFFFF) + b"xy")
    for offset in (-1, 3):
        with pytest.raises(core.MalformedFrame, match="beyond"):
            core.decode_replies(b"xy", offset)
