"""Raw pyzmq baselines, each side its own process: ``python -m bench.raw MODE ...``.

The figures choreo is divided by, measured in the same run as choreo's (shared/PERFORMANCE.md):

* ``pull COUNT SIZE PACK`` binds a PULL socket on 127.0.0.1, prints its endpoint, receives
  COUNT payloads (in messages of PACK payloads each, which it splits back into payloads) and
  prints ``{"count", "elapsed"}``, timed from its first message to its last;
* ``push ENDPOINT COUNT PAYLOAD_FILE PACK`` sends them (the bytes of PAYLOAD_FILE): one payload per ZeroMQ message
  (PACK=1, single-frame sends) or PACK payloads concatenated per message;
* ``echo`` binds a ROUTER, prints its endpoint and sends every message back until it gets an
  empty one; ``ping ENDPOINT COUNT SIZE SECONDS`` sends SIZE bytes on a DEALER and waits for
  the echo, COUNT times (fewer if SECONDS pass), and prints every round trip in ns;
* ``loaded_echo`` is that echo with a PULL socket beside it in the same process, which a
  ``push_at ENDPOINT RATE SECONDS PAYLOAD_FILE`` process feeds at RATE payloads a second: the
  ping-pong under the load choreo's commands meet in ``latency.command_under_load`` (pings are
  served first, then at most ``CHUNK`` payloads before the next look, as a node's intake does).

Every receive has a timeout, so a lost peer ends a run with an error instead of a hang.
"""

from __future__ import annotations

import json
import sys
import time

import zmq

TIMEOUT_MS = 20_000


def _socket(kind: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    return sock


def pull(count: int, size: int, pack: int) -> dict[str, float]:
    sock = _socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    recv = sock.recv
    got = 0
    messages = count // pack
    first = recv()  # the clock starts at the first message
    start = time.perf_counter()
    cpu0 = time.process_time()
    got = pack
    if pack == 1:
        for _ in range(messages - 1):
            recv()
        got = messages
    else:
        parts = [first[i : i + size] for i in range(0, len(first), size)]
        for _ in range(messages - 1):
            data = recv()
            parts = [data[i : i + size] for i in range(0, len(data), size)]
            got += len(parts)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    sock.close(0)
    # the first message arrived before the clock started: it is not counted
    return {"count": got - pack, "elapsed": elapsed, "cpu_s": cpu}


def push(endpoint: str, count: int, payload: bytes, pack: int) -> dict[str, float]:
    sock = _socket(zmq.PUSH)
    sock.connect(endpoint)
    send = sock.send
    cpu0 = time.process_time()
    if pack == 1:
        for _ in range(count):
            send(payload)
    else:
        packed = payload * pack
        for _ in range(count // pack):
            send(packed)
    cpu = time.process_time() - cpu0
    sock.close(linger=TIMEOUT_MS)  # wait until everything left
    return {"count": count, "cpu_s": cpu}


def echo() -> dict[str, float]:
    sock = _socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    n = 0
    cpu0 = 0.0
    while True:
        identity, data = sock.recv_multipart()
        if not data:
            break
        if n == 0:
            cpu0 = time.process_time()
        sock.send_multipart([identity, data])
        n += 1
    cpu = time.process_time() - cpu0
    sock.close(0)
    return {"echoed": n, "cpu_s": cpu}


def ping(endpoint: str, count: int, size: int, seconds: float) -> dict[str, object]:
    sock = _socket(zmq.DEALER)
    sock.connect(endpoint)
    body = b"x" * size
    send, recv = sock.send, sock.recv
    perf_ns = time.perf_counter_ns
    for _ in range(min(500, count)):  # warm-up, as the choreo pinger does
        send(body)
        recv()
    rtts = []
    stop = time.perf_counter() + seconds
    cpu0 = time.process_time()
    for i in range(count):
        t0 = perf_ns()
        send(body)
        recv()
        rtts.append(perf_ns() - t0)
        if i % 256 == 0 and time.perf_counter() > stop:
            break
    cpu = time.process_time() - cpu0
    send(b"")  # tells the echo to finish
    sock.close(linger=1000)
    return {"rtt_ns": rtts, "cpu_s": cpu}


CHUNK = 64  # payloads pulled between two looks for a ping (choreo.runtime.intake.RUN_CHUNK)


def loaded_echo() -> dict[str, float]:
    router, sink = _socket(zmq.ROUTER), _socket(zmq.PULL)
    router.bind("tcp://127.0.0.1:0")
    sink.bind("tcp://127.0.0.1:0")
    print(router.getsockopt_string(zmq.LAST_ENDPOINT), sink.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(sink, zmq.POLLIN)
    echoed = pulled = 0
    pings_done = load_done = False  # each side ends with an empty message
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not (pings_done and load_done):
        ready = dict(poller.poll(1000))
        if not ready:
            if time.monotonic() > deadline:
                raise TimeoutError("loaded_echo: no ping and no payload for 20 s")
            continue
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        if router in ready:  # pings first
            identity, data = router.recv_multipart()
            if data:
                router.send_multipart([identity, data])
                echoed += 1
            else:
                pings_done = True
        if sink in ready:
            for _ in range(CHUNK):
                try:
                    data = sink.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not data:
                    load_done = True
                    break
                pulled += 1
    router.close(0)
    sink.close(0)
    return {"echoed": echoed, "pulled": pulled}


def push_at(endpoint: str, rate: float, seconds: float, payload: bytes) -> dict[str, float]:
    """PUSH ``rate`` payloads a second for ``seconds``, in a burst every millisecond it is behind;
    prints ``started`` once the first has left (the pings start then), and ends with an empty one."""
    sock = _socket(zmq.PUSH)
    sock.connect(endpoint)
    send = sock.send
    send(payload)
    print("started", flush=True)
    start = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate)
        while sent < due:
            send(payload)
            sent += 1
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    send(b"")
    sock.close(linger=TIMEOUT_MS)
    return {"count": sent, "elapsed": elapsed}


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "pull":
        result = pull(int(args[0]), int(args[1]), int(args[2]))
    elif mode == "push":
        with open(args[2], "rb") as f:
            payload = f.read()
        result = push(args[0], int(args[1]), payload, int(args[3]))
    elif mode == "echo":
        result = echo()
    elif mode == "ping":
        result = ping(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "loaded_echo":
        result = loaded_echo()
    elif mode == "push_at":
        with open(args[3], "rb") as f:
            payload = f.read()
        result = push_at(args[0], float(args[1]), float(args[2]), payload)
    else:
        print(f"unknown mode {mode!r}: pull, push, echo, ping, loaded_echo or push_at", file=sys.stderr)
        return 2
    # term() waits for the linger of closed sockets: without it, what a PUSH still queues at
    # exit is lost
    zmq.Context.instance().term()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
