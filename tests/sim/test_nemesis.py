"""The guarantees at the edges of membership, under seeded random fault schedules (the nemesis).

A producer emits keyed events and sends commands to a service of several instances while the
nemesis partitions the network (shorter and longer than ``dead_after``), crashes, restarts,
adds and gracefully removes instances (the last one too), pauses nodes and makes clocks jump.
After the schedule the mesh is healed, and the checker asserts:

* liveness: the producer's ``flush`` completes and every command is answered, within a bound;
* nothing lost: every event the producer emitted was handled;
* nothing twice outside the crash window: of the handlings of a message, all but one were by
  incarnations that some node took for dead (it crashed, or was cut off or paused for longer
  than ``dead_after``): whoever sent it the message resent it to the partition's new owner,
  which lacked the dead one's dedup id (the dead one may have run it first, or after, when
  it was already on its way to it: replicas seed 21417); or (in memory) first handled by the
  service's last instance, which left after the mesh took the producer for dead: the producer
  never saw the acks and sent it again on its next life, when no instance knew its id;
* order: per key, first handlings come in the order the producer emitted them.

Durable nodes (every node, the client too, with a data dir; with and without standby copies)
face the durable schedules: nodes killed and started again on their data dirs a moment later
(``bounce``, the client included),
partitions and pauses shorter than ``dead_after``, joins and graceful leaves. Their checker is
stricter: nothing handled twice, events or commands, whoever crashed, except what a crash caught
after its handler ran and before its commit (the harness notes those: ``Harness.uncommitted``).

The same schedules run with standby copies (``replicas=1``: every write waits for its standby,
copy streams restart as standbys change, owners die with copies in flight) under the memory
checker: nothing may wedge, be lost, or run twice outside the crash window. With single faults
(one instance down at a time, 12 to 16 s apart, so that every standby's copy is whole again:
crashes, restarts at once under a new incarnation, joins, graceful leaves), the checker is the
durable one's on state: each key's state counts each of its readings handled exactly once (a
crashed owner's standby, or whichever instance wins its partitions, has its state).

The saga workload (``saga=True``) sends each reading on a round trip before it is acknowledged:
meter -> relay -> meter under another key -> meter under the reading's own key, every step
counted in state, while both services' instances face the schedules (the last one of either
too). Its checker adds: every step of every reading handled, and once outside the same windows
(a step's senders are whoever handled the step before it); the state of every key it wrote.
``make test`` runs NEMESIS_SAGA_SEEDS of each kind (default 3), the saga schedules that once
failed (:data:`SAGA_REGRESSIONS`), and any known to fail today as expected failures
(:data:`SAGA_KNOWN_FAILURES`: none since replicas 195 passes).

``make test`` runs NEMESIS_SEEDS seeds (default 30), NEMESIS_DURABLE_SEEDS durable ones
(default 10: seeds 8 and 9 once caught a restarted node losing its state to a newcomer) and
NEMESIS_REPLICA_SEEDS with replicas, and as many with single faults (default 10; seeds 1 to 200
passed when they were added; before standby copies were handed to a newcomer, 7 of the first 12
single-fault seeds lost state);
``make soak`` runs 1,000 of each. Seventeen schedules of 100 s (3,000 events) that once failed run in
``make test`` too (``LONG_REGRESSIONS``): longer schedules reach states the 50 s ones rarely do.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from choreo import Command, Event, NodeConfig, Service, core
from choreo.errors import ChoreoError
from choreo.messages import idempotency_id, message_options
from choreo.nemesis import DURABLE_FAULTS, FAULTS, Nemesis
from choreo.runtime.engine import Engine
from choreo.runtime.routing import key_bytes
from choreo.testing import Harness

SEEDS = int(os.environ.get("NEMESIS_SEEDS", "30"))
DURABLE_SEEDS = int(os.environ.get("NEMESIS_DURABLE_SEEDS", "10"))
REPLICA_SEEDS = int(os.environ.get("NEMESIS_REPLICA_SEEDS", "10"))
SAGA_SEEDS = int(os.environ.get("NEMESIS_SAGA_SEEDS", "3"))  # of each kind
FIRST_SEED = int(os.environ.get("NEMESIS_FIRST_SEED", "1"))
KEYS = 12
SINGLE_FAULTS = ("bounce", "crash", "restart", "join", "leave")  # replicas=1: no state may be lost


class Reading(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


class Tally(Command, key="k", idempotency=["k", "n"]):
    k: str
    n: int


class Check(Event, key="c", idempotency=["k", "n"]):
    """The saga's first step out: a reading, to the relay, under another key (:meth:`Ledger.relay`)."""

    c: str
    k: str
    n: int


