"""Issue 3: bad input is refused with a counted reason, and the node keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import time

import msgspec
import pytest
import zmq

from choreo import MessageTooLarge, core, wire
from choreo.cli import main
from choreo.client import rpc
from choreo.node import Node

from .recording import OrderAccepted, PlaceOrder, orders

pytestmark = pytest.mark.slow


def _wait_refused(endpoint: str, reason: str, at_least: int = 1, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = rpc(endpoint, "stats")
        if stats["refused"].get(reason, 0) >= at_least:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {at_least} refusals for {reason!r} within {timeout} s, got {stats['refused']}")
        time.sleep(0.02)  # polling another process's counter: nothing to wait on locally


def _envelope(type_name: str, kind: int, payload: bytes, seq: int) -> bytes:
    return core.pack_envelope(seq, kind, 0, type_name.encode(), b"k", 0, os.urandom(16), os.urandom(16), bytes(16), payload)


def test_garbage_version_unknown_type_bad_field_and_oversized_are_refused(procs, capsys) -> None:
    server = procs.start(orders)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    # a stable connection identity across reconnects, as choreo's own dealers have: the node binds a
    # sender to the connection it joined on, and a reconnect under another identity is someone else
    raw.setsockopt(zmq.ROUTING_ID, b"\x01raw-test-dealer")
    raw.connect(server.endpoint)
    me = int.from_bytes(os.urandom(8), "little") | 1
    try:
        # 1. bytes that are not choreo at all
        raw.send(b"GET / HTTP/1.1\r\n\r\n")
        _wait_refused(server.endpoint, "malformed")
        raw.send_multipart([b"one", b"two", b"three"])
        _wait_refused(server.endpoint, "malformed", 2)
        # 2. a choreo header with a protocol version from the future
        raw.send(wire.HEADER.pack(b"CHRO", 99, wire.DATA, 0, me, 0) + b"\x00" * 40)
        _wait_refused(server.endpoint, "version")
        # 3. data from a peer that never said hello
        raw.send(wire.frame(wire.DATA, me, 0, _envelope("PlaceOrder", wire.KIND_COMMAND, b"\x80", 1)))
        _wait_refused(server.endpoint, "unknown_peer")
        # say hello as a client (its endpoint is never dialled successfully: acks go nowhere)
        hello = wire.Hello(node="raw#1", incarnation=me, endpoint="tcp://127.0.0.1:9", service=None,
                           window=1024, max_message_bytes=1 << 20)
        raw.send(wire.encode_control(wire.HELLO, me, 0, hello))
        # 4. an envelope of a type the service does not handle
        raw.send(wire.frame(wire.DATA, me, 0, _envelope("LaunchRocket", wire.KIND_COMMAND, b"\x80", 1)))
        _wait_refused(server.endpoint, "unknown_type")
        # 5. a known type whose field has the wrong type
        bad = msgspec.msgpack.encode({"customer_id": 5, "cart_id": "c", "request_id": "r"})
        raw.send(wire.frame(wire.DATA, me, 0, _envelope("PlaceOrder", wire.KIND_COMMAND, bad, 2)))
        stats = _wait_refused(server.endpoint, "invalid_payload")
        # 6. a truncated batch
        raw.send(wire.frame(wire.DATA, me, 0, _envelope("PlaceOrder", wire.KIND_COMMAND, bad, 3)[:-5]))
        _wait_refused(server.endpoint, "malformed", 3)
        # 7. an envelope over the 1 MB message limit, in a frame the transport lets through
        big = _envelope("PlaceOrder", wire.KIND_COMMAND, bytes(1100 << 10), 3)  # 3: the truncated one never arrived
        raw.send(wire.frame(wire.DATA, me, 0, big), copy=False)
        _wait_refused(server.endpoint, "oversized", timeout=30)
        # 8. 100 MB: over the transport's message limit (the engine's frame limit), so ZeroMQ drops
        # the connection before the frame is read; it never reaches the engine (not counted by reason)
        raw.send(wire.frame(wire.DATA, me, 0, bytes(100 << 20)), copy=False)
        raw.send(wire.frame(wire.DATA, me, 0, _envelope("LaunchRocket", wire.KIND_COMMAND, b"\x80", 4)))
        stats = _wait_refused(server.endpoint, "unknown_type", 2, timeout=30)  # the reconnected socket still works
        assert stats["refused"]["oversized"] == 1, "the 100 MB frame reached the engine"
    finally:
        raw.close(0)

    # the node still serves the next good message
    async def good() -> None:
        async with Node(None, peers=[server.endpoint]) as client:
            await client.wait_for({"orders": 1}, timeout=20)
            result = await client.send(PlaceOrder(customer_id="c-1", cart_id="cart-9", request_id="r1"), timeout=10)
            assert result == OrderAccepted(order_id="order-cart-9", attempt_request_id="r1")
            # the sender refuses to send what the receiver would refuse, and loses nothing
            with pytest.raises(MessageTooLarge):
                await client.send(PlaceOrder(customer_id="c-1", cart_id="x" * (2 << 20), request_id="r2"))

    asyncio.run(asyncio.wait_for(good(), 60))
    assert server.alive()

    # choreo top shows the refusals: a column with their total, the reasons in --json (the raw
    # client's endpoint answers nobody: top waits --timeout for it, a short one, then only
    # half a second at each later sample)
    refused = rpc(server.endpoint, "stats")["refused"]
    capsys.readouterr()
    top = ["top", "--peer", server.endpoint, "--once", "--interval", "0.1", "--timeout", "1"]
    assert main([*top, "--color", "never"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("SERVICE / INSTANCE"))
    (row,) = [line for line in lines if line.startswith("orders ")]
    column = header.index("REFUSED") + len("REFUSED")
    assert row[: column].split()[-1] == str(sum(refused.values())) and sum(refused.values()) >= 8
    assert main([*top, "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    (service,) = view["services"]
    assert service["refused"] == refused and service["refused_total"] == sum(refused.values())
    assert view["unreachable"] and all("within 0.5 s" in u["error"] for u in view["unreachable"]), view["unreachable"]
