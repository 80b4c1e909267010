"""Seeded random fault schedules for the fake-link harness: the nemesis.

A :class:`Nemesis` runs a schedule of faults against the nodes of a
:class:`~choreo.testing.Harness` while a workload runs, the way Jepsen's nemesis does against a
real cluster: network partitions shorter and longer than ``dead_after``, crashes and restarts
of service instances, joins, graceful leaves (a service's last instance too), pauses (a node
frozen: a GC pause, a suspended VM) and clock jumps. Everything comes from one seed, so a
failing run replays exactly, and :meth:`Schedule.describe` says what happened when::

    harness = Harness(seed=7, drop=0.01)
    client = harness.add(None)
    for _ in range(3):
        harness.add(orders)
    await harness.start()
    nemesis = Nemesis(harness, {"orders": orders}, clients=[client])
    plan = nemesis.draw(duration=60.0)
    await harness.run(asyncio.gather(workload(client), nemesis.run(plan)))
    await nemesis.settle()           # heal, bring every service back, let the mesh converge

The schedule ends healed, with at least one instance of every service up. Clients are
partitioned, paused and jumped, never crashed: what a client was told is acknowledged stays the
yardstick of "nothing lost".

Durable nodes (a harness with data dirs) add one fault, ``bounce``: a node killed and started
again on its data dir a moment later (a fraction of ``dead_after``, as a supervisor restarts a
process), instances and, with ``bounce_clients=True``, clients too: a durable client keeps what
it was told is committed. :data:`DURABLE_FAULTS` are the faults after which nothing may be
handled twice at all: bounces, partitions and pauses shorter than ``dead_after``, joins and
graceful leaves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .runtime.engine import Engine
from .service import Service
from .testing import Harness

__all__ = ["Fault", "Schedule", "Nemesis", "FAULTS", "DURABLE_FAULTS"]

#: every kind of fault a schedule may contain (``bounce``: durable nodes, see the module docstring)
FAULTS = ("partition", "long_partition", "crash", "restart", "join", "leave", "pause", "long_pause", "jump")
DURABLE_FAULTS = ("bounce", "bounce", "partition", "pause", "join", "leave")


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` at virtual time ``at`` (seconds after the schedule starts)."""

    at: float
    kind: str
    seconds: float = 0.0  # how long a partition or pause lasts; how far a clock jumps
    pick: int = 0  # which node (an index into the candidates when the fault happens)
    side: int = 0  # which nodes go to the other side of a partition (a bit mask over the nodes up)


@dataclass
class Schedule:
    """A seeded list of faults, and what each one did when it ran."""

    seed: int
    faults: list[Fault]
    log: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """What ran, one line per fault: put it in a failure message."""
        return f"nemesis seed {self.seed}:\n  " + "\n  ".join(self.log or ["(no fault ran)"])


