"""Issue 17, the network-facing half: CURVE on every socket, the principal of every frame, stable
connection identities, and limits at the transport's door. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from choreo import transport
from choreo.transport import ZmqTransport
from choreo.trust import Security, create_key

pytestmark = pytest.mark.slow

Frame = tuple[bytes, bytes, "str | None"]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A keys directory: 'server' and 'client' trusted; 'stranger' made elsewhere."""
    d = tmp_path / "keys"
    create_key(d, "server", serves=["orders"])
    create_key(d, "client", originates=["PlaceOrder"])
    create_key(tmp_path / "elsewhere", "stranger")
    return d


class Loop:
    """Transports driven by one event loop of the test's own, stepped with bounded waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.transports: list[ZmqTransport] = []

    def transport(self, security: Security | None = None, **kwargs) -> tuple[ZmqTransport, list[Frame]]:
        got: list[Frame] = []
        t = ZmqTransport(kwargs.pop("bind", "tcp://127.0.0.1:0"), security=security, **kwargs)
        t.start(self.loop, lambda data, identity, principal: got.append((data, identity, principal)), lambda: None)
        self.transports.append(t)
        return t, got

    def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout} s")
            self.tick(0.01)

    def tick(self, seconds: float) -> None:
        for t in self.transports:
            t.retry_parked()
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        for t in self.transports:
            t.close()
        self.loop.close()


@pytest.fixture(params=["compiled", "pyzmq"])
def io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loop]:
    """Each test runs with the transport's compiled reads and sends, and again through pyzmq."""
    if request.param == "pyzmq":
        monkeypatch.setattr(transport, "_zmqio", None)
        monkeypatch.setattr(transport, "_send_small", transport._send_copied)
    elif transport._zmqio is None:
        pytest.skip("choreo._zmqio is not in use (CHOREO_PURE=1)")
    loop = Loop()
    try:
        yield loop
    finally:
        loop.close()


def raw_dealer(**options) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


def address(endpoint: str) -> str:
    return endpoint.split("@", 1)[1] if "@" in endpoint.split("://")[0] else endpoint


# ---------------------------------------------------------------------------------------- CURVE


def test_a_trusted_key_is_the_principal_of_every_frame(io: Loop, keys: Path) -> None:
    server, got = io.transport(Security.load(keys, "server"))
    client, _ = io.transport(Security.load(keys, "client"))
    assert server.endpoint.startswith("server@tcp://127.0.0.1:")
    for i in range(200):
        client.send(server.endpoint, b"frame %d" % i)
    io.until(lambda: len(got) == 200, 10, "200 frames")
    assert [d for d, _, _ in got] == [b"frame %d" % i for i in range(200)]
    assert {p for _, _, p in got} == {"client"}
    assert {i for _, i, _ in got} == {client.routing_id(server.endpoint)}
    assert server.refused == {} and client.refused == {}


def test_without_a_key_nothing_reaches_the_node(io: Loop, keys: Path) -> None:
    server, got = io.transport(Security.load(keys, "server"))
    sent, deadline = 0, time.monotonic() + 10
    while sent == 0 and time.monotonic() < deadline:
        # a DEALER's pipe exists from connect() until its handshake fails (libzmq ends it on that
        # protocol error and never makes another): a busy machine can let the handshake fail
        # before the first send, so each try is a new socket whose sends follow its connect
        plain = raw_dealer()
        plain.connect(address(server.endpoint))
        try:
            for _ in range(10):
                plain.send(b"let me in", zmq.NOBLOCK)
                sent += 1
        except zmq.Again:
            pass
        io.tick(0.2)
        plain.close(0)
    io.tick(1.0)
    assert sent > 0, "no plain socket ever had a connection to send on"
    assert got == []