class Line(Event, key="j", idempotency=["k", "n"]):
    """The relay's answer, back to the meter under a third key."""

    j: str
    k: str
    n: int


class Checked(Event, key="k", idempotency=["k", "n"]):
    """The last step: back to the reading's own key (its partition may have moved meanwhile)."""

    k: str
    n: int


class Seen(msgspec.Struct):
    """The meter's state per key: what it counted (each count committed with its message)."""

    readings: int = 0
    checked: int = 0
    lines: int = 0


class Ledger:
    """What happened, to check afterwards."""

    def __init__(self) -> None:
        self.handled: dict[tuple[str, int], list[str]] = defaultdict(list)  # (k, n) -> instances, in order
        self.order: dict[str, list[int]] = defaultdict(list)  # k -> n of first handlings, in order
        self.tallied: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.emitted: list[tuple[str, int]] = []
        self.answered: dict[tuple[str, int], int] = {}
        self.sender: dict[tuple[str, int], str] = {}  # (k, n) -> the client incarnation that first sent it
        self.command_sender: dict[tuple[str, int], str] = {}
        # the saga's steps (``saga=True``): (k, n) -> the instances that handled each, in order
        self.steps: dict[str, dict[tuple[str, int], list[str]]] = {
            "Check": defaultdict(list), "Line": defaultdict(list), "Checked": defaultdict(list)}
        # (what, k, n) -> when each handling above was (virtual time), what: a step, Reading or Tally
        self.when: dict[tuple[str, str, int], list[float]] = defaultdict(list)
        self.clock: Callable[[], float] = lambda: 0.0  # the harness's, once there is one

    def note(self, what: str, k: str, n: int, who: list[str], instance: str) -> None:
        who.append(instance)
        self.when[(what, k, n)].append(self.clock())

    def service(self, replicas: int = 0, saga: bool = False) -> Service:
        """The meter. With ``saga``, each reading goes on a round trip before it is acknowledged:
        Check to the relay (under key ``c``), Line back to the meter (under key ``j``), Checked to
        the reading's own key: a flow that comes back to the partition it started from, through
        other instances and another service (the shape of the shop's stock reservation)."""
        meter = Service("meter", partitions=16, state=[Seen], replicas=replicas)

        def count(ctx, **more: int) -> None:  # type: ignore[no-untyped-def]
            seen = ctx.state.get(Seen) or Seen()
            ctx.state.put(msgspec.structs.replace(
                seen, **{field: getattr(seen, field) + n for field, n in more.items()}))

        @meter.on(Reading, emits=[Check] if saga else [])
        def on_reading(ev: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
            seen = self.handled[(ev.k, ev.n)]
            if not seen:
                self.order[ev.k].append(ev.n)
            self.note("Reading", ev.k, ev.n, seen, ctx.instance)
            count(ctx, readings=1)
            if saga:
                ctx.emit(Check(c=f"c{ev.n % 5}", k=ev.k, n=ev.n))

        if saga:
            @meter.on(Line, emits=[Checked])
            def on_line(ev: Line, ctx) -> None:  # type: ignore[no-untyped-def]
                self.note("Line", ev.k, ev.n, self.steps["Line"][(ev.k, ev.n)], ctx.instance)
                count(ctx, lines=1)
                ctx.emit(Checked(k=ev.k, n=ev.n))

            @meter.on(Checked)
            def on_checked(ev: Checked, ctx) -> None:  # type: ignore[no-untyped-def]
                self.note("Checked", ev.k, ev.n, self.steps["Checked"][(ev.k, ev.n)], ctx.instance)
                count(ctx, checked=1)

        @meter.command(Tally)
        def on_tally(cmd: Tally, ctx) -> int:  # type: ignore[no-untyped-def]
            self.note("Tally", cmd.k, cmd.n, self.tallied[(cmd.k, cmd.n)], ctx.instance)
            return cmd.n * 2

        return meter

    def relay(self) -> Service:
        """The saga's other service: stateless, it sends each Check back to the meter as a Line."""
        relay = Service("relay", partitions=8)

        @relay.on(Check, emits=[Line])
        def on_check(ev: Check, ctx) -> None:  # type: ignore[no-untyped-def]
            self.note("Check", ev.k, ev.n, self.steps["Check"][(ev.k, ev.n)], ctx.instance)
            ctx.emit(Line(j=f"j{ev.n % 7}", k=ev.k, n=ev.n))

        return relay


class Crashed(Exception):
    """The client crashed (a durable client is started again: the call is made again on it)."""


def calls_on(harness: Harness, clients: list[Engine], durable: bool) -> Callable[[Callable[[Engine], Any]], Any]:
    """How the producer calls its client: directly, or (durable: the client may be killed) on the
    client of now, giving up on a call whose client crashed (a dead process returns nothing)."""

    async def direct(call: Callable[[Engine], Awaitable[Any]]) -> Any:
        return await call(clients[0])

    async def unless_crashed(call: Callable[[Engine], Awaitable[Any]]) -> Any:
        while clients[0].transport.closed:  # down: the nemesis starts it again in a moment
            await harness.sleep(0.05)
        client = clients[0]
        task = asyncio.ensure_future(call(client))
        while not task.done():
            if client.transport.closed:
                task.cancel()
                raise Crashed(client.name)
            await harness.sleep(0.01)
        return task.result()

    return unless_crashed if durable else direct


async def produce(  # type: ignore[no-untyped-def]
    harness: Harness, call, ledger: Ledger, events: int, commands_every: int, pace: float, client: Callable[[], Engine]
) -> None:
    for i in range(events):
        await harness.sleep(pace)
        ev = Reading(k=f"k{i % KEYS}", n=i)
        ledger.sender[(ev.k, ev.n)] = client().name
        while True:
            try:
                await call(lambda client: client.emit(ev, timeout=5.0))
                break
            except ChoreoError:  # backpressure while the mesh is cut: the same event again (same id)
                await asyncio.sleep(0)
            except Crashed:  # the same event again, on the client's next life (same id)
                pass
        ledger.emitted.append((ev.k, ev.n))
        if i % commands_every == 0:
            cmd = Tally(k=ev.k, n=i)
            ledger.command_sender[(cmd.k, cmd.n)] = client().name
            failed = 0
            while failed < 50:
                try:
                    ledger.answered[(cmd.k, cmd.n)] = await call(lambda client: client.send(cmd, timeout=5.0))
                    break
                except ChoreoError:
                    failed += 1
                    await asyncio.sleep(0)
                except Crashed:  # our own client died: not an attempt that failed; again on its next life
                    pass


def died_names(harness: Harness, nemesis: Nemesis) -> set[str]:
    """Every incarnation that crashed, rejoined, or that some node declared dead."""
    names: set[str] = set(harness.declared_dead)
    for engine in harness.history:
        names.update(engine.former_names)
        if engine.incarnation in nemesis.died:
            names.add(engine.name)
    return names


def run_one(
    seed: int, *, events: int = 1500, duration: float = 50.0, data_root: str | None = None, replicas: int = 0,
    single_faults: bool = False, saga: bool = False,
) -> None:
    durable = data_root is not None
    ledger = Ledger()
    meter = ledger.service(replicas, saga)
    services = {"meter": meter}
    config = NodeConfig(window=64, suspect_after=1.0, dead_after=3.0, heartbeat=0.25, handover_timeout=6.0,
                        emit_timeout=5.0, request_timeout=5.0)
    harness = Harness(seed=seed, drop=0.01, duplicate=0.01, reorder=0.02, config=config, data_root=data_root)
    ledger.clock = lambda: harness.now
    client = harness.add(None)
    for _ in range(3):
        harness.add(meter)
    if saga:  # two relay instances: room for a join of either service
        services["relay"] = ledger.relay()
        for _ in range(2):
            harness.add(services["relay"])
    most = 4 + 2 * saga
    if single_faults:  # one instance down at a time, the copies whole again before the next fault
        nemesis = Nemesis(harness, services, clients=[client], min_instances=2 + 2 * saga, max_instances=most)
        plan = nemesis.draw(duration=duration, kinds=SINGLE_FAULTS, every=(12.0, 16.0))
    else:
        nemesis = Nemesis(harness, services, clients=[client], bounce_clients=durable, max_instances=most)
        plan = nemesis.draw(duration=duration, kinds=DURABLE_FAULTS if durable else FAULTS)
    call = calls_on(harness, nemesis.clients, durable)

    emptied = []  # the meter had no instance that could come back with its data dir (all left)
    # (service, partition) -> (since when, the incarnations that own it), as it changed
    owners: dict[tuple[str, int], list[tuple[float, frozenset[str]]]] = defaultdict(list)

    async def watch_instances() -> None:
        while True:
            await harness.sleep(0.05)
            if not any(e.service is meter and e.lifecycle.state != "left" for e in harness.engines.values()):
                emptied.append(harness.now)
            up = [e for e in harness.up() if e.moves is not None]
            for svc in services.values():
                for p in range(svc.partitions):
                    now = frozenset(e.name for e in up if e.service is svc and e.moves.ownership.state[p] == "owned")
                    changes = owners[(svc.name, p)]
                    if not changes or changes[-1][1] != now:
                        changes.append((harness.now, now))

    async def scenario() -> None:
        await harness.start()
        watcher = asyncio.ensure_future(watch_instances())
        producer = asyncio.ensure_future(
            produce(harness, call, ledger, events, 25, pace=duration / events, client=lambda: nemesis.clients[0])
        )
        await harness.run(nemesis.run(plan), timeout=duration * 4)
        await nemesis.settle()
        await harness.run(producer, timeout=600)
        await harness.run_until(
            lambda: nemesis.clients[0].acknowledged, 120, "everything the producer sent acknowledged"
        )
        if saga:  # a durable node acknowledges what it stored: the round trips may still be under way
            await harness.run_until(lambda: all(e.acknowledged for e in harness.up()), 120,
                                    "every instance's sends acknowledged")
        watcher.cancel()
        if durable or single_faults:  # every partition with one owner again, none moving
            await harness.run_until(lambda: settled(harness, list(services.values())), 60, "partitions settled")

    try:
        asyncio.run(scenario())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{plan.describe()}") from None
    died = set() if durable else died_names(harness, nemesis)
    story = plan.describe()

    def uncommitted(message: Event | Command, who: list[str]) -> bool:
        """Durable: every earlier handling was one a crash caught before its commit."""
        return durable and all((name, idempotency_id(message)) in harness.uncommitted for name in who[:-1])

    def orphaned(senders: list[str], who: list[str]) -> bool:
        """In memory: every earlier handling was by the service's last instance, which left
        (its dedup ids with it) after the mesh took a sender for dead: the sender never saw
        the acks, sent it again on its next life, and nobody was left who knew the id."""
        return not durable and any(
            (when := harness.dead_at.get(sender)) is not None
            and all(name in died or nemesis.left_last.get(name, -1.0) >= when for name in who[:-1])
            for sender in senders)

    def crash_window(who: list[str]) -> bool:
        """In memory: every handling but one was by an incarnation some node took for dead."""
        return sum(name not in died for name in who) <= 1

    def ids_lost(message: Event | Command) -> bool:
        """In memory: between the first handling and the last, the message's partition was owned
        by an incarnation some node took for dead: the partition's dedup ids, the message's
        among them, went to it with the partition and died with it (README: a crash)."""
        what = type(message).__name__
        times = ledger.when[(what, message.k, message.n)]  # type: ignore[union-attr]
        service = "relay" if what == "Check" else "meter"
        key = key_bytes(getattr(message, message_options(type(message)).key))  # type: ignore[arg-type]
        p = core.partition_of(key, services[service].partitions)
        changes = owners[(service, p)]
        return not durable and any(
            names & died and since < times[-1] and (i + 1 == len(changes) or changes[i + 1][0] > times[0])
            for i, (since, names) in enumerate(changes))

    def excused(message: Event | Command, senders: list[str], who: list[str]) -> bool:
        return crash_window(who) or uncommitted(message, who) or orphaned(senders, who) or ids_lost(message)

    lost = [m for m in ledger.emitted if m not in ledger.handled]
    assert not lost, f"{len(lost)} events emitted and never handled, e.g. {lost[:5]}\n{story}"
    twice = {m: who for m, who in ledger.handled.items()
             if len(who) > 1 and not excused(Reading(k=m[0], n=m[1]), [ledger.sender[m]], who)}
    assert not twice, f"{len(twice)} events handled twice outside the crash window, e.g. {list(twice.items())[:3]}\n{story}"
    if saga:  # each step of each reading's round trip: handled, and once (outside the same windows)
        step_of = {"Check": lambda k, n: Check(c=f"c{n % 5}", k=k, n=n), "Line": lambda k, n: Line(j=f"j{n % 7}", k=k, n=n),
                   "Checked": lambda k, n: Checked(k=k, n=n)}
        before = {"Check": ledger.handled, "Line": ledger.steps["Check"], "Checked": ledger.steps["Line"]}
        for step, handled in ledger.steps.items():
            lost = [m for m in ledger.emitted if m not in handled]
            assert not lost, f"{len(lost)} readings whose {step} was never handled, e.g. {lost[:5]}\n{story}"
            # its senders: whoever handled the step before it (a sender taken for dead sends again)
            twice = {m: who for m, who in handled.items()
                     if len(who) > 1 and not excused(step_of[step](*m), before[step][m], who)}
            assert not twice, f"{len(twice)} {step} handled twice outside the crash window, e.g. {list(twice.items())[:3]}\n{story}"
    tallied_twice = {m: who for m, who in ledger.tallied.items()
                     if len(who) > 1 and not excused(Tally(k=m[0], n=m[1]), [ledger.command_sender[m]], who)}
    assert not tallied_twice, f"commands run twice outside the crash window: {list(tallied_twice.items())[:3]}\n{story}"
    unanswered = [i for i in range(0, events, 25) if (f"k{i % KEYS}", i) not in ledger.answered]
    assert not unanswered, f"commands never answered: {unanswered[:5]}\n{story}"
    assert all(v == n * 2 for (_, n), v in ledger.answered.items())
    for k, ns in ledger.order.items():
        assert ns == sorted(ns), f"key {k} handled out of order: {[(a, b) for a, b in zip(ns, ns[1:]) if b < a]} in {len(ns)}...\n{story}"
    # state commits with each reading's id: every key counted each of its readings once (unless the
    # last instance left: its state is in its data dir, and a newcomer starts on another one)
    if (durable or single_faults) and not emptied:
        keys = [f"k{i}" for i in range(KEYS)] + ([f"j{i}" for i in range(7)] if saga else [])
        counted = state_counts(harness, meter.partitions, keys)
        expected = {k: Seen() for k in keys}
        for field, handled in [("readings", ledger.handled), ("checked", ledger.steps["Checked"])]:
            for k, _ in handled:
                setattr(expected[k], field, getattr(expected[k], field) + 1)
        for k, n in ledger.steps["Line"]:
            expected[f"j{n % 7}"].lines += 1
        assert counted == expected, f"state per key {counted} != messages handled {expected}\n{story}"


def settled(harness: Harness, services: list[Service]) -> bool:
    """Every partition of every service owned by one live instance, none moving."""
    live = [e for e in harness.engines.values() if e.transport.endpoint not in harness.down and e.moves is not None]
    return not any(e.moves.busy for e in live) and all(
        sum(e.moves.ownership.state[p] == "owned" for e in live if e.service.name == svc.name) == 1
        for svc in services for p in range(svc.partitions))


def state_counts(harness: Harness, partitions: int, keys: list[str]) -> dict[str, Seen]:
    """Each key's counts, read from the meter instance that owns its partition now."""
    from choreo import core

    out = {}
    for k in keys:
        key = k.encode()
        p = core.partition_of(key, partitions)
        owners = [e for e in harness.engines.values() if e.transport.endpoint not in harness.down
                  and e.service is not None and e.service.name == "meter"
                  and e.moves is not None and e.moves.ownership.state[p] == "owned"]
        assert len(owners) == 1, f"partition {p} owned by {[e.name for e in owners]}"
        tables = owners[0].dispatcher.state
        body = tables.get(0, p, key)
        out[k] = msgspec.msgpack.decode(body, type=Seen) if body is not None else Seen()
    return out


# seeds that once failed, beyond the default range: 69, a node that re-incarnated with arrivals
# buffered for a partition it awaited, counted as lag for ever (its hand-over of it never came);
# 586, a draining instance whose forwards' target died sent them round to itself, and later
# arrivals of their key (its partition its own again) ran first; 854, a client that re-incarnated
# forgot the members it had declared dead, and sent an event to one the live owner had handled
REGRESSIONS = [69, 586, 854]


@pytest.mark.parametrize("seed", sorted(set(range(FIRST_SEED, FIRST_SEED + SEEDS)) | set(REGRESSIONS if SEEDS else [])))
def test_nothing_lost_nothing_twice_order_kept_under_the_nemesis(seed: int) -> None:
    run_one(seed)


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + REPLICA_SEEDS))
def test_with_standby_copies_the_same_holds_under_the_nemesis(seed: int) -> None:
    # replicas=1: every write waits for its standby's ack before its input is acknowledged, copy
    # streams restart as standbys change, owners die with copies in flight: nothing may wedge
    run_one(seed, replicas=1)


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + REPLICA_SEEDS))
def test_with_standby_copies_single_faults_lose_no_state(seed: int) -> None:
    run_one(seed, replicas=1, single_faults=True, duration=60.0)


