"""examples/surge: the three facts of the article's scaling story, read from the nodes' metrics
(``rpc(endpoint, "stats")``) by a sampler of the test's own, while the driver runs:

1. backpressure reaches the producer: its emits wait for credit, its in-flight count sits at
   the credit window, and it ingests no faster than the one processor handles;
2. consumer lag rises (to about the window) and stays bounded (never above the window per
   processor);
3. a second processor, started mid-surge, brings the lag down and the throughput up.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from example_run import run

from choreo.client import rpc
from examples.surge.gateway import WINDOW
from examples.surge.processor import CAPACITY

pytestmark = pytest.mark.slow  # real processes


def test_backpressure_bounded_lag_and_a_second_consumer(up) -> None:
    system = up("examples.surge")
    samples: list[tuple[float, dict, dict]] = []  # (time, gateway stats, {processor: stats})

    async def sampler() -> None:
        while True:
            if system.clients:
                gateway = await asyncio.to_thread(rpc, system.clients[0].endpoint, "stats")
                processors = await asyncio.to_thread(system.stats, "processor")
                samples.append((time.monotonic(), gateway, processors))
            await asyncio.sleep(0.05)

    async def scenario():
        watch = asyncio.ensure_future(sampler())
        try:
            return await system.drive(surge=550, seconds=2.5)
        finally:
            watch.cancel()

    out = run(scenario(), timeout=90)
    warmup, one, two = out.phases

    def between(start: float, end: float):
        return [s for s in samples if start <= s[0] <= end]

    def lag(stats: dict) -> int:
        return sum(stats["lag"].values())

    def per_second(counter, part):
        return (counter(part[-1]) - counter(part[0])) / (part[-1][0] - part[0][0])

    emitted = lambda s: s[1]["emitted"]  # noqa: E731
    handled = lambda s: sum(p["processed"] for p in s[2].values())  # noqa: E731

    # 1. backpressure reaches the producer
    surge1 = between(one.started, one.ended)
    last1 = between(one.ended - 1.0, one.ended)
    assert surge1[-1][1]["backpressure_waits"] - surge1[0][1]["backpressure_waits"] > 50
    assert max(s[1]["in_flight"] for s in surge1) >= 0.9 * WINDOW
    ingest = per_second(emitted, last1)
    assert ingest < 1.15 * CAPACITY < one.rate, f"ingested {ingest:.0f}/s with one processor of {CAPACITY:.0f}/s"
    # 2. consumer lag rises and stays bounded
    assert max(lag(p) for s in surge1 for p in s[2].values()) >= 0.8 * WINDOW
    for t, _, processors in samples:
        total = sum(lag(p) for p in processors.values())
        assert total <= WINDOW * len(processors), f"lag {total} above {len(processors)} x window at {t}"
    # 3. a second consumer brings lag down (and handles more than one could)
    last2 = between(two.ended - 1.0, two.ended)
    assert all(len(s[2]) == 2 for s in last2)
    lag1 = sum(lag(p) for s in last1 for p in s[2].values()) / len(last1)
    lag2 = sum(lag(p) for s in last2 for p in s[2].values()) / len(last2)
    assert lag2 < 0.35 * lag1, f"mean lag {lag1:.0f} with one processor, {lag2:.0f} with two"
    assert per_second(handled, last2) > 1.2 * CAPACITY
    # and every click was handled, by both processors
    final = system.stats("processor")
    assert sum(s["processed"] for s in final.values()) == out.emitted
    assert all(s["processed"] > 0 for s in final.values())
    assert warmup.emitted > 0 and out.exit_status == 0
