"""choreo.wire at the door: endpoints (with their key names), and membership frames bounded and validated."""

from __future__ import annotations

import msgspec
import pytest

from choreo import wire
from choreo.errors import ProtocolError
from choreo.spec import ServiceSpec, SystemSpec

ME = 0x1234


def hello(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "node": "orders#1", "incarnation": ME, "endpoint": "tcp://127.0.0.1:7001",
        "service": {"name": "orders", "partitions": 64}, "window": 1024, "max_message_bytes": 1 << 20,
    }
    body.update(changes)
    return body


def frame(frame_type: int, body: object) -> bytes:
    return wire.frame(frame_type, ME, 0, msgspec.msgpack.encode(body))


def refused(frame_type: int, body: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode_control(frame_type, frame(frame_type, body))
    return info.value


# ---------------------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://orders.internal:1", "tcp://eth0:65535",
    "ipc:///run/choreo/n1", "ipc://@abstract", "inproc://node-1",
    "orders-1@tcp://10.0.0.5:7001", "ops.2@ipc:///tmp/x",
])
def test_endpoints_a_node_can_be_dialled_at(endpoint: str) -> None:
    assert wire.endpoint_problem(endpoint) is None


@pytest.mark.parametrize("endpoint,problem", [
    ("tcp://127.0.0.1:99999", "port 99999 out of range 1..65535"),
    ("tcp://127.0.0.1:0", "port 0 out of range 1..65535"),
    ("tcp://*:7000", "names no host to dial"),
    ("tcp://[::1:80", "is not tcp://HOST:PORT"),
    ("tcp://no such host:1", "is not tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "is not tcp://HOST:PORT"),
    ("udp://127.0.0.1:1", "is not tcp://HOST:PORT"),
    ("a@b@tcp://127.0.0.1:1", "is not tcp://HOST:PORT"),
    ("bad key@tcp://127.0.0.1:1", "is not tcp://HOST:PORT"),
    ("tcp://h:1;127.0.0.1:2", "is not tcp://HOST:PORT"),
    ("inproc://" + "x" * 300, "endpoint of 309 characters"),
    (7000, "an endpoint is a string"),
])
def test_endpoints_that_are_refused_say_why(endpoint: object, problem: str) -> None:
    found = wire.endpoint_problem(endpoint)
    assert found is not None and problem in found, found


def test_bind_addresses_may_be_wildcards_and_port_zero() -> None:
    assert wire.endpoint_problem("tcp://*:0", bind=True) is None
    assert wire.endpoint_problem("tcp://0.0.0.0:0", bind=True) is None


def test_split_endpoint_reads_the_key_name() -> None:
    assert wire.split_endpoint("orders-1@tcp://10.0.0.5:7001") == ("orders-1", "tcp://10.0.0.5:7001")
    assert wire.split_endpoint("tcp://10.0.0.5:7001") == (None, "tcp://10.0.0.5:7001")
    assert wire.split_endpoint("ipc://@abstract") == (None, "ipc://@abstract")  # an '@' after the scheme is the address's


# ---------------------------------------------------------------------------------------- hello


def member(i: int, endpoint: str | None = None) -> wire.Member:
    return wire.Member(i + 1, 0, 0, endpoint or f"tcp://10.0.{i // 250}.{i % 250 + 1}:7000", f"n{i}", "orders")


def test_a_valid_hello_and_member_records_with_key_names_decode() -> None:
    h = wire.decode_control(wire.HELLO, frame(wire.HELLO, hello(endpoint="orders-1@tcp://127.0.0.1:7001")))
    assert h.endpoint == "orders-1@tcp://127.0.0.1:7001" and h.version == 0 and not h.sync
    keyed = member(1, "orders-2@tcp://127.0.0.1:7002")
    news = wire.decode_control(wire.NEWS, wire.encode_control(wire.NEWS, ME, 0, wire.News([keyed, wire.Retired("x")])))
    assert news.rumors == [keyed, wire.Retired("x")]
    ping = wire.decode_control(wire.PING, wire.encode_control(wire.PING, ME, 0, wire.Ping(7, keyed)))
    assert ping.source == keyed


@pytest.mark.parametrize("partitions", [0, -1, 65536, 1 << 40])
def test_partition_count_out_of_range_is_refused(partitions: int) -> None:
    exc = refused(wire.HELLO, hello(service={"name": "orders", "partitions": partitions}))
    assert exc.reason == "malformed" and "$.service.partitions" in exc.detail


def test_partition_count_is_checked_in_a_json_spec_too() -> None:
    with pytest.raises(msgspec.ValidationError, match="partitions"):
        SystemSpec.from_json(b'{"services": [{"name": "orders", "partitions": 0}]}')
    assert ServiceSpec("orders", partitions=65535).partitions == 65535


def test_too_many_members_or_rumors_are_refused() -> None:
    many = [member(i) for i in range(wire.MAX_MEMBERS + 1)]
    exc = refused(wire.SYNC, wire.Sync(members=many))
    assert exc.reason == "malformed" and f"length <= {wire.MAX_MEMBERS}" in exc.detail
    assert wire.decode_control(wire.SYNC, frame(wire.SYNC, wire.Sync(members=many[:1000]))).members[999] == many[999]
    exc = refused(wire.NEWS, wire.News(many[: wire.MAX_RUMORS + 1]))
    assert exc.reason == "malformed" and f"length <= {wire.MAX_RUMORS}" in exc.detail


@pytest.mark.parametrize("where", ["hello", "news", "sync", "ping", "ping_req"])
def test_an_endpoint_that_does_not_parse_is_refused(where: str) -> None:
    bad = "tcp://127.0.0.1:99999"
    problem = "port 99999 out of range 1..65535 in tcp://127.0.0.1:99999"
    good, wrong = member(1), member(2, bad)
    frame_type, body, what = {
        "hello": (wire.HELLO, hello(endpoint=bad), "hello from orders#1"),
        "news": (wire.NEWS, wire.News([good, wrong]), "news: member 1"),
        "sync": (wire.SYNC, wire.Sync(members=[good, wrong]), "sync: member 1"),
        "ping": (wire.PING, wire.Ping(1, wrong), "ping: source"),
        "ping_req": (wire.PING_REQ, wire.PingReq(1, wrong), "ping_req: target"),
    }[where]
    exc = refused(frame_type, body)
    assert exc.reason == "bad_endpoint" and exc.detail == f"{what}: {problem}"


def test_an_oversized_hello_is_refused_before_decoding() -> None:
    doc = "x" * (wire.MAX_CONTROL_BYTES[wire.HELLO] + 1)
    exc = refused(wire.HELLO, hello(service={"name": "orders", "doc": doc}))
    assert exc.reason == "oversized" and exc.detail.startswith("hello body of ")
    assert refused(wire.RPC, {"id": 1, "method": "stats", "args": {"x": "y" * (64 << 10)}}).reason == "oversized"


@pytest.mark.parametrize("field,value", [("window", 0), ("window", (1 << 20) + 1), ("max_message_bytes", 0),
                                         ("incarnation", -1), ("node", "n" * 201)])
def test_hello_numbers_and_names_are_bounded(field: str, value: object) -> None:
    assert refused(wire.HELLO, hello(**{field: value})).reason == "malformed"


def test_validation_happens_at_decoding_only() -> None:
    # the engine builds its own hellos; nothing here changes what it may construct and encode
    h = wire.Hello("n", 1, "tcp://127.0.0.1:1", None, 10, 10)
    assert wire.decode_control(wire.HELLO, wire.encode_control(wire.HELLO, 1, 0, h)) == h


def test_a_flows_frame_round_trips_and_is_bounded() -> None:
    body = wire.Flows("orders", [bytes(16), b"t" * 16])
    data = wire.encode_control(wire.FLOWS, ME, 7, body)
    assert wire.parse_header(data)[0] == wire.FLOWS and wire.decode_control(wire.FLOWS, data) == body
    huge = wire.frame(wire.FLOWS, ME, 7, b"\x00" * (wire.MAX_CONTROL_BYTES[wire.FLOWS] + 1))
    with pytest.raises(ProtocolError, match="oversized"):
        wire.decode_control(wire.FLOWS, huge)
    assert refused(wire.FLOWS, "abc").reason == "malformed"