SAGA_KINDS = ("plain", "replicas", "durable", "durable+replicas")
# saga schedules that fail today (README, the nemesis paragraph); none since replicas 195 passes.
SAGA_KNOWN_FAILURES: set[tuple[str, int]] = set()
# saga schedules that once failed and pass since their fix: plain 70 (the kept copy of a message
# handed over running). Replicas 21, 70 and 113: one wedge, two meter instances whose channels to
# each other filled with messages whose acks wait on something that must come back over the same
# channel, behind them (a standby's delta; in 70 and 113 a Checked, behind a Reading forwarded by
# the other meter that waited for its original's round trip); relay's last instance, leaving,
# waited for those until its drain timed out (21), or nothing ended it (70, 113). Durable+replicas
# 106 and 186 (a fresh seed): a meter instance drained partitions to a newcomer while its own
# handlers' outputs for them (Checked) went to the newcomer, which kept them unacknowledged until
# the hand-over was in; a window of them held the channel's span, and the hand-over's chunks waited
# behind them. Since a receiver whose channel stalls so acknowledges what ran and waits, or waits
# for its partition's hand-over, its sender keeping copies (runtime/relief.py), they all pass.
# (Plain 129 failed before the kept copy too, for a cause the copy does not touch: a partition of
# 5.9 s with two or more nodes on each side; after the heal both sides were told they had been
# declared dead, and two new incarnations of meter, each joined on what its own side knew, ran
# partition 0 for a moment and both handled the same Checked. With the copy the schedule unfolds
# otherwise and passes; the cause stays, in the README's long-partition row: a quorum would rule it out.)
# Replicas 195: a reading ran at one meter, whose Check waited for a relay instance (none was
# left); its partition went to a second meter with the message running, so the second one owed the
# Check; the first died, and the second sent the Check it owed (parked: still no relay), then died
# too before a relay came. Its standby, now the owner, had the id and not the Check: 20 readings
# whose Check never ran. Since owed outputs go to the standby with the id, until acknowledged
# (PartitionData._standby_owes), it passes.
# Four that failed on the way to the heal's kept copies (a memory node declared dead acknowledges
# what ran with a copy kept, sent to its next life: PartitionData.keep_all_ran, Router.send_again),
# each on a first version of it. Plain 195 lost 31 readings' Checks: a new owner sending the
# outputs of a message handed over running, its old owner dead, acknowledged the producer's copy as
# a duplicate, then died; it fails again with Owed.wait switched off. Plain 174 wedged (a forward
# waiting, as a duplicate, for its original's outputs), replicas 146 ran 4 Checks twice (a copy
# taken for new where the original still ran) and 179 wedged (duplicates that waited for outputs
# another node sends); on the change as it is they pass with or without the mechanism first tried
# for them, and on the code before it: kept as schedules that once caught this change.
# Replicas 87004 (a fresh seed) wedged on the first version of the keys a new owner holds for the
# outputs of messages handed over running (runtime/owed.py, KeyHolds): a Line held behind another
# flow's Line at its key, whose Checked was held behind the first flow's Reading at its own: two
# flows waiting for each other. A hold now lasts handover_timeout at most. On that change plain
# 195 ran two Checked twice, at two live meters: the partition's dedup ids had gone, with the
# partition, to an instance that was then taken for dead (the crash window of the ids' holder,
# which the check now knows: ids_lost).
SAGA_REGRESSIONS = {("plain", 70), ("plain", 174), ("plain", 195), ("replicas", 21), ("replicas", 70),
                    ("replicas", 113), ("replicas", 146), ("replicas", 179), ("replicas", 195),
                    ("durable+replicas", 106), ("durable+replicas", 186), ("replicas", 87004)}


