"""Real processes under a seeded random schedule of faults while keyed events stream.

The fault schedules of tests/sim/test_nemesis.py run the real engine over a simulated link and
clock; this runs real node processes on 127.0.0.1, with real signals, a real clock and ZeroMQ:
instances of the ``elastic`` service are killed (SIGKILL), frozen (SIGSTOP) for less than
``suspect_after`` or for longer than ``suspect_after + dead_after``, stopped (SIGTERM), joined
and started afresh (sometimes none is left for a while: what is emitted meanwhile waits at the
producer), while one producer emits keyed events at a steady rate. Then every record the
instances wrote (the ground truth, see recording.py) is checked against the README's promises:

* nothing lost: every emitted event handled;
* each instance handled each key's events in order, and merged by time a key's events are in
  order, except for what a crashed or long-frozen instance handled and a survivor handled again;
* nothing twice, except that crash window: of the handlings of a duplicate, all but one were by
  instances killed or frozen past ``dead_after`` (or cut off that long, or told after a heal that
  a member cut off that long had declared them dead: their logs say so), and there are at most
  ``window`` duplicates per such fault (``checks.check_moves``).

On hosts of their own (network namespaces, see netns.py; the producer on the test process's
side of their bridge), the network fails too: an instance is cut off from everything (a firewall
rule in its namespace) for less than ``suspect_after`` or for longer than ``suspect_after +
dead_after`` (counted as a crash: the mesh takes it for dead while it runs), and two instances
are cut from each other while both still reach everyone else (nobody is taken for dead; what one
hands the other waits for the cut to heal).

``CHAOS_SEEDS`` (default 1) schedules of ``CHAOS_SECONDS`` (30) at ``CHAOS_RATE`` events/s
(3,000), on loopback and on hosts; ``make soak`` runs more, faster. The same faults also hit a
keyed service with standby copies, a pipeline of two services (on loopback and on hosts), and on
loopback the owners of commands that callers send (each schedule half as long). A failure prints the
schedule as it ran and every process's log.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from choreo import ChoreoError, Service
from choreo.launch import NodeProcess
from choreo.node import Node

from .checks import check_moves, expected_stream
from .netns import Hosts
from .recording import Add, Produced, counter, elastic, forward, read_timed, sink, tally
from .test_membership import FAST

pytestmark = pytest.mark.slow

SEEDS = int(os.environ.get("CHAOS_SEEDS", "1"))
FIRST = int(os.environ.get("CHAOS_FIRST", "1"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "30"))
RATE = int(os.environ.get("CHAOS_RATE", "3000"))
KEYS = 200
CALLERS = 16  # commands in flight at once
LOG_LEVEL = os.environ.get("CHAOS_LOG_LEVEL", "WARNING")  # each process's, printed on a failure (INFO: its story; DEBUG: every partition's moves too)
MOST = 4  # instances at once
SHORT_PAUSE = (0.2, 0.8)  # short of suspect_after (1.0 s), far from being taken for dead (3.5 s)
LONG_PAUSE = (FAST.suspect_after + FAST.dead_after + 1.5, FAST.suspect_after + FAST.dead_after + 5.0)
PROCESS_FAULTS = ["kill", "kill", "term", "join", "short_pause", "long_pause", "long_pause"]
NETWORK_FAULTS = ["short_isolation", "long_isolation", "cut_between_two"]  # on hosts of their own


class Chaos:
    """The instances, the faults done to them, and the story of the run."""

    def __init__(self, procs, seed: int, hosts: Hosts | None = None, services: tuple[Service, ...] = (elastic,)) -> None:
        self.procs = procs
        self.services = services  # the faults hit the instances of each
        self.rng = random.Random(seed)
        self.hosts = hosts  # None: every process on 127.0.0.1
        self.free = list(range(1, MOST + 1))  # hosts without a process (with hosts)
        self.host_of: dict[int, int] = {}  # pid -> its host
        self.live: list[NodeProcess] = []
        self.service_of: dict[int, str] = {}  # pid -> the service it runs
        self.born: dict[str, int] = {}  # record file -> when its instance started (time_ns)
        self.fell: dict[str, int] = {}  # record file of a crashed instance -> when it crashed
        self.crashed: set[str] = set()  # record files whose instance was killed or frozen past dead_after
        self.crash_faults = 0
        self.story: list[str] = []
        self.t0 = time.monotonic()
        self.client_endpoint = ""

    def say(self, what: str) -> None:
        self.story.append(f"{time.monotonic() - self.t0:6.1f} s  {what}")

    @property
    def client_bind(self) -> str:
        return "tcp://127.0.0.1:0" if self.hosts is None else f"tcp://{self.hosts.gateway}:0"

    def live_of(self, service: Service) -> list[NodeProcess]:
        return [p for p in self.live if self.service_of[p.pid] == service.name]

    def file(self, p: NodeProcess) -> str:
        """The record file of ``p`` (recording.py)."""
        return f"{self.service_of[p.pid]}-{p.pid}.log"

    def start(self, service: Service | None = None) -> NodeProcess:
        """Start an instance of ``service`` (by default of the service with the fewest)."""
        service = service or min(self.services, key=lambda s: len(self.live_of(s)))
        # seeds: live instances and the producer, which lives throughout (a newcomer must reach the mesh)
        seeds = [p.endpoint for p in self.live[:2]] + [self.client_endpoint]
        where: dict = {}
        if self.hosts is not None:  # (a private test network without keys: insecure on purpose)
            host = self.free.pop(0)
            where = {"netns": self.hosts.namespace(host), "bind": f"tcp://{self.hosts.address(host)}:0",
                     "insecure": True}
        p = self.procs.start(service, peers=[s for s in seeds if s], config=FAST, log_level=LOG_LEVEL, **where)
        if self.hosts is not None:
            self.host_of[p.pid] = host
        self.live.append(p)
        self.service_of[p.pid] = service.name
        self.born[self.file(p)] = time.time_ns()
        named = f" ({service.name})" if len(self.services) > 1 else ""
        self.say(f"start {p.pid}{named}" + (f" on host {host}" if self.hosts is not None else ""))
        return p

    def taken_for_dead_by_others(self) -> None:
        """Instances the mesh took for dead that no fault of the schedule was aimed at: those told
        so by a member that declared them dead while it was cut off, once the cut healed (each
        side of a long partition declares the other dead; README, "a network partition"). Each
        rejoined as a new incarnation, so what it had handled and not yet acknowledged may be
        handled again: the crash window, for them too. Their logs say it (the node's warning)."""
        for p in self.procs.started:
            file = self.file(p)
            if file not in self.crashed and "declared us dead" in p.stderr():
                self.crashed.add(file)
                self.fell.setdefault(file, time.time_ns())
                self.crash_faults += 1
                self.say(f"{p.pid} was told it had been declared dead (its log): its crash window counts")

    def gone(self, victim: NodeProcess) -> None:
        """``victim`` exited: its host takes the next process."""
        self.live.remove(victim)
        host = self.host_of.pop(victim.pid, None)
        if host is not None:
            self.free.append(host)

    async def run(self, seconds: float) -> None:
        rng = self.rng
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            fault = rng.choice(PROCESS_FAULTS + (NETWORK_FAULTS if self.hosts is not None else []))
            if fault == "join" or not self.live:
                if len(self.live) < MOST:
                    await asyncio.to_thread(self.start)
                continue
            victim = rng.choice(self.live)
            file = self.file(victim)
            if fault == "kill":
                self.gone(victim)
                await asyncio.to_thread(victim.kill)
                self.crashed.add(file)
                self.fell.setdefault(file, time.time_ns())
                self.crash_faults += 1
                self.say(f"SIGKILL {victim.pid}")
            elif fault == "term":
                self.gone(victim)
                self.say(f"SIGTERM {victim.pid}")
                status = await asyncio.to_thread(victim.stop, 60)
                self.say(f"{victim.pid} exited {status}")
            elif fault in NETWORK_FAULTS:
                await self.cut(fault, victim, file)
            else:
                pause = rng.uniform(*(SHORT_PAUSE if fault == "short_pause" else LONG_PAUSE))
                if fault == "long_pause":
                    self.crashed.add(file)
                    self.fell.setdefault(file, time.time_ns())
                    self.crash_faults += 1
                self.say(f"SIGSTOP {victim.pid} for {pause:.1f} s")
                os.kill(victim.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(pause)
                finally:
                    os.kill(victim.pid, signal.SIGCONT)
                self.say(f"SIGCONT {victim.pid}")
            for service in self.services:
                if len(self.live_of(service)) < 2 and rng.random() < 0.7:  # else none or one is left for a while
                    await asyncio.to_thread(self.start, service)
        for service in self.services:  # the producer may be waiting for one (its emits wait while none is live)
            if not self.live_of(service):
                await asyncio.to_thread(self.start, service)

    async def cut(self, fault: str, victim: NodeProcess, file: str) -> None:
        """A network fault on ``victim``'s host, lifted after a while (also when cancelled)."""
        assert self.hosts is not None
        host = self.host_of[victim.pid]
        if fault == "cut_between_two":
            others = [p for p in self.live if p is not victim]
            if not others:
                return
            other = self.rng.choice(others)
            lasts = self.rng.uniform(*LONG_PAUSE)  # both reach everyone else: neither is taken for dead
            await asyncio.to_thread(self.hosts.cut, host, self.host_of[other.pid])
            self.say(f"cut {victim.pid} from {other.pid} for {lasts:.1f} s")
            healed = (host, self.host_of[other.pid])
        else:
            lasts = self.rng.uniform(*(SHORT_PAUSE if fault == "short_isolation" else LONG_PAUSE))
            if fault == "long_isolation":  # taken for dead while it runs on: a crash, for the checker
                self.crashed.add(file)
                self.fell.setdefault(file, time.time_ns())
                self.crash_faults += 1
            await asyncio.to_thread(self.hosts.isolate, host)
            self.say(f"isolate {victim.pid} for {lasts:.1f} s")
            healed = (host,)
        try:
            await asyncio.sleep(lasts)
        finally:
            await asyncio.to_thread(self.hosts.heal, *healed)
        self.say(f"healed {' and '.join(str(p.pid) for p in self.live if self.host_of.get(p.pid) in healed)}")


@asynccontextmanager
async def client_of(chaos: Chaos) -> AsyncIterator[Node]:
    """The producer's node, for the whole run: joined through the first instance, and seeing
    every instance started so far (newcomers name it among their seeds)."""
    first = chaos.live[0].endpoint
    async with Node(None, bind=chaos.client_bind, peers=[first], config=FAST, insecure=True) as client:
        chaos.client_endpoint = client.endpoint
        await client.wait_for({s.name: len(chaos.live_of(s)) for s in chaos.services}, timeout=30)
        yield client


async def produce(chaos: Chaos, seconds: float) -> int:
    """Emit RATE keyed events a second while the faults run; returns how many were emitted."""
    async with client_of(chaos) as client:
        faults = asyncio.create_task(chaos.run(seconds))
        sent, start = 0, time.monotonic()
        try:
            while not faults.done():
                due = int((time.monotonic() - start) * RATE)
                while sent < due:
                    await client.emit(Produced(k=f"k{sent % KEYS}", n=sent), timeout=60)
                    sent += 1
                await asyncio.sleep(0.002)  # (pacing: RATE events a second)
        except BaseException:
            faults.cancel()  # (a frozen instance is sent SIGCONT as its pause is cancelled)
            raise
        await faults  # its error, if it had one
        chaos.say(f"emitted {sent}; waiting for every ack")
        await client.flush(timeout=120)
        chaos.say("all acknowledged")
        return sent


async def call(chaos: Chaos, seconds: float) -> int:
    """CALLERS callers send keyed commands one after another while the faults run, each again
    (the same id: its fields are its idempotency key) after an error, as an application would,
    until it is answered; returns how many were sent. Each answer must be the command's result."""
    async with client_of(chaos) as client:
        faults = asyncio.create_task(chaos.run(seconds))
        sent = 0
        errors: Counter[str] = Counter()

        async def caller() -> None:
            nonlocal sent
            while not faults.done():
                cmd = Add(k=f"k{sent % KEYS}", n=sent)
                sent += 1
                give_up = time.monotonic() + 120
                while True:
                    try:
                        result = await client.send(cmd, timeout=10)
                        break
                    except ChoreoError as e:
                        errors[type(e).__name__] += 1
                        assert time.monotonic() < give_up, f"{cmd} unanswered for 120 s, the last error: {e!r}"
                        await asyncio.sleep(0.05)
                assert result == 2 * cmd.n, f"{cmd} answered {result!r}"

        callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
        try:
            await asyncio.gather(*callers)
        except BaseException:
            faults.cancel()
            for task in callers:
                task.cancel()
            raise
        await faults
        chaos.say(f"sent {sent} commands, each answered; errors before an answer: {dict(errors) or 'none'}")
        return sent


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_real_processes_under_random_faults_lose_nothing_and_repeat_only_the_crash_window(
    procs, seed: int
) -> None:
    run(Chaos(procs, seed), seed)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_on_hosts_of_their_own_cuts_and_isolations_lose_nothing_and_repeat_only_the_crash_window(
    procs, seed: int
) -> None:
    with Hosts(MOST) as hosts:
        run(Chaos(procs, seed, hosts), seed)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_a_keyed_service_with_standby_copies_loses_nothing_and_repeats_only_the_crash_window(procs, seed: int) -> None:
    """``tally`` keeps state per key, with a standby copy of each partition on another instance
    (``replicas=1``: a message is acknowledged once its write reached the standby), under the same
    faults: what a crash moves goes to the standby, which has the writes and their ids."""
    run(Chaos(procs, seed, services=(tally,)), seed, seconds=SECONDS / 2)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_a_pipeline_of_two_services_under_random_faults_hands_its_second_stage_each_event_once(procs, seed: int) -> None:
    """``forward`` handles each event and emits it on; ``sink`` handles what it emits. The faults
    hit the instances of both. A ``forward`` instance that crashes after emitting runs its
    messages again elsewhere, emitting the same ids (derived from the input's): the sink drops
    them, so it handles each event once but for its own crash window, in order per key, though
    the events of a key come to it from one ``forward`` instance and then another."""
    run(Chaos(procs, seed, services=(forward, sink)), seed, seconds=SECONDS / 2)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_a_pipeline_on_hosts_of_their_own_hands_its_second_stage_each_event_once(procs, seed: int) -> None:
    """The pipeline above, each instance on a host of its own, where the network fails too (a
    first-stage instance cut from everything, or from the other one): fresh seed 7 found a sink
    newcomer running, as the whole service stopped, events of a partition it never had."""
    with Hosts(MOST) as hosts:
        run(Chaos(procs, seed, hosts, services=(forward, sink)), seed, seconds=SECONDS / 2)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_commands_under_random_faults_are_each_answered_and_run_once_but_for_the_crash_window(procs, seed: int) -> None:
    """Callers send keyed commands to ``counter`` while its instances are killed, frozen and
    stopped; a caller sends a command again after an error (``Backpressure`` while none is
    live, a timeout). Each is answered with its own result, and runs once but for the crash window
    of its owner (an owner that ran it and died before its answer left: its next owner has no
    record of the id). Commands of a key are sent concurrently, so their order is not checked."""
    run(Chaos(procs, seed, services=(counter,)), seed, workload=call, ordered=False, seconds=SECONDS / 2)


def run(chaos: Chaos, seed: int, workload: Callable[[Chaos, float], Awaitable[int]] | None = None,
        ordered: bool = True, seconds: float = SECONDS) -> None:
    procs = chaos.procs
    for _ in range(2):
        for service in chaos.services:
            chaos.start(service)
    try:
        sent = asyncio.run(asyncio.wait_for((workload or produce)(chaos, seconds), seconds + 300))
        procs.close()
        chaos.taken_for_dead_by_others()
        expected = expected_stream(sent, KEYS)
        end = time.time_ns()
        for service in chaos.services:  # (the last stage's duplicates are the ones reported)
            lives = [(chaos.born[f], chaos.fell.get(f, end)) for f in chaos.crashed if f.startswith(f"{service.name}-")]
            duplicates = check_moves(read_timed(str(procs.record_dir), service.name), expected,
                                     f"seed {seed}, {service.name}", crashed=chaos.crashed,
                                     max_duplicates=FAST.window * chaos.crash_faults, ordered=ordered,
                                     crashed_lives=lives)
    except BaseException as exc:
        story = "\n".join(chaos.story)
        raise AssertionError(f"seed {seed}: {exc}\nthe schedule as it ran:\n{story}\n{procs.stderr()}") from exc
    print(f"seed {seed}: {sent} messages, {chaos.crash_faults} crashes, {duplicates} handled again\n" + "\n".join(chaos.story))
