"""Issue 3: exactly-once processing and per-key order over a link that drops, duplicates and reorders."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from choreo import Command, Event, Service
from choreo.testing import Harness


class Ping(Event, key="k"):
    k: str
    n: int


class Pong(Event, key="k"):
    k: str
    n: int


class Charge(Command, key="account"):
    account: str
    cents: int


def build(seen: dict[str, list[tuple[str, str, int]]]) -> tuple[Service, Service]:
    relay = Service("relay")

    @relay.on(Ping, emits=[Pong])
    def on_ping(ev: Ping, ctx) -> None:
        seen["relay"].append((ctx.instance, ev.k, ev.n))
        ctx.emit(Pong(k=ev.k, n=ev.n))

    sink = Service("sink")

    @sink.on(Pong)
    async def on_pong(ev: Pong, ctx) -> None:
        seen["sink"].append((ctx.instance, ev.k, ev.n))

    @sink.command(Charge)
    def charge(cmd: Charge, ctx) -> int:
        seen["charge"].append((ctx.instance, cmd.account, cmd.cents))
        return cmd.cents * 2

    return relay, sink


def check(seen: list[tuple[str, str, int]], expected: dict[str, list[int]], what: str, seed: int) -> None:
    per_key: dict[str, list[int]] = defaultdict(list)
    for _instance, key, n in seen:
        per_key[key].append(n)
    assert dict(per_key) == expected, (
        f"{what} (seed {seed}): expected each key's events once and in order; "
        f"differences in keys {[k for k in expected if per_key.get(k) != expected[k]][:5]}"
    )


@pytest.mark.parametrize("seed", range(1, 9))
def test_exactly_once_and_per_key_order_on_a_hostile_link(seed: int) -> None:
    seen: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    relay, sink = build(seen)
    harness = Harness(seed=seed, drop=0.10, duplicate=0.10, reorder=0.20)
    client = harness.add(None)
    harness.add(relay)
    harness.add(relay)
    harness.add(sink)
    harness.add(sink)

    async def scenario() -> None:
        await harness.start()
        await harness.run_until(lambda: len(client.membership.instances("sink")) == 2, 30, "sink visible")

        async def produce() -> None:
            for n in range(2000):
                await client.emit(Ping(k=f"k{n % 40}", n=n))

        await harness.run(produce(), timeout=600)
        results = await harness.run(asyncio.gather(*(client.send(Charge(account=f"a{i}", cents=i)) for i in range(50))))
        assert results == [i * 2 for i in range(50)], f"seed {seed}"
        total = lambda: len(seen["sink"])  # noqa: E731
        await harness.run_until(lambda: total() >= 2000 and all(ch.idle for ch in client.outbox.out.values()), 600,
                                f"all delivered ({harness.describe()})")
        await harness.advance(5.0)  # late duplicates and retransmissions have time to arrive

    asyncio.run(scenario())
    expected: dict[str, list[int]] = defaultdict(list)
    for n in range(2000):
        expected[f"k{n % 40}"].append(n)
    check(seen["relay"], dict(expected), "relay <- Ping", seed)
    check(seen["sink"], dict(expected), "sink <- Pong", seed)
    assert sorted(c for _, _, c in seen["charge"]) == list(range(50)), f"each command handled once (seed {seed})"
    assert harness.link.dropped > 0 and harness.link.duplicated > 0
    assert {i for i, _, _ in seen["relay"]} == {e.name for e in harness.engines.values() if e.service and e.service.name == "relay"}