class Nemesis:
    """Runs fault schedules against a harness (see the module docstring)."""

    def __init__(
        self,
        harness: Harness,
        services: dict[str, Service],
        *,
        clients: list[Engine] = (),  # type: ignore[assignment]
        min_instances: int = 0,
        max_instances: int = 4,
        bounce_clients: bool = False,
    ) -> None:
        self.harness = harness
        self.services = services
        self.clients = list(clients)
        self.min_instances = min_instances
        self.max_instances = max_instances
        self.bounce_clients = bounce_clients  # durable clients may be killed and started again too
        self.crashed: list[Engine] = []  # instances down, waiting for a restart
        self.died: set[int] = set()  # incarnations that crashed (their unacknowledged work may run again)
        # instances that left gracefully as their service's last one (in memory, their dedup ids
        # went with them), by name: when they said goodbye (virtual time)
        self.left_last: dict[str, float] = {}
        self._now0 = 0.0

    def draw(
        self, duration: float = 60.0, *, seed: int | None = None, every: tuple[float, float] = (2.0, 6.0),
        kinds: tuple[str, ...] = FAULTS,
    ) -> Schedule:
        """A random schedule of ``duration`` virtual seconds (seeded by the harness's seed by default)."""
        seed = self.harness.seed if seed is None else seed
        rng = random.Random(seed * 7919 + 1)
        dead_after = self.harness.config.dead_after
        faults = []
        t = rng.uniform(*every)
        while t < duration:
            kind = rng.choice(kinds)
            seconds = {
                "partition": rng.uniform(0.2, 0.6) * dead_after,
                "long_partition": rng.uniform(1.3, 2.5) * dead_after,
                "pause": rng.uniform(0.2, 0.6) * dead_after,
                "long_pause": rng.uniform(1.3, 2.0) * dead_after,
                "jump": rng.uniform(0.5, 2.0) * dead_after,
                "bounce": rng.uniform(0.05, 0.5) * dead_after,
            }.get(kind, 0.0)
            faults.append(Fault(round(t, 3), kind, round(seconds, 3), rng.randrange(1 << 16), rng.randrange(1, 1 << 16)))
            t += rng.uniform(*every) + seconds
        return Schedule(seed, faults)

    # -- running -------------------------------------------------------------------------------

    def instances(self) -> list[Engine]:
        """Service instances up now (not crashed, not left)."""
        return [e for e in self.harness.up() if e.service is not None]

    def _others_up(self, engine: Engine) -> bool:
        """Another instance of ``engine``'s service is up (not crashed, not left)."""
        assert engine.service is not None
        return any(e is not engine and e.service is not None and e.service.name == engine.service.name
                   and e.lifecycle.state != "left" for e in self.instances())

    async def run(self, schedule: Schedule) -> None:
        """Apply every fault at its time (virtual), then heal and restart what is down."""
        h = self.harness
        self._now0 = h.now
        for fault in schedule.faults:
            wait = self._now0 + fault.at - h.now
            if wait > 0:
                await h.advance(wait)
            line = await self._apply(fault)
            schedule.log.append(f"t={h.now - self._now0:7.2f}s {line}")
        h.heal()

    async def _apply(self, fault: Fault) -> str:
        h = self.harness
        up = h.up()
        instances = self.instances()
        kind = fault.kind
        if kind in ("partition", "long_partition"):
            side_a = [e for i, e in enumerate(up) if fault.side >> (i % 16) & 1]
            side_b = [e for e in up if e not in side_a]
            if not side_a or not side_b:
                return f"{kind}: nothing to split"
            h.partition(side_a, side_b)
            await h.advance(fault.seconds)
            h.heal()
            return f"{kind} {fault.seconds:.1f}s: {_names(side_a)} | {_names(side_b)}"
        if kind in ("pause", "long_pause", "jump"):
            target = up[fault.pick % len(up)]
            if kind == "jump":
                h.jump(target, fault.seconds)
                return f"clock of {target.name} jumps {fault.seconds:.1f}s"
            h.pause(target, fault.seconds)
            return f"{kind} {target.name} for {fault.seconds:.1f}s"
        if kind == "crash":
            if len(instances) <= self.min_instances:
                return "crash: too few instances"
            target = instances[fault.pick % len(instances)]
            self.died.add(target.incarnation)
            h.crash(target)
            self.crashed.append(target)
            return f"crash {target.name}"
        if kind == "bounce":
            candidates = instances + ([e for e in self.clients if e in up] if self.bounce_clients else [])
            if not candidates:
                return "bounce: nothing up"
            target = candidates[fault.pick % len(candidates)]
            self.died.add(target.incarnation)
            h.crash(target)
            await h.advance(fault.seconds)
            new = h.restart(target)
            if target in self.clients:
                self.clients[self.clients.index(target)] = new
            return f"bounce {target.name}: down {fault.seconds:.2f}s, back as incarnation {new.incarnation:016x}"
        if kind == "restart":
            if not self.crashed:
                return "restart: nothing crashed"
            old = self.crashed.pop(fault.pick % len(self.crashed))
            new = h.restart(old)
            return f"restart {old.name} as {new.name}"
        if kind == "join":
            if len(instances) >= self.max_instances:
                return "join: enough instances"
            names = sorted(self.services)
            service = self.services[names[fault.pick % len(names)]]
            new = h.join(service)
            return f"join {new.name}"
        if kind == "leave":
            if len(instances) <= self.min_instances:
                return "leave: too few instances"
            target = instances[fault.pick % len(instances)]
            name = target.name
            last = not self._others_up(target)
            drained = await h.leave(target)
            if last or not self._others_up(target):
                self.left_last[name] = h.now
            if target.service is not None:
                self.crashed.append(target)  # a left instance is restarted like a crashed one
            if not drained:  # what it still held is treated like a crash's (README, graceful scale-in)
                self.died.add(target.incarnation)
            return f"leave {target.name}" + ("" if drained else " (drain timed out)")
        raise ValueError(f"unknown fault {kind!r}")

    async def settle(self, timeout: float = 120.0) -> None:
        """Heal, restart what is down, wait until every running node sees every other alive."""
        h = self.harness
        h.heal()
        h.paused.clear()
        while self.crashed:
            h.restart(self.crashed.pop())
        for name, service in self.services.items():
            if not any(e.service is service for e in self.instances()):
                h.join(service)

        def converged() -> bool:
            up = h.up()
            endpoints = {e.transport.endpoint for e in up}
            return all(
                {p.endpoint for p in e.membership.live_peers()} >= endpoints and e.state == "joined" for e in up
            )

        await h.run_until(converged, timeout, "the mesh converged after the nemesis")


def _names(engines: list[Engine]) -> str:
    return ",".join(e.name for e in engines)