def saga_cases() -> list[Any]:
    cases = sorted({(kind, FIRST_SEED + i) for kind in SAGA_KINDS for i in range(SAGA_SEEDS)}
                   | (SAGA_KNOWN_FAILURES | SAGA_REGRESSIONS if SAGA_SEEDS else set()))
    return [pytest.param(kind, seed, marks=pytest.mark.xfail(strict=True, reason="a known failure (see above)"))
            if (kind, seed) in SAGA_KNOWN_FAILURES else (kind, seed) for kind, seed in cases]


@pytest.mark.parametrize(("kind", "seed"), saga_cases())
def test_a_flow_that_comes_back_to_its_partition_holds_under_the_nemesis(kind: str, seed: int) -> None:
    # each reading goes meter -> relay -> meter (another key) -> meter (its own key) before it is
    # acknowledged, while instances of both services crash, join and leave and partitions move
    # with flows in flight: every step handled, once outside the crash window, the state exact
    run_saga(kind, seed)


def run_saga(kind: str, seed: int, **more: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="choreo-nemesis-") as data_root:
        run_one(seed, saga=True, replicas=1 if "replicas" in kind else 0,
                data_root=data_root if "durable" in kind else None, **more)


# durable seeds that once failed: 612, a handover refused for coming before the view counted as
# handed over when the view came (the partition started without its state: counts lost)
DURABLE_REGRESSIONS = [612]


