"""choreo beside the brokers users pick instead, on the same keyed, acknowledged workload.

Run by ``make bench-peers`` (which installs the servers from the OS packages when it can and
the Python clients from the ``peers`` extra); each peer is skipped, with the reason, when its
server or client is missing. A producer process and a consumer process per system, 100-byte
payloads over 1,000 keys; the rate is from the producer's first send to the consumer's last
acknowledgement, and choreo's end-to-end figure is measured again right before each peer (the
machine drifts within minutes). What each peer guarantees in this setup is in bench/peers.py and stated
beside the figure in the README.

Figures: ``peers.<peer>.msgs_per_s``, ``peers.<peer>.ratio`` (choreo e2e / peer, choreo measured
right before that peer: ``peers.<peer>.choreo_events_per_s``), ``peers.choreo.events_per_s``
(their median). The durable peers (Redis with its append-only file, NATS JetStream with file
storage, RabbitMQ with a durable queue and persistent messages) are compared with choreo durable:
a data dir per node, ``fsync="batch"`` (``peers.choreo_durable.events_per_s``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.harness import Procs, choreo_run, median, scaled
from bench.nodes import body_for, encoded
from bench.peers import Server, Unavailable
from bench.results import record

KEYS = 1000
PEERS = {
    # peer -> (server kind, client module, messages per run, durable)
    "redis_streams": ("redis", "redis", scaled(100_000), False),
    "rabbitmq": ("rabbitmq", "pika", scaled(40_000), False),
    "nats_js": ("nats", "nats", scaled(40_000), False),
    "redis_streams_aof_everysec": ("redis", "redis", scaled(100_000), True),
    "rabbitmq_durable": ("rabbitmq", "pika", scaled(20_000), True),
    "nats_js_file": ("nats", "nats", scaled(40_000), True),
}
CHOREO: dict[bool, list[float]] = {False: [], True: []}


def choreo_rate(durable: bool) -> float:
    """choreo's e2e rate (durable: a data dir per node, fsync="batch"), measured right beside each
    peer (the machine drifts within minutes)."""
    rate = choreo_run({"count": scaled(300_000), "seconds": 4.0, "keys": KEYS, "size": 100},
                      fsync="batch" if durable else None)["events_per_s"]
    CHOREO[durable].append(rate)
    record("peers.choreo_durable.events_per_s" if durable else "peers.choreo.events_per_s", median(CHOREO[durable]))
    return rate


def peer_run(procs: Procs, kind: str, port: int, count: int, durable: bool = False) -> dict:
    payload = encoded(f"k{KEYS // 2}", count // 2, body_for(100, f"k{KEYS // 2}", count // 2))
    path = procs.path("payload")
    with open(path, "wb") as f:
        f.write(payload)
    mode = f"{kind}-durable" if durable and kind != "redis" else kind  # redis: durability is the server's AOF
    consumer = procs.program(f"{mode}-consume", str(port), str(count), module="bench.peers")
    ready = procs.line(consumer, 60)
    assert ready == "ready", f"{kind} consumer said {ready!r}"
    producer = procs.program(f"{mode}-produce", str(port), str(count), str(KEYS), path, module="bench.peers")
    produced = json.loads(procs.line(producer, 120))
    consumed = json.loads(procs.line(consumer, 120))
    assert consumed["got"] >= count, f"{kind}: {count} sent, {consumed['got']} consumed"
    return {"rate": consumed["got"] / (consumed["last"] - produced["start"]), **produced, **consumed}


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer(benchmark, peer: str) -> None:
    kind, client, count, durable = PEERS[peer]
    if importlib.util.find_spec(client) is None:
        pytest.skip(f"{peer}: the Python client {client!r} is not installed: pip install -e '.[peers]' "
                    "(make bench-peers does it)")
    server = Server(kind, durable=durable)
    try:
        port = server.start()
    except Unavailable as exc:
        server.stop()
        pytest.skip(f"{peer}: {exc}")
    mine = choreo_rate(durable)  # before the server starts: it would take CPU from choreo's run
    result: dict = {}
    try:
        def measure() -> None:
            with Procs() as procs:
                result.update(peer_run(procs, kind, port, count, durable))

        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        server.stop()
    record(f"peers.{peer}.msgs_per_s", result["rate"])
    record(f"peers.{peer}.choreo_events_per_s", mine)
    record(f"peers.{peer}.ratio", mine / result["rate"])
    benchmark.extra_info.update({"msgs_per_s": round(result["rate"]), "choreo_events_per_s": round(mine)})
