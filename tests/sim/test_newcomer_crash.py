"""A newcomer that takes partitions and dies soon after does not take their dedup ids with it.

When an instance joins, the partitions rendezvous hashing gives it stream to it from their old
owner with their dedup ids. Should it die before anything else changes, the same hashing gives
each partition back to that old owner (README, the scale-out row), which kept the ids: a message
it ran before the hand-over and that arrives again (a retry under the same idempotency key, an
upstream step run again) is a duplicate there, as it was before the newcomer came. Before, the
old owner forgot them at the hand-over and ran such messages a second time (chaos pipeline seed
71 over real processes: one live sink ran 453 events twice).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from choreo import Event, NodeConfig, Service
from choreo.testing import Harness

CONFIG = NodeConfig(suspect_after=1.0, dead_after=3.0, heartbeat=0.25, handover_timeout=5.0)
KEYS = 40


class Booked(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


def ledger() -> tuple[Service, Counter[tuple[str, int]]]:
    runs: Counter[tuple[str, int]] = Counter()
    service = Service("ledger")
    service.on(Booked)(lambda ev: runs.update([(ev.k, ev.n)]))
    return service, runs


async def emit_all(h: Harness, client: Any, events: list[Booked]) -> None:
    for ev in events:
        await client.emit(ev, timeout=60)
    await h.run_until(lambda: client.acknowledged, 60, "every event acknowledged")


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("death", ["crash", "freeze"])
def test_events_run_before_a_newcomer_took_their_partition_are_not_run_again_when_it_dies(seed: int, death: str) -> None:
    h = Harness(seed=seed, config=CONFIG)
    client = h.add(None)
    service, runs = ledger()
    old = h.add(service)
    events = [Booked(k=f"k{i}", n=i) for i in range(KEYS)]

    async def scenario() -> None:
        await h.start()
        await emit_all(h, client, events)
        assert sum(runs.values()) == KEYS

        newcomer = h.join(ledger()[0])  # (its own counter: what runs there is not what we check)
        await h.run_until(lambda: "owned" in newcomer.moves.ownership.state
                          and all(s != "awaiting" for s in newcomer.moves.ownership.state)
                          and "draining" not in old.moves.ownership.state, 30, "the newcomer took its partitions")
        taken = [p for p, s in enumerate(newcomer.moves.ownership.state) if s == "owned"]
        assert taken, "the newcomer took partitions from the old owner"
        if death == "crash":
            h.crash(newcomer)
        else:
            h.pause(newcomer, 10 * (CONFIG.suspect_after + CONFIG.dead_after))
        await h.run_until(lambda: all(old.moves.ownership.state[p] == "owned" for p in taken), 30,
                          "the old owner has its partitions back")

        await emit_all(h, client, events)  # a retry of every event, under the same idempotency key
        twice = sorted(key for key, count in runs.items() if count > 1)
        assert not twice, f"the old owner ran {len(twice)} events a second time, first {twice[:3]}"

    asyncio.run(scenario())