@pytest.mark.parametrize("seed", sorted(set(range(FIRST_SEED, FIRST_SEED + DURABLE_SEEDS))
                                        | set(DURABLE_REGRESSIONS if DURABLE_SEEDS else [])))
def test_durable_nodes_killed_and_restarted_handle_nothing_twice(seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="choreo-nemesis-") as data_root:
        run_one(seed, data_root=data_root)


# durable and replicated seeds that once failed: 12, an id committed a commit after its writes;
# 45, a durable standby's copy restored after a restart as if it owned the partition; 33, a
# message resent to an interim owner overtaken by the next one sent to the owner after it
DURABLE_REPLICA_REGRESSIONS = [12, 33, 45]


@pytest.mark.parametrize("seed", sorted(set(range(FIRST_SEED, FIRST_SEED + DURABLE_SEEDS))
                                        | set(DURABLE_REPLICA_REGRESSIONS if DURABLE_SEEDS else [])))
def test_durable_nodes_with_standby_copies_handle_nothing_twice(seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="choreo-nemesis-") as data_root:
        run_one(seed, data_root=data_root, replicas=1)


# 100 s schedules (3,000 events) that once failed, each fixed at its cause with a test of its own:
# plain 2053 (a command's answer lost as the last instance left: run again by the next) and 2515
# (the same, the producer taken for dead: the fine print ``orphaned`` excuses), 3303 (envelopes
# taken back at the last instance's goodbye parked behind newer ones), 3109 (a lone node deaf to
# members it never met: the mesh split for good); durable 2103 (a durable node taken for dead:
# its partitions started empty), 2155 (a forward on a stale view sent back behind a later
# arrival), 3245 (news of a node's former life replaced it); replicas 2126 (a waiting copy of an
# answered command run again); durable with replicas 5098 (the same as 2155, the partition the
# forwarder's at once), 3004 (of two stores holding one partition, the older won) and 7121 (a
# member the refutation missed declared a live node dead); plain 9065 (a frozen producer asked
# only dead members to rejoin); durable 11122 (forwards of a draining partition filled the
# channel its hand-over needed); replicas 14030 (a producer's hold ended before what waited in
# the old owner's backlog was acknowledged); durable 25239 (a newcomer whose hello to a holding
# instance was lost joined without its word and started that instance's partition empty); plain
# 31674 (a forward that came back reopened its partition before what waited behind it ran: a
# new arrival of its key ran first). Run with NEMESIS_LONG=0 to leave them out.
LONG_REGRESSIONS = [("plain", 2053), ("plain", 2515), ("plain", 3303), ("plain", 3109), ("durable", 2103),
                    ("durable", 2155), ("durable", 3245), ("replicas", 2126), ("durable+replicas", 5098),
                    ("durable+replicas", 3004), ("durable+replicas", 7121),
                    ("plain", 9065), ("durable", 11122), ("replicas", 14030), ("replicas", 21417),
                    ("durable", 25239), ("plain", 31674)]


