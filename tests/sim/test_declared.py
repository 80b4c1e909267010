"""The declared system apart from who is live, checked on the fake link.

A service whose instances are all gone stays declared: what is meant for it waits at its
producer (bounded, then Backpressure naming it) and leaves when an instance is back; only an
operator's retire forgets it, everywhere. Messages are checked against their declared types
before they leave, and a receiver that still gets an invalid body keeps it as a dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from choreo import Backpressure, ChoreoError, Command, Event, NodeConfig, Service, Undeliverable, ValidationError
from choreo.errors import ChoreoUsageError
from choreo import wire
from choreo.testing import Harness

CONFIG = NodeConfig(window=8, suspect_after=1.0, dead_after=3.0, heartbeat=0.25, emit_timeout=2.0)


class Reading(Event, key="sensor"):
    sensor: str
    value: int


class Nobody(Event):
    note: str


class Reset(Command, key="sensor"):
    sensor: str


def meter(seen: list[int]) -> Service:
    svc = Service("meter")

    @svc.on(Reading)
    def on_reading(ev: Reading) -> None:
        seen.append(ev.value)

    @svc.command(Reset)
    def reset(cmd: Reset) -> int:
        return 0

    return svc


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


class Losing:
    """The harness's link loses the frames of ``types`` from ``src`` to ``dst`` while :attr:`on`."""

    def __init__(self, h: Harness, src: Any, dst: Any, types: tuple[int, ...], on: bool = False) -> None:
        self.on = on
        transmit = h.link.transmit

        def maybe(now: float, sender: str, receiver: str, frame: bytes) -> None:
            if not (self.on and sender == src.transport.endpoint and receiver == dst.transport.endpoint
                    and wire.parse_header(frame)[0] in types):
                transmit(now, sender, receiver, frame)

        h.link.transmit = maybe  # type: ignore[method-assign]


def test_messages_for_a_service_with_no_instance_wait_then_leave_in_order() -> None:
    seen: list[int] = []
    svc = meter(seen)
    h = Harness(seed=3, config=CONFIG)
    client = h.add(None)
    consumer = h.add(svc)

    async def scenario() -> None:
        await h.start()
        await h.run(client.emit(Reading("s", 0)))
        await h.leave(consumer)  # the last instance leaves gracefully: meter stays declared
        await h.advance(1.0)
        assert "meter" in client.membership.declared and not client.membership.instances("meter")
        for n in range(1, CONFIG.window + 1):  # a window's worth waits at the producer
            assert client.try_emit(Reading("s", n))
        assert len(client.outbox.waiting["meter"]) == CONFIG.window
        with pytest.raises(Backpressure, match=r"no live instance of meter .* 8 messages already wait for one"):
            client.try_emit(Reading("s", 99))
        h.restart(consumer)  # the service is back (a new incarnation at the same endpoint)
        await h.run_until(lambda: client.acknowledged, 30, "what waited was delivered")
        assert client.counters.unrouted == 0

    run(scenario)
    assert seen == list(range(CONFIG.window + 1)), "each once, in order"


def test_only_an_operator_retires_a_service_and_the_mesh_learns_it() -> None:
    seen: list[int] = []
    svc = meter(seen)
    h = Harness(seed=4, config=CONFIG)
    client = h.add(None)
    other = h.add(None)
    consumer = h.add(svc)

    async def scenario() -> None:
        await h.start()
        h.crash(consumer)
        await h.advance(CONFIG.suspect_after + CONFIG.dead_after + 2)  # taken for dead by now
        for n in range(3):  # they wait for an instance of meter
            client.try_emit(Reading("s", n))
        answer = client.retire("meter")
        assert answer == {"service": "meter", "known": True, "dropped": 3, "node": client.name}
        assert "meter" not in client.membership.declared
        await h.run_until(lambda: "meter" not in other.membership.declared, 10, "gossip tells the other node")
        # a type nobody consumes now: counted, said once, and flush does not call it delivered
        client.try_emit(Reading("s", 9))
        assert client.take_undelivered() == {"Reading": 1}

    run(scenario)
    assert seen == []


