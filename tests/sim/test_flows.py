"""Where a flow from outside ends, as the ``choreo_flow_seconds`` histogram reports it.

A handler that declares emits but emitted nothing for a message (an aggregator before its window
closes) ends that message's flow where it ran; one that emitted ends it when what it emitted is
acknowledged. Both are reported while metrics watch, each message once.
"""

from __future__ import annotations

import asyncio

from choreo import Event, Service
from choreo.testing import Harness


class Reading(Event, key="sensor"):
    sensor: str
    n: int


class Closed(Event, key="sensor"):
    sensor: str
    upto: int


def test_a_flow_ends_where_a_handler_emitted_nothing_and_after_the_acks_where_it_emitted() -> None:
    windows = Service("windows")
    archived: list[int] = []

    @windows.on(Reading, emits=[Closed])
    def add(reading: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
        if reading.n % 3 == 2:  # every third reading closes a window
            ctx.emit(Closed(sensor=reading.sensor, upto=reading.n))

    archive = Service("archive")

    @archive.on(Closed)
    def keep(closed: Closed) -> None:
        archived.append(closed.upto)

    harness = Harness(seed=5)
    client = harness.add(None)
    owner = harness.add(windows)
    harness.add(archive)
    owner.tracer.watch_flows()

    async def scenario() -> list[bytes]:
        await harness.start()
        await harness.run_until(lambda: bool(client.membership.instances("windows")), 30, "windows visible")
        ids = [await harness.run(client.emit(Reading(sensor=f"s{n % 2}", n=n))) for n in range(30)]
        await harness.run_until(lambda: len(archived) == 10 and client.acknowledged and owner.acknowledged, 60,
                                "every reading handled, every window archived")
        return ids

    ids = asyncio.run(scenario())
    flows = owner.tracer.take_flows()
    assert sorted(f[0] for f in flows) == sorted(ids), "one flow per reading from outside, none missing, none twice"
    assert {(f[1], f[2], f[5]) for f in flows} == {("Reading", add.__qualname__, "ok")}
    assert all(end >= start for _, _, _, start, end, _ in flows)
    assert sorted(archived) == [n for n in range(30) if n % 3 == 2]
