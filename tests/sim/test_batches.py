"""Batches in the API and commands first: emit_many, batch handlers, commands ahead of events.

Over the fake link (drops, duplicates, reordering under some seeds), so that what is asserted is
what a user would notice: every event handled once and in order per key, a batch handler given
lists, a failing batch run again one message at a time (the poison one dead-lettered, its
neighbours handled once), everything acknowledged, and a command handled before a long backlog
of events that arrived ahead of it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from choreo import Backpressure, Command, Event, NodeConfig, Service, ValidationError
from choreo.introspect import node_stats
from choreo.runtime.engine import Engine
from choreo.testing import Harness


class Tick(Event, key="k"):
    k: str
    n: int


class Tock(Event):
    n: int


class Tally(Command):
    pass


class Charge(Event, key="account", idempotency=["account", "ref"]):
    account: str
    ref: int


def per_key(seen: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for k, n in seen:
        out[k].append(n)
    return dict(out)


def sink_service(seen: dict[str, list], *, poison: int | None = None) -> Service:
    sink = Service("sink")

    @sink.on(Tick, batch=True, retries=1, backoff=0.01)
    def ticks(events: list[Tick]) -> None:
        seen["batches"].append(len(events))
        if any(e.n == poison for e in events):
            raise ValueError(f"poison {poison}")
        seen["ticks"].extend((e.k, e.n) for e in events)

    @sink.on(Tock)
    def tock(event: Tock) -> None:
        seen["tocks"].append(event.n)

    @sink.on(Charge, batch=True)
    def charges(events: list[Charge]) -> None:
        seen["charges"].extend((e.account, e.ref) for e in events)

    @sink.command(Tally)
    def tally(cmd: Tally) -> int:
        seen["order"].append("command")
        return len(seen["ticks"])

    return sink


def one_sink(seed: int, seen: dict[str, list], **kw) -> tuple[Harness, Engine, Engine]:
    """A client and one sink instance on a quiet link (not started)."""
    harness = Harness(seed=seed)
    return harness, harness.add(None), harness.add(sink_service(seen, **kw))


async def started(harness: Harness, client: Engine, service: str, instances: int = 1) -> None:
    await harness.start()
    await harness.run_until(lambda: len(client.membership.instances(service)) == instances, 30, f"{service} visible")


@pytest.mark.parametrize("seed", range(1, 5))
def test_emit_many_and_batch_handlers_keep_order_and_dedup_on_a_hostile_link(seed: int) -> None:
    seen: dict[str, list] = defaultdict(list)
    harness = Harness(seed=seed, drop=0.05, duplicate=0.10, reorder=0.10)
    client = harness.add(None)
    harness.add(sink_service(seen))
    harness.add(sink_service(seen))

    async def scenario() -> None:
        await started(harness, client, "sink", 2)
        ids: list[bytes] = []
        for b in range(20):  # mixed types: each event to its own subscribers, in list order
            batch = [Tick(k=f"k{n % 13}", n=n) if n % 5 else Tock(n=n) for n in range(b * 100, b * 100 + 100)]
            ids.extend(await harness.run(client.emit_many(batch)))
        assert len(ids) == len(set(ids)) == 2000, "one id per event"
        await harness.run_until(lambda: len(seen["ticks"]) >= 1600 and len(seen["tocks"]) >= 400
                                and client.acknowledged, 600, f"all handled ({harness.describe()})")
        await harness.advance(3.0)  # late duplicates and retransmissions have time to arrive

    asyncio.run(scenario())
    expected: dict[str, list[int]] = defaultdict(list)
    for n in range(2000):
        if n % 5:
            expected[f"k{n % 13}"].append(n)
    assert per_key(seen["ticks"]) == dict(expected), f"each key's events once and in order (seed {seed})"
    assert sorted(seen["tocks"]) == list(range(0, 2000, 5)), f"each unkeyed event once (seed {seed})"
    assert max(seen["batches"]) > 1, "the batch handler was given runs of events, not one at a time"
    assert harness.link.duplicated > 0


def test_a_failing_batch_is_run_again_message_by_message() -> None:
    seen: dict[str, list] = defaultdict(list)
    harness, client, sink = one_sink(3, seen, poison=57)

    async def scenario() -> None:
        await started(harness, client, "sink")
        await harness.run(client.emit_many([Tick(k=f"k{n % 7}", n=n) for n in range(200)]))
        await harness.run_until(lambda: client.acknowledged, 60, "every event acknowledged, the poison one too")

    asyncio.run(scenario())
    expected: dict[str, list[int]] = defaultdict(list)
    for n in range(200):
        if n != 57:
            expected[f"k{n % 7}"].append(n)
    assert per_key(seen["ticks"]) == dict(expected), "every other event handled once, in order per key"
    assert seen["batches"].count(1) >= 3, "after the batch failed, its events ran one at a time"
    letters = list(sink.dispatcher.dead_letters)
    assert [(d.message_type, d.attempts) for d in letters] == [("Tick", 2)], "the poison event alone, after its retry"
    stats = node_stats(sink)
    assert stats.processed == 200 and stats.dead_lettered == 1


def test_emit_many_checks_every_event_before_any_goes() -> None:
    seen: dict[str, list] = defaultdict(list)
    harness, client, _ = one_sink(4, seen)

    async def scenario() -> None:
        await started(harness, client, "sink")
        for batch in (
            [Tick(k="a", n=1), Tick(k="a", n=2), Tick(k="a", n="three"), Tick(k="a", n=4)],  # type: ignore[arg-type]
            [Tick(k="a", n=1), Tock(n=2), Tock(n="three")],  # type: ignore[arg-type]
        ):
            with pytest.raises(ValidationError, match="n = 'three'"):
                await harness.run(client.emit_many(batch))
        await harness.advance(1.0)

    asyncio.run(scenario())
    assert not seen["ticks"] and not seen["tocks"], "nothing of a batch with an invalid event went"
    assert node_stats(client).emitted == 0


def test_emit_many_waits_for_credit_part_way_and_says_what_went() -> None:
    gate = asyncio.Event()
    got: list[int] = []
    slow = Service("slow")

    @slow.on(Tock)
    async def tock(event: Tock) -> None:
        got.append(event.n)
        await gate.wait()  # nothing is acknowledged until the gate opens: credit runs out

    harness = Harness(seed=5, config=NodeConfig(window=16))
    client = harness.add(None)
    harness.add(slow)

    async def scenario() -> None:
        await started(harness, client, "slow")
        with pytest.raises(Backpressure) as info:
            await harness.run(client.emit_many([Tock(n=n) for n in range(40)], timeout=2.0))
        assert len(info.value.emitted) == 16, "the events that went before credit ran out"
        gate.set()
        ids = await harness.run(client.emit_many([Tock(n=n) for n in range(40, 80)]), timeout=60)
        assert len(ids) == 40, "credit running out part-way: the rest waited for it, then went"
        await harness.run_until(lambda: len(got) == 56 and client.acknowledged, 60, "all handled")

    asyncio.run(scenario())
    assert sorted(got) == list(range(16)) + list(range(40, 80))


def test_emit_many_gives_an_idempotent_type_its_intent_id() -> None:
    seen: dict[str, list] = defaultdict(list)
    harness, client, _ = one_sink(6, seen)

    async def scenario() -> None:
        await started(harness, client, "sink")
        first = await harness.run(client.emit_many([Charge(account="a", ref=r) for r in range(10)]))
        again = await harness.run(client.emit_many([Charge(account="a", ref=r) for r in range(5, 15)]))
        assert first[5:] == again[:5], "the same intent, the same id"
        await harness.run_until(lambda: client.acknowledged, 60, "all acknowledged")

    asyncio.run(scenario())
    assert seen["charges"] == [("a", r) for r in range(15)], "a repeated intent is handled once"


def test_a_command_overtakes_a_long_backlog_of_events() -> None:
    seen: dict[str, list] = defaultdict(list)
    harness, client, sink = one_sink(7, seen)

    async def scenario() -> None:
        await started(harness, client, "sink")
        harness.pause(sink, 60.0)  # its socket fills: 3,000 events, then a command
        await harness.run(client.emit_many([Tick(k=f"k{n % 50}", n=n) for n in range(3000)]))
        answer = asyncio.ensure_future(client.send(Tally()))
        await harness.advance(0.05)
        assert harness.burst(sink) > 10, "the events and the command arrive in one read"
        assert seen["order"] == ["command"] and not seen["ticks"], "the command ran before any queued event"
        assert await harness.run(answer) == 0
        await harness.run_until(lambda: len(seen["ticks"]) == 3000, 60, "the events, after it")

    asyncio.run(scenario())


def test_a_command_does_not_queue_behind_emitters_waiting_for_credit() -> None:
    handled: list[int] = []
    answered_after: list[int] = []
    slow = Service("slow")
    harness = Harness(seed=8, config=NodeConfig(window=16))

    @slow.on(Tick)
    async def tick(event: Tick) -> None:  # one key: handled one at a time, 10 ms each
        await harness.sleep(0.01)
        handled.append(event.n)

    @slow.command(Tally)
    def tally(cmd: Tally) -> int:
        return len(handled)

    client = harness.add(None)
    harness.add(slow)

    async def scenario() -> None:
        await started(harness, client, "slow")
        emitters = [asyncio.ensure_future(client.emit(Tick(k="one", n=n), timeout=60)) for n in range(200)]
        await harness.advance(0.05)  # the window is full, 184 emitters wait for credit
        answered_after.append(await harness.run(client.send(Tally(), timeout=60), timeout=60))
        await harness.run(asyncio.gather(*emitters), timeout=120)
        await harness.run_until(lambda: len(handled) == 200, 60, "all handled")

    asyncio.run(scenario())
    assert answered_after[0] < 40, (f"the command was answered after {answered_after[0]} of 200 events: it took "
                                    "the next credit instead of waiting behind every emitter")