def test_retire_is_refused_while_an_instance_is_live() -> None:
    svc = meter([])
    h = Harness(seed=5, config=CONFIG)
    client = h.add(None)
    h.add(svc)

    async def scenario() -> None:
        await h.start()
        with pytest.raises(ChoreoUsageError, match=r"meter still has live instances \(meter#[0-9a-f]+\): stop them"):
            client.retire("meter")

    run(scenario)


def test_a_field_of_the_wrong_type_is_refused_before_anything_leaves() -> None:
    seen: list[int] = []
    h = Harness(seed=6, config=CONFIG)
    client = h.add(None)
    h.add(meter(seen))

    async def scenario() -> None:
        await h.start()
        with pytest.raises(ValidationError, match=r"Reading.value = '7': Expected `int`, got `str`"):
            client.try_emit(Reading("s", "7"))  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match=r"Reading.value = '7'"):
            await h.run(client.emit(Reading("s", "7")))  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match=r"Reset.sensor = 5"):
            await h.run(client.send(Reset(5)))  # type: ignore[arg-type]
        assert client.outbox.in_flight() == 0 and client.counters.emitted == 0

    run(scenario)
    assert seen == []


def test_an_invalid_body_from_an_older_sender_is_a_dead_letter_not_a_silent_drop() -> None:
    class OldReading(Event, key="sensor", name="Reading"):  # the same type, as an older release declared it
        sensor: str
        value: str

    seen: list[int] = []
    svc = meter(seen)
    old = Service("gateway", emits=[OldReading])
    h = Harness(seed=7, config=CONFIG)
    producer = h.add(old)
    consumer = h.add(svc)

    async def scenario() -> None:
        await h.start()
        await h.run(producer.emit(OldReading("s", "seven")))
        await h.run_until(lambda: len(consumer.dispatcher.dead_letters) == 1, 10, "dead-lettered")
        await h.run_until(lambda: producer.acknowledged, 10, "acknowledged: it does not wedge the channel")

    run(scenario)
    (letter,) = list(consumer.dispatcher.dead_letters)
    assert letter.error_type == "ValidationError" and letter.attempts == 1 and "Reading.value" in letter.error
    assert consumer.counters.refused["invalid_payload"] == 1
    assert seen == []


def test_confirm_returns_once_every_consumer_acknowledged() -> None:
    seen: list[int] = []
    h = Harness(seed=8, config=CONFIG)
    client = h.add(None)
    h.add(meter(seen))

    async def scenario() -> None:
        await h.start()
        msg_id = await h.run(client.emit(Reading("s", 1), confirm=True))
        assert seen == [1] and len(msg_id) == 16, "handled before emit returned"
        with pytest.raises(Undeliverable, match="no service in the mesh declares that it consumes Nobody"):
            await h.run(client.emit(Nobody("hello"), confirm=True))

    run(scenario)


def test_a_command_answered_by_the_last_instance_as_it_leaves_is_not_run_again_by_the_next() -> None:
    """The answer to a command is lost, and its ack comes only once the caller has heard that the
    service's last instance leaves: the caller asks that instance again (its cached result is
    there and nowhere else) instead of keeping the command for the next instance, which would run
    it a second time (found by a nemesis schedule, seed 2053 over 100 s)."""
    runs: list[str] = []
    svc = Service("meter")

    @svc.command(Reset)
    def reset(cmd: Reset) -> int:
        runs.append(cmd.sensor)
        return len(runs)

    h = Harness(seed=9, config=CONFIG)
    client = h.add(None)
    consumer = h.add(svc)
    answers = Losing(h, consumer, client, (wire.REPLY, wire.ACK), on=True)

    async def scenario() -> None:
        await h.start()
        call = asyncio.ensure_future(client.send(Reset("s"), timeout=20.0))
        await h.run_until(lambda: runs == ["s"], 5, "the command ran")
        leaving = asyncio.ensure_future(h.leave(consumer))
        await h.run_until(lambda: client.membership.peers[consumer.incarnation].state == "leaving", 5,
                          "the caller heard the last instance leaves")
        answers.on = False  # its acks get through again: the caller learns the command ran
        assert await h.run(call, timeout=10) == 1, "answered from the result cached where it ran"
        await h.run(leaving, timeout=30)
        h.restart(consumer)  # the next instance
        await h.run_until(lambda: client.acknowledged, 30, "nothing waits for it")
        await h.advance(2.0)

    run(scenario)
    assert runs == ["s"], "run once"


