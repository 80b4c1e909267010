"""When a node asks to be woken (``Engine.next_tick``): a tick away while it has work to look at,
else by the deadlines of what it has in flight, so that a node whose requests or events are only
travelling does not wake a hundred times a second to find nothing due."""

from __future__ import annotations

import asyncio

import pytest

from choreo import Command, Service
from choreo.config import NodeConfig
from choreo.errors import DeliveryTimeout
from choreo.testing import Harness


class Hold(Command, key="k"):
    k: str


def build(release: asyncio.Event) -> Service:
    svc = Service("holder")

    @svc.command(Hold)
    async def hold(cmd: Hold) -> str:
        await release.wait()
        return cmd.k

    return svc


# a long heartbeat: membership's own deadlines stay out of the way of the ones under test
CONFIG = NodeConfig(heartbeat=5.0, suspect_after=10.0, dead_after=30.0, rto=1.0, tick=0.01)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_request_in_flight_wakes_its_caller_by_its_deadlines_not_every_tick(seed: int) -> None:
    release = asyncio.Event()
    harness = Harness(seed=seed, config=CONFIG, delay=0.0005, jitter=0.0)
    caller = harness.add(None)
    owner = harness.add(build(release))

    async def scenario() -> None:
        await harness.start()
        await harness.run_until(lambda: len(caller.membership.instances("holder")) == 1, 30, "holder visible")
        await harness.step(1.0)  # the join's own chores done
        request = asyncio.ensure_future(caller.send(Hold(k="a"), timeout=3.0))
        await harness.run_until(lambda: owner.dispatcher.stats.in_handler == 1, 5, "the handler holds the command")
        sent_at = harness.now

        # the owner runs a handler: it looks every tick (its work may end at any moment)
        assert owner.busy
        assert owner.next_tick() == pytest.approx(harness.now + CONFIG.tick)
        # the caller only waits: it wakes by the answer's deadline, its frame's retransmission, or
        # the in-flight bound, whichever comes first, and never a mere tick away
        assert not caller.busy and not caller.drained
        due = caller.next_tick() - harness.now
        assert CONFIG.tick < due <= caller.in_flight_tick
        assert caller.in_flight_tick == pytest.approx(CONFIG.rto / 8)

        # its timeout still fires at its deadline (within a tick of the harness)
        with pytest.raises(DeliveryTimeout):
            await harness.run(request, timeout=10)
        assert harness.now - sent_at == pytest.approx(3.0, abs=0.05)
        release.set()
        await harness.run_until(lambda: owner.drained and caller.drained, 10, "both drained")

        # drained: it sleeps until membership's next chore, far beyond the in-flight bound
        assert caller.next_tick() - harness.now > caller.in_flight_tick

    asyncio.run(scenario())


class Echo(Command, key="k"):
    k: str


def test_answered_requests_leave_no_deadline_to_wake_for() -> None:
    """A node answered for longer than its requests' timeout: none of their deadlines is due."""
    svc = Service("echo")

    @svc.command(Echo)
    def echo(cmd: Echo) -> str:
        return cmd.k

    harness = Harness(seed=3, config=CONFIG, delay=0.0005, jitter=0.0)
    caller = harness.add(None)
    harness.add(svc)

    async def scenario() -> None:
        await harness.start()
        await harness.run_until(lambda: len(caller.membership.instances("echo")) == 1, 30, "echo visible")
        start = harness.now

        async def calls() -> int:
            n = 0
            while harness.now - start < 1.0:  # five times the timeout
                assert await caller.send(Echo(k=str(n)), timeout=0.2) == str(n)
                n += 1
            return n

        assert await harness.run(calls(), timeout=30) > 20
        await harness.run_until(lambda: caller.drained, 10, "caller drained")
        assert caller.calls.next_deadline() == float("inf")
        assert caller.next_tick() - harness.now > caller.in_flight_tick

    asyncio.run(scenario())
