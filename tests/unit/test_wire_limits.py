"""choreo.wire at the door: endpoints (with their key names), and hellos and heartbeats bounded and validated."""

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
        "service": {"name": "orders", "partitions": 64}, "window": 1024, "max_message_bytes": 1 << 20, "peers": [],
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


def test_a_valid_hello_decodes() -> None:
    h = wire.decode_control(wire.HELLO, frame(wire.HELLO, hello(peers=[["orders-2@tcp://127.0.0.1:7002", 7, "orders"]])))
    assert h.endpoint == "tcp://127.0.0.1:7001" and h.peers[0].endpoint == "orders-2@tcp://127.0.0.1:7002"


@pytest.mark.parametrize("partitions", [0, -1, 65536, 1 << 40])
def test_partition_count_out_of_range_is_refused(partitions: int) -> None:
    exc = refused(wire.HELLO, hello(service={"name": "orders", "partitions": partitions}))
    assert exc.reason == "malformed" and "$.service.partitions" in exc.detail


def test_partition_count_is_checked_in_a_json_spec_too() -> None:
    with pytest.raises(msgspec.ValidationError, match="partitions"):
        SystemSpec.from_json(b'{"services": [{"name": "orders", "partitions": 0}]}')
    assert ServiceSpec("orders", partitions=65535).partitions == 65535


def test_too_many_peers_are_refused() -> None:
    peers = [[f"tcp://10.0.{i // 250}.{i % 250 + 1}:7000", i + 1, None] for i in range(wire.MAX_PEERS + 1)]
    exc = refused(wire.HELLO, hello(peers=peers))
    assert exc.reason == "malformed" and f"length <= {wire.MAX_PEERS}" in exc.detail
    assert refused(wire.HEARTBEAT, {"peers": peers}).reason == "malformed"
    assert wire.decode_control(wire.HELLO, frame(wire.HELLO, hello(peers=peers[: wire.MAX_PEERS]))).peers


@pytest.mark.parametrize("where", ["endpoint", "peer"])
def test_an_endpoint_that_does_not_parse_is_refused(where: str) -> None:
    bad = "tcp://127.0.0.1:99999"
    body = hello(endpoint=bad) if where == "endpoint" else hello(peers=[["tcp://127.0.0.1:7002", 2, None], [bad, 3, None]])
    exc = refused(wire.HELLO, body)
    assert exc.reason == "bad_endpoint"
    assert exc.detail == ("hello from orders#1: " + ("" if where == "endpoint" else "peer 1: ")
                          + "port 99999 out of range 1..65535 in tcp://127.0.0.1:99999")
    exc = refused(wire.HEARTBEAT, {"peers": [["garbage", 3, None]]})
    assert exc.reason == "bad_endpoint" and exc.detail.startswith("heartbeat: peer 0: 'garbage' is not")


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