def test_an_untrusted_key_is_refused_at_the_handshake(io: Loop, keys: Path, tmp_path: Path) -> None:
    server, got = io.transport(Security.load(keys, "server"))
    shutil.copy(keys / "server.key", tmp_path / "elsewhere")  # the stranger knows whom it dials
    stranger, _ = io.transport(Security.load(tmp_path / "elsewhere", "stranger"))
    stranger.send(server.endpoint, b"let me in")
    io.until(lambda: server.refused["untrusted_key"] >= 1 and stranger.refused["key_refused"] >= 1, 10,
             "the handshake refused on both sides")
    io.tick(0.3)
    assert got == []


def test_a_node_that_does_not_hold_the_named_key_gets_nothing(io: Loop, keys: Path, tmp_path: Path) -> None:
    # an impostor listening where 'server' is expected: the client's handshake fails, nothing is sent to it
    impostor_dir = tmp_path / "impostor"
    create_key(impostor_dir, "server")
    impostor, got = io.transport(Security.load(impostor_dir, "server"))
    shutil.copy(keys / "client.key", impostor_dir)  # it would even admit the client
    client, _ = io.transport(Security.load(keys, "client"))
    client.send(impostor.endpoint, b"secret")
    io.tick(1.0)
    assert got == []


def test_a_key_added_after_a_refusal_gets_through(io: Loop, keys: Path, tmp_path: Path) -> None:
    # libzmq never redials after its key was refused; the transport does, after a back-off
    late = tmp_path / "late"
    create_key(late, "late")
    shutil.copy(keys / "server.key", late)
    server, got = io.transport(Security.load(keys, "server"))
    newcomer, _ = io.transport(Security.load(late, "late"))
    newcomer.send(server.endpoint, b"first")
    io.until(lambda: newcomer.refused["key_refused"] >= 1, 10, "the refusal")
    newcomer.send(server.endpoint, b"second")  # parked meanwhile
    shutil.copy(late / "late.key", keys)  # the operator trusts it now
    io.until(lambda: len(got) >= 1, 10, "the frames after the key was trusted")
    io.tick(0.2)
    assert [d for d, _, _ in got] == [b"second"] and got[0][2] == "late"


def test_without_security_the_principal_is_none(io: Loop) -> None:
    server, got = io.transport()
    client, _ = io.transport()
    client.send(server.endpoint, b"x")
    io.until(lambda: got, 5, "a frame")
    assert got == [(b"x", client.routing_id(server.endpoint), None)]


# ---------------------------------------------------------------------------------------- identities


def test_a_connection_keeps_its_identity_across_reconnects(io: Loop, keys: Path) -> None:
    server, got = io.transport(Security.load(keys, "server"))
    client, _ = io.transport(Security.load(keys, "client"))
    client.send(server.endpoint, b"before")
    io.until(lambda: got, 5, "the first frame")
    bind = address(server.endpoint)
    server.close()  # the peer restarts on the same address; the DEALER redials by itself
    io.transports.remove(server)
    again, got2 = io.transport(Security.load(keys, "server"), bind=bind)
    client.send(server.endpoint, b"after")
    io.until(lambda: got2, 10, "a frame after the reconnect")
    assert got[0][1] == got2[0][1] == client.routing_id(server.endpoint)
    assert got2[0][2] == "client"


def test_identities_are_unguessable_and_differ_per_endpoint_and_incarnation(io: Loop) -> None:
    a, _ = io.transport()
    b, _ = io.transport()
    ids = {a.routing_id("tcp://127.0.0.1:7001"), a.routing_id("tcp://127.0.0.1:7002"), b.routing_id("tcp://127.0.0.1:7001")}
    assert len(ids) == 3 and all(len(i) == 17 and i[0] != 0 for i in ids)
    assert a.routing_id("tcp://127.0.0.1:7001") == a.routing_id("tcp://127.0.0.1:7001")
    before = a.routing_id("tcp://127.0.0.1:7001")
    a.renew_identity()
    assert a.routing_id("tcp://127.0.0.1:7001") != before