@pytest.mark.parametrize(("kind", "seed"), LONG_REGRESSIONS if os.environ.get("NEMESIS_LONG", "1") != "0" else [])
def test_long_schedules_that_once_failed_now_pass(kind: str, seed: int) -> None:
    run_long(kind, seed)


# fresh 100 s schedules of every kind: none in ``make test``, NEMESIS_LONG_SEEDS of each (from
# seed NEMESIS_LONG_FIRST) in ``make soak``, where they find what the 50 s ones rarely reach
LONG_KINDS = ("plain", "durable", "replicas", "durable+replicas")
LONG_FIRST = int(os.environ.get("NEMESIS_LONG_FIRST", "10000"))
LONG_SEEDS = [(kind, LONG_FIRST + i) for kind in LONG_KINDS for i in range(int(os.environ.get("NEMESIS_LONG_SEEDS", "0")))]


if LONG_SEEDS:  # (not even collected in make test: nothing to skip)
    @pytest.mark.parametrize(("kind", "seed"), LONG_SEEDS)
    def test_long_schedules(kind: str, seed: int) -> None:
        run_long(kind, seed)


def run_long(kind: str, seed: int) -> None:
    """A 100 s schedule (3,000 events) of ``kind`` (one of :data:`LONG_KINDS`)."""
    with tempfile.TemporaryDirectory(prefix="choreo-nemesis-") as data_root:
        run_one(seed, events=3000, duration=100.0, replicas=1 if "replicas" in kind else 0,
                data_root=data_root if "durable" in kind else None)