class Stamp(Command, key="sensor", idempotency=["sensor", "n"]):
    sensor: str
    n: int


def test_a_command_kept_for_an_instance_is_dropped_once_another_copy_is_answered() -> None:
    """A caller's command went unanswered (its frames lost), and it sent it again (the same id)
    after hearing that the service's last instance leaves: that copy waits for an instance. The
    first copy, resent by its channel, reaches the leaving instance, which runs it and answers:
    the waiting copy is dropped, or the next instance would run the command again (nemesis seed
    2126 with standby copies, 100 s)."""
    runs: list[int] = []
    slow = asyncio.Event()
    svc = Service("meter")

    @svc.on(Reading)
    async def on_reading(ev: Reading) -> None:  # keeps the leaving instance draining until released
        await slow.wait()

    @svc.command(Stamp)
    def stamp(cmd: Stamp) -> int:
        runs.append(cmd.n)
        return cmd.n * 2

    h = Harness(seed=11, config=CONFIG)
    client = h.add(None)
    consumer = h.add(svc)
    requests = Losing(h, client, consumer, (wire.DATA,))

    async def scenario() -> None:
        await h.start()
        await h.run(client.emit(Reading("slow", 1)))
        await h.run_until(lambda: not consumer.dispatcher.idle, 5, "the slow handler runs")
        requests.on = True
        with pytest.raises(ChoreoError):
            await h.run(client.send(Stamp("s", 7), timeout=1.0), timeout=5)
        leaving = asyncio.ensure_future(h.leave(consumer))
        await h.run_until(lambda: client.membership.peers[consumer.incarnation].state == "leaving", 5,
                          "the caller heard the last instance leaves")
        again = asyncio.ensure_future(client.send(Stamp("s", 7), timeout=30.0))
        await h.run_until(lambda: bool(client.outbox.waiting.get("meter")), 5, "the copy waits for an instance")
        requests.on = False  # the first copy's retransmission gets through
        assert await h.run(again, timeout=20) == 14, "answered by the leaving instance"
        assert not client.outbox.waiting, "the waiting copy dropped"
        slow.set()
        await h.run(leaving, timeout=30)
        h.restart(consumer)  # the next instance
        await h.run_until(lambda: client.acknowledged, 30, "nothing waits")
        await h.advance(2.0)

    run(scenario)
    assert runs == [7], "run once"


def test_what_the_last_instance_never_got_goes_ahead_of_what_waited_for_the_next() -> None:
    """An event was on its way to the service's last instance when that instance left (its frames
    lost); the next event of the key, emitted after the caller heard of the leave, waited for an
    instance. The first, taken back from the channel at the goodbye, waits ahead of the second:
    the next instance handles them in the order they were emitted (nemesis seed 3303, 100 s)."""
    seen: list[int] = []
    h = Harness(seed=12, config=CONFIG)
    client = h.add(None)
    consumer = h.add(meter(seen))
    events = Losing(h, client, consumer, (wire.DATA,))

    async def scenario() -> None:
        await h.start()
        await h.run(client.emit(Reading("s", 0)))
        await h.run_until(lambda: client.acknowledged, 10, "the first acknowledged")
        events.on = True
        await h.run(client.emit(Reading("s", 1)))  # in flight, never arrives
        leaving = asyncio.ensure_future(h.leave(consumer))
        await h.run_until(lambda: client.membership.peers[consumer.incarnation].state == "leaving", 5,
                          "the caller heard the last instance leaves")
        await h.run(client.emit(Reading("s", 2)))  # waits for an instance
        await h.run(leaving, timeout=60)
        events.on = False
        h.restart(consumer)  # the next instance
        await h.run_until(lambda: client.acknowledged, 30, "everything delivered")

    run(scenario)
    assert seen == [0, 1, 2], "in the order they were emitted"