def test_libzmq_without_handover_ignores_a_duplicate_identity_forever() -> None:
    # why the transport's ROUTER runs with ROUTER_HANDOVER on: without it a second connection
    # presenting an identity in use is never read, not even after the first one has gone
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:0")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    first, second = raw_dealer(ROUTING_ID=b"\x01same"), raw_dealer(ROUTING_ID=b"\x01same")
    try:
        first.connect(endpoint)
        first.send(b"from the first")
        assert router.poll(5000) and router.recv_multipart() == [b"\x01same", b"from the first"]
        second.connect(endpoint)
        time.sleep(0.2)  # no condition to poll: the point is that nothing arrives
        second.send(b"from the second")
        assert not router.poll(500)
        first.close(0)
        time.sleep(0.3)
        second.send(b"from the second, alone now")
        assert not router.poll(1000), "libzmq now reads a duplicate routing id: revisit ROUTER_HANDOVER"
    finally:
        for s in (first, second, router):
            s.close(0)


def test_a_quick_reconnect_under_the_same_identity_loses_nothing(io: Loop) -> None:
    server, got = io.transport()
    for i in range(30):  # close, and at once dial again with the same identity (a redialling peer)
        d = raw_dealer(ROUTING_ID=b"c-same-identity")
        d.connect(server.endpoint)
        d.send(b"%d" % i)
        io.until(lambda: len(got) == i + 1, 5, f"frame {i} after a reconnect")
        d.close(0)
    assert {identity for _, identity, _ in got} == {b"c-same-identity"}


# ---------------------------------------------------------------------------------------- limits


def test_a_message_over_the_limit_never_reaches_the_node(io: Loop) -> None:
    server, got = io.transport(max_bytes=64 << 10)
    client, _ = io.transport()
    client.send(server.endpoint, bytes(100 << 10))  # ZeroMQ drops the connection instead of reading it
    client.send(server.endpoint, b"small")  # the DEALER redials; this one arrives
    io.until(lambda: got, 10, "the small frame")
    io.tick(0.2)
    assert [d for d, _, _ in got] == [b"small"]


def test_frames_of_every_size_arrive_whole_and_in_order(io: Loop) -> None:
    # under 64 KiB a frame is copied into ZeroMQ, from there on handed over without a copy
    server, got = io.transport()
    client, _ = io.transport()
    sizes = [0, 1, 100, 65535, 65536, 1 << 20, 7]
    frames = [bytes([i]) * size for i, size in enumerate(sizes)]
    for frame in frames:
        client.send(server.endpoint, frame)
    io.until(lambda: len(got) == len(frames), 10, "every frame")
    assert [d for d, _, _ in got] == frames and server.refused == {} and client.dropped == 0


def test_a_multipart_message_is_read_whole_and_handed_over_as_one_bad_frame(io: Loop) -> None:
    server, got = io.transport()
    stranger = raw_dealer()
    try:
        stranger.connect(address(server.endpoint))
        stranger.send_multipart([b"one", b"two", b"three"])
        stranger.send(b"after")
        io.until(lambda: len(got) == 2, 5, "the multipart message and the frame after it")
    finally:
        stranger.close(0)
    assert [d for d, _, _ in got] == [b"\x00multipart", b"after"]  # (the engine refuses the first as malformed)


def test_parked_bytes_are_capped_per_peer(io: Loop) -> None:
    client, _ = io.transport(hwm=4, max_parked_bytes=100_000)
    nobody = "tcp://127.0.0.1:9"  # nothing listens: ZeroMQ takes hwm frames, the rest parks
    for i in range(100):
        client.send(nobody, bytes([i]) * 10_000)
    assert client.parked_bytes[nobody] <= 100_000
    assert len(client.parked[nobody]) == 10 and client.dropped >= 100 - 10 - 4
    assert client.parked[nobody][-1][0] == 99  # the newest stay, the oldest went (retransmission recovers them)
    client.retry_parked()
    assert client.parked_bytes[nobody] == sum(map(len, client.parked[nobody]))


