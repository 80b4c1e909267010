"""Issue 3: services in separate processes exchange events and commands with their guarantees."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from choreo import Backpressure, NodeConfig
from choreo.node import Node
from choreo.client import rpc

from .checks import check_exactly_once_in_order, expected_stream
from .recording import (
    OrderAccepted,
    OrderCount,
    PlaceOrder,
    Produced,
    Work,
    audit,
    orders,
    read_records,
    relay,
    slow,
    stats,
)

pytestmark = pytest.mark.slow


def test_100k_keyed_events_three_services_six_processes(procs) -> None:
    count, keys = 100_000, 1_000
    seed = procs.start(audit)
    for service in (audit, relay, relay, stats, stats):
        procs.start(service, peers=[seed.endpoint])

    async def produce() -> None:
        async with Node(None, peers=[seed.endpoint]) as client:
            await client.wait_for({"audit": 2, "relay": 2, "stats": 2}, timeout=30)
            for n in range(count):
                await client.emit(Produced(k=f"k{n % keys}", n=n))
            await client.flush(timeout=120)

    asyncio.run(asyncio.wait_for(produce(), 240))
    procs.close()  # graceful stop flushes the record files
    expected = expected_stream(count, keys)
    directory = str(procs.record_dir)
    check_exactly_once_in_order(read_records(directory, "audit"), expected, "audit <- Produced")
    check_exactly_once_in_order(read_records(directory, "relay"), expected, "relay <- Produced")
    stats_records = read_records(directory, "stats")
    check_exactly_once_in_order([r for r in stats_records if r[0] == "Produced"], expected, "stats <- Produced")
    check_exactly_once_in_order([r for r in stats_records if r[0] == "Relayed"], expected, "stats <- Relayed (via relay)")
    # both instances of each service did part of the work
    for service in ("audit", "relay", "stats"):
        files = {r[3] for r in read_records(directory, service)}
        assert len(files) == 2, f"{service}: expected work on 2 instances, got {files}"


def test_flaky_mobile_client_retries_place_one_order(procs) -> None:
    server = procs.start(orders)

    async def scenario() -> None:
        async with Node(None, peers=[server.endpoint]) as client:
            await client.wait_for({"orders": 1}, timeout=20)
            # the same order body, each retry under a new request id (the article's story)
            results = [
                await client.send(PlaceOrder(customer_id="c-7", cart_id="cart-1", request_id=str(uuid.uuid4())))
                for _ in range(3)
            ]
            assert all(isinstance(r, OrderAccepted) for r in results)
            assert results[1] == results[0] and results[2] == results[0], results
            # a different cart is a different order
            other = await client.send(PlaceOrder(customer_id="c-7", cart_id="cart-2", request_id="x"))
            assert other.order_id == "order-cart-2"
            assert await client.ask(OrderCount(customer_id="c-7")) == 2

    asyncio.run(asyncio.wait_for(scenario(), 60))
    stats = rpc(server.endpoint, "stats")
    assert stats["dedup_hits"] == 2, stats
    procs.close()
    placed = read_records(str(procs.record_dir), "orders")
    assert [(r[1], r[2]) for r in placed] == [("c-7/cart-1", 1), ("c-7/cart-2", 2)], placed


def test_slow_consumer_slows_producer_then_backpressure_then_everything_delivered(procs) -> None:
    window = 32
    consumer = procs.start(slow, env={"CHOREO_SLOW_DELAY": "0.02"})
    config = NodeConfig(window=window)

    async def scenario() -> int:
        async with Node(None, peers=[consumer.endpoint], config=config) as client:
            await client.wait_for({"slow": 1}, timeout=20)
            loop = asyncio.get_running_loop()
            peak, waited = 0, 0
            # 1. faster than the consumer: emit waits for credit instead of queueing
            for n in range(150):
                started = loop.time()
                await client.emit(Work(k="one", n=n), timeout=30)
                waited += loop.time() - started > 0.01
                peak = max(peak, client.stats().in_flight)
            assert waited >= 100, f"emit waited for credit only {waited} times out of 150"
            assert peak <= window, f"in flight reached {peak}, above the window of {window}"
            # 2. a caller that will not wait longer than a slot takes to free gets Backpressure
            emitted = 150
            with pytest.raises(Backpressure) as info:
                for n in range(150, 1000):
                    await client.emit(Work(k="one", n=n), timeout=0.005)
                    emitted += 1
            message = str(info.value)
            assert f"{window}/{window} in flight to slow#" in message, message
            assert client.stats().backpressure_errors == 1
            # 3. once the consumer catches up, everything accepted is delivered
            await client.flush(timeout=60)
            return emitted

    emitted = asyncio.run(asyncio.wait_for(scenario(), 120))
    procs.close()
    check_exactly_once_in_order(
        read_records(str(procs.record_dir), "slow"), {"one": list(range(emitted))}, "slow <- Work"
    )