class Go(Event, key="sensor"):
    sensor: str


class Out(Event, key="sensor"):
    sensor: str


class Back(Event, key="sensor"):
    sensor: str


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_last_instance_leaving_finishes_a_flow_that_comes_back_to_it(seed: int) -> None:
    """The last instance of ``a`` leaves while a flow it started (a -> b -> a) is under way: its
    Go waits for Out's ack, which waits for Back, which b emits only once a has begun to leave, so
    b's view has no instance of ``a`` to send it to. Back must still reach the leaver (it tells
    its peers the flows it works on: wire.Flows), or the drain waits out its timeout and Go runs
    again on the next instance (the nemesis's saga workload, plain seeds 13 and 53)."""
    ran: list[str] = []
    a, b = Service("a"), Service("b")

    @a.on(Go, emits=[Out])
    def go(ev: Go, ctx: Any) -> None:
        ran.append("go")
        ctx.emit(Out(ev.sensor))

    @a.on(Back)
    def back(ev: Back) -> None:
        ran.append("back")

    @b.on(Out, emits=[Back])
    def out(ev: Out, ctx: Any) -> None:
        ran.append("out")
        ctx.emit(Back(ev.sensor))

    h = Harness(seed=seed, config=CONFIG)
    client = h.add(None)
    leaver, other = h.add(a), h.add(b)

    async def scenario() -> None:
        await h.start()
        h.link.cut.add((leaver.transport.endpoint, other.transport.endpoint))  # Out waits on the way
        sent = asyncio.ensure_future(client.emit(Go("s"), timeout=30))
        await h.run_until(lambda: ran == ["go"], 5, "Go ran, Out on its way")
        leaving = asyncio.ensure_future(h.leave(leaver, timeout=10))
        await h.run_until(lambda: other.membership.peers[leaver.incarnation].state == "leaving", 5,
                          "b heard that a's last instance leaves")
        h.heal()
        assert await h.run(leaving, timeout=30), "the leaver drained: no timeout cut its flow short"
        await h.run(sent, timeout=30)
        h.restart(leaver)  # the next instance: nothing of the flow is left for it to run again
        await h.run_until(lambda: client.acknowledged and other.acknowledged, 30, "nothing waits")
        await h.advance(2.0)

    run(scenario)
    assert ran == ["go", "out", "back"], "each step once, Back by the instance that started the flow"


def test_flows_from_a_node_that_is_not_the_services_instance_are_refused() -> None:
    """Only an instance of a service, and one that leaves, may draw that service's waiting
    messages to itself: anyone else's Flows frame is refused and changes nothing."""
    h = Harness(seed=4, config=CONFIG)
    client = h.add(None)
    instance = h.add(meter([]))

    async def scenario() -> None:
        await h.start()
        claim = wire.Flows("meter", [bytes(16)])
        before = instance.counters.refused["malformed"]
        client.outbox.send(instance.transport.endpoint,
                           wire.encode_control(wire.FLOWS, client.incarnation, instance.incarnation, claim))
        await h.advance(0.1)
        assert instance.counters.refused["malformed"] == before + 1
        assert not instance.outbox.flows
        instance.outbox.send(client.transport.endpoint,
                             wire.encode_control(wire.FLOWS, instance.incarnation, client.incarnation, claim))
        await h.advance(0.1)
        assert not client.outbox.flows, "an instance that does not leave draws nothing"

    run(scenario)