def test_endpoints_zeromq_rejects_are_counted_refusals(io: Loop, keys: Path) -> None:
    plain, _ = io.transport(max_peers=2)
    for bad in ["tcp://127.0.0.1:99999", "tcp://[::1:80", "garbage", "tcp://no such host:1"]:
        assert plain.connect(bad) is False
        plain.send(bad, b"x")
    assert plain.refused["bad_endpoint"] == 8 and plain.dealers == {}
    assert plain.connect("tcp://127.0.0.1:9") and plain.connect("tcp://127.0.0.1:10")
    plain.send("tcp://127.0.0.1:9", b"x")  # used last: the other one goes to make room
    assert plain.connect("tcp://127.0.0.1:11") and set(plain.dealers) == {"tcp://127.0.0.1:9", "tcp://127.0.0.1:11"}
    assert plain.evicted == 1 and not plain.refused["too_many_peers"]
    assert plain.connect("k@tcp://127.0.0.1:12") is False and plain.refused["needs_keys"] == 1
    secure, _ = io.transport(Security.load(keys, "client"))
    assert secure.connect("tcp://127.0.0.1:12") is False and secure.refused["no_key"] == 1
    assert secure.connect("nobody@tcp://127.0.0.1:12") is False and secure.refused["untrusted_key"] == 1


def test_an_exception_in_the_frame_callback_is_counted_and_reading_goes_on(io: Loop) -> None:
    got: list[bytes] = []

    def on_frame(data: bytes, identity: bytes, principal: str | None) -> None:
        if data == b"boom":
            raise RuntimeError("a bug in the engine")
        got.append(data)

    server = ZmqTransport("tcp://127.0.0.1:0")
    io.transports.append(server)
    server.start(io.loop, on_frame, lambda: None)
    client, _ = io.transport()
    for data in (b"one", b"boom", b"two"):
        client.send(server.endpoint, data)
    io.until(lambda: len(got) == 2, 5, "the frames around the failing one")
    assert got == [b"one", b"two"] and server.refused["internal_error"] == 1


def test_a_transport_closed_by_a_frame_stops_reading_without_complaint(io: Loop) -> None:
    got: list[bytes] = []
    server = ZmqTransport("tcp://127.0.0.1:0")

    def on_frame(data: bytes, identity: bytes, principal: str | None) -> None:
        got.append(data)
        if data == b"stop":
            server.close()  # (as a node does when a frame tells it it was declared dead)

    io.transports.append(server)
    server.start(io.loop, on_frame, lambda: None)
    client, _ = io.transport()
    for data in (b"one", b"stop", b"two"):
        client.send(server.endpoint, data)
    io.until(lambda: b"stop" in got, 5, "the frame that closes the transport")
    io.tick(0.2)
    assert got == [b"one", b"stop"] and server.refused == {}


def test_running_out_of_descriptors_never_raises(tmp_path: Path) -> None:
    # a process with a small descriptor limit: the dials that cannot get a socket are refused and
    # counted, nothing raises out of connect/send, and dialling works again once descriptors are free
    script = textwrap.dedent("""
        import asyncio, resource, sys, time
        from choreo.transport import ZmqTransport
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        loop = asyncio.new_event_loop()
        t = ZmqTransport("tcp://127.0.0.1:0")
        t.start(loop, lambda *a: None, lambda: None)
        for port in range(20000, 20300):
            t.connect(f"tcp://127.0.0.1:{port}")
            t.send(f"tcp://127.0.0.1:{port}", b"x")
        opened, refused = len(t.dealers), t.refused["no_socket"]
        for endpoint in list(t.dealers)[:50]:
            t.disconnect(endpoint)
        deadline = time.monotonic() + 10  # libzmq frees a closed socket's descriptors in its reaper thread
        while not (again := t.connect("tcp://127.0.0.1:30000")) and time.monotonic() < deadline:
            time.sleep(0.05)
        t.close()
        print(opened, refused, again)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr
    opened, refused, again = done.stdout.split()
    assert 0 < int(opened) < 300 and int(refused) >= 300 - int(opened), done.stdout
    assert again == "True"


def test_a_key_deleted_from_the_directory_is_refused_from_then_on(io: Loop, keys: Path) -> None:
    server_security = Security.load(keys, "server")
    server, got = io.transport(server_security)
    first, _ = io.transport(Security.load(keys, "client"))
    first.send(server.endpoint, b"while trusted")
    io.until(lambda: got, 5, "a frame while the key was trusted")
    os.unlink(keys / "client.key")  # revoked
    io.until(lambda: server_security.server_key("client") is None, 5, "the server to notice")
    again, _ = io.transport(_client_elsewhere(keys))  # a new connection with the revoked key
    again.send(server.endpoint, b"after revocation")
    io.until(lambda: server.refused["untrusted_key"] >= 1, 10, "the revoked key refused")
    assert [d for d, _, _ in got] == [b"while trusted"]


def _client_elsewhere(keys: Path) -> Security:
    # the revoked client still holds its secret and a copy of the server's public key
    other = keys.parent / "revoked"
    other.mkdir()
    shutil.copy(keys / "client.key_secret", other)
    shutil.copy(keys / "server.key", other)
    text = (other / "client.key_secret").read_text()
    public = [line for line in text.splitlines() if "secret-key" not in line]
    (other / "client.key").write_text("\n".join(public) + "\n")
    return Security.load(other, "client")


def test_a_connection_unused_for_idle_close_is_closed_and_the_next_send_dials_again(io: Loop) -> None:
    server, got = io.transport()
    client, _ = io.transport(idle_close=0.5)
    client.send(server.endpoint, b"first")
    io.until(lambda: len(got) == 1, 10, "the first frame")

    def swept() -> bool:
        client.sweep()  # (the node calls it at every tick)
        return server.endpoint not in client.dealers

    io.until(swept, 10, "the idle DEALER closed")
    client.send(server.endpoint, b"second")
    io.until(lambda: len(got) == 2, 10, "the second frame, on a new connection")
    assert [d for d, _, _ in got] == [b"first", b"second"] and client.evicted == 0


def test_a_frame_that_wakes_a_caller_lets_it_run_before_the_rest_of_the_read_and_nothing_is_left_unread(
    io: Loop,
) -> None:
    """A frame whose handling resolved a caller's future (on_frame returns True): the caller's task
    runs next, then the read goes on where it stopped and ends with on_idle, as every read does."""
    events: list[tuple] = []
    server = ZmqTransport("tcp://127.0.0.1:0")

    def on_frame(data: bytes, identity: bytes, principal: str | None) -> bool:
        events.append(("frame", data))
        if data.startswith(b"wake"):
            # a read already queued ahead of the caller (the descriptor's, or one scheduled) ...
            io.loop.call_soon(server._readable)
            io.loop.call_soon(events.append, ("task", data))  # ... then the caller, as its future schedules it
            return True
        return False

    server.start(io.loop, on_frame, lambda: events.append(("idle",)))
    io.transports.append(server)
    client, _ = io.transport()
    sent = [b"a", b"wake-1", b"b", b"wake-2", b"wake-3", b"c"]
    for frame in sent:
        client.send(server.endpoint, frame)
    io.until(lambda: [e for e in events if e[0] == "frame"] == [("frame", f) for f in sent] and events[-1] == ("idle",),
             10, "every frame read, in order, and on_idle after the last")
    for i, event in enumerate(events):
        if event[0] == "frame" and event[1].startswith(b"wake"):
            assert events[i + 1] == ("task", event[1]), events  # before any other frame or on_idle
    assert events.count(("idle",)) >= 1


def test_the_compiled_sends_and_reads_fail_as_pyzmq_does_and_never_touch_a_closed_socket() -> None:
    zmqio = transport._zmqio
    if zmqio is None:
        pytest.skip("choreo._zmqio is not in use (CHOREO_PURE=1)")
    lonely = raw_dealer()  # no peer: nowhere to queue a frame
    with pytest.raises(zmq.Again):
        zmqio.send(lonely, b"x")
    lonely.close(0)
    with pytest.raises(zmq.ZMQError):
        zmqio.send(lonely, b"x")
    router = zmq.Context.instance().socket(zmq.ROUTER)
    refused: list[tuple] = []
    reader = zmqio.Reader(router, lambda *frame: None, lambda *why: refused.append(why), False)
    assert reader.read(8) == transport.READ_DRAINED and not reader.waiting()  # nothing yet: no error either
    router.close(0)
    assert reader.read(8) == transport.READ_DRAINED and refused == []
    # the compiled reader's answers are the transport's
    assert (zmqio.READ_DRAINED, zmqio.READ_BUDGET_SPENT, zmqio.READ_YIELDED) == (
        transport.READ_DRAINED, transport.READ_BUDGET_SPENT, transport.READ_YIELDED)
    with pytest.raises(zmq.ZMQError):
        reader.waiting()


def test_peers_that_vanish_while_this_node_is_too_busy_to_read_them_do_not_crash_it() -> None:
    """libzmq 4.3.5 aborts the whole process (``Assertion failed: !_io_error``) when a ZMTP
    heartbeat falls due on a connection whose receive pipe was full when its peer went away.
    Two ways there, both with a node too busy to read for a while: a peer floods its ROUTER and
    exits; a peer it dialled pushes messages back into its DEALER (never read, by design), then
    resets the connection. The node must outlive both: it ran ZMTP heartbeats, every 15 s, until
    a real-process chaos run on hosts of their own died of it (the abort came at the second, 30 s
    on). The abort needs a heartbeat to fall due, so the test reads that no socket of the node
    has one (each would be a 30 s wait to show it) and then gives the I/O threads a moment to
    meet the dead connections."""
    flood = textwrap.dedent("""
        import os, sys, time, zmq
        d = zmq.Context().socket(zmq.DEALER)
        d.setsockopt(zmq.SNDHWM, 100_000)
        d.connect(sys.argv[1])
        for _ in range(20_000):
            d.send(b"x" * 200)
        time.sleep(1.0)  # (sent: the kernel holds what the node has not read)
        os._exit(0)
    """)
    pushback = textwrap.dedent("""
        import os, sys, time, zmq
        r = zmq.Context().socket(zmq.ROUTER)
        r.bind("tcp://127.0.0.1:0")
        print(r.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
        identity, _ = r.recv_multipart()  # the node's first frame: now push back at its DEALER
        for _ in range(2_000):
            r.send_multipart([identity, b"y" * 3000])
        time.sleep(1.0)
        os._exit(0)  # what the node sent and this never read: the kernel resets the connection
    """)
    node = textwrap.dedent("""
        import asyncio, subprocess, sys, time, zmq
        from choreo.transport import ZmqTransport
        flood, pushback = sys.argv[1], sys.argv[2]
        t = ZmqTransport("tcp://127.0.0.1:0", hwm=16)
        t.start(asyncio.new_event_loop(), lambda *a: None, lambda: None)  # (the loop never runs: busy)
        hostile = subprocess.Popen([sys.executable, "-c", pushback], stdout=subprocess.PIPE, text=True)
        endpoint = hostile.stdout.readline().strip()
        for _ in range(3_000):
            t.send(endpoint, b"z" * 1000)
        subprocess.run([sys.executable, "-c", flood, t.endpoint], timeout=60)
        hostile.wait(60)
        beating = [e for e, s in [("router", t.router), *t.dealers.items()] if s.getsockopt(zmq.HEARTBEAT_IVL)]
        assert not beating, f"ZMTP heartbeats on {beating}"
        time.sleep(2.0)
        t.close()
        print("alive")
    """)
    done = subprocess.run([sys.executable, "-c", node, flood, pushback], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0 and done.stdout.strip() == "alive", (done.returncode, done.stderr[-2000:])
