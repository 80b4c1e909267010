"""Durable nodes on the fake link: a restart loses nothing and repeats nothing.

Every node here has a store (a data dir, or a store in memory that models the OS and the disk),
and "crash" is a crash of the process: what the node had committed survives, nothing else does,
and nothing it had received runs any more. The checks: nothing emitted is lost; nothing handled
is handled again, except a handler a crash caught before its commit (the harness notes those,
``Harness.uncommitted``: the one at-least-once a durable node keeps); per-key order holds; the
restarted node is the same node (same name, same partitions). The same with real processes and
SIGKILL: tests/integration/test_durable.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest

import msgspec

from choreo import Command, Event, NodeConfig, Service, core
from choreo.core import decode_ack, parse_envelopes
from choreo.errors import Backpressure, ChoreoError, StoreFull
from choreo.introspect import node_stats, replay_outcome
from choreo.messages import idempotency_id
from choreo.runtime.membership import durable_key
from choreo.runtime.store import MemoryStore
from choreo.testing import Harness
from choreo import wire

FAST = NodeConfig(window=64, suspect_after=1.0, dead_after=3.0, heartbeat=0.25, handover_timeout=6.0,
                  emit_timeout=5.0, request_timeout=5.0)
KEYS = 8


class Reading(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


class Tally(Command, key="k", idempotency=["k", "n"]):
    k: str
    n: int


class Ledger:
    """What the service did: handlings per message, in order per key, by instance."""

    def __init__(self, fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.handled: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.order: dict[str, list[int]] = defaultdict(list)
        self.tallied: dict[tuple[str, int], int] = defaultdict(int)
        self.fail = set(fail)

    def service(self, partitions: int = 16) -> Service:
        meter = Service("meter", partitions=partitions)

        @meter.on(Reading)
        def on_reading(ev: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
            if ev.n in self.fail:
                raise RuntimeError(f"reading {ev.n} is poison")
            self.handled[(ev.k, ev.n)].append(ctx.instance)
            self.order[ev.k].append(ev.n)

        @meter.command(Tally)
        def on_tally(cmd: Tally, ctx) -> int:  # type: ignore[no-untyped-def]
            self.tallied[(cmd.k, cmd.n)] += 1
            return cmd.n * 2

        return meter

    def check(self, emitted: list[tuple[str, int]], harness: Harness | None = None) -> None:
        lost = [m for m in emitted if m not in self.handled]
        assert not lost, f"{len(lost)} events emitted and never handled, e.g. {lost[:5]}"
        caught = harness.uncommitted if harness is not None else set()  # handled, then crashed before the commit
        twice = {m: who for m, who in self.handled.items()
                 if len(who) > 1 and not all((name, idempotency_id(Reading(k=m[0], n=m[1]))) in caught
                                             for name in who[:-1])}
        assert not twice, f"{len(twice)} events handled more than once, e.g. {list(twice.items())[:3]}"
        for k, ns in self.order.items():
            assert ns == sorted(ns), f"key {k} handled out of order: {ns}"


class Crashed(Exception):
    """The node a call was made on crashed before it returned (its process is gone)."""


async def unless_crashed(h: Harness, engine, call):  # type: ignore[no-untyped-def]
    """Await ``call`` on ``engine``, giving up when the engine crashes (a dead process returns nothing)."""
    task = asyncio.ensure_future(call)
    while not task.done():
        if engine.transport.closed:
            task.cancel()
            raise Crashed(engine.name)
        await h.sleep(0.01)
    return task.result()


def reading(n: int) -> Reading:
    return Reading(k=f"k{n % KEYS}", n=n)


def run(scenario) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_restarted_producer_sends_again_in_order_what_was_not_acknowledged(tmp_path: Path) -> None:
    ledger = Ledger()
    h = Harness(seed=11, data_root=tmp_path, config=FAST)
    client = h.add(None)
    consumer = h.add(ledger.service())

    async def scenario() -> None:
        nonlocal client, consumer
        await h.start()
        emitted = [reading(n) for n in range(100)]
        for ev in emitted[:40]:
            await h.run(client.emit(ev))
        h.crash(consumer)  # from here the producer's events wait: in flight, then for an instance
        for ev in emitted[40:]:
            await h.run(client.emit(ev))
        name = client.name
        h.crash(client)  # with 60 events emitted, returned, and acknowledged by nobody
        client = h.restart(client)
        consumer = h.restart(consumer)
        await h.run_until(lambda: client.state == "joined" and client.acknowledged, 60, "everything acknowledged")
        assert client.name == name and node_stats(client).store["lives"] == 2
        ledger.check([(ev.k, ev.n) for ev in emitted])

    run(scenario)


def test_a_restarted_consumer_answers_duplicates_from_its_store(tmp_path: Path) -> None:
    ledger = Ledger()
    h = Harness(seed=12, data_root=tmp_path, config=FAST)
    client = h.add(None)
    consumer = h.add(ledger.service())

    async def scenario() -> None:
        nonlocal consumer
        await h.start()
        for n in range(50):
            await h.run(client.emit(reading(n)))
        results = [await h.run(client.send(Tally(k="k1", n=n))) for n in range(5)]
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        consumer = h.restart(consumer)  # a crash and a restart: its memory is gone, its store is not
        await h.run_until(lambda: consumer.state == "joined", 30, "rejoined")
        # the same events and commands again (a producer that resends, a client that retries)
        for n in range(50):
            await h.run(client.emit(reading(n)))
        again = [await h.run(client.send(Tally(k="k1", n=n))) for n in range(5)]
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged again")
        assert again == results == [0, 2, 4, 6, 8]
        assert all(count == 1 for count in ledger.tallied.values()), dict(ledger.tallied)
        assert node_stats(consumer).duplicates == 55
        ledger.check([(f"k{n % KEYS}", n) for n in range(50)])

    run(scenario)


def test_a_restarted_instance_takes_back_the_partitions_whose_ids_it_kept(tmp_path: Path) -> None:
    ledger = Ledger()
    h = Harness(seed=13, data_root=tmp_path, config=FAST)
    client = h.add(None)
    instances = [h.add(ledger.service()) for _ in range(3)]

    async def scenario() -> None:
        await h.start()
        for n in range(120):
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        owned = {e.name: sorted(e.membership.partitions_of("meter", e.incarnation)) for e in instances}
        assert all(owned.values()), owned
        victim = instances[1]
        back = h.restart(victim)
        await h.run_until(lambda: back.state == "joined" and back.ownership.summary().get("owned", 0) > 0, 30,
                          "the restarted instance owns partitions again")
        assert back.name == victim.name and back.incarnation != victim.incarnation
        assert sorted(back.membership.partitions_of("meter", back.incarnation)) == owned[victim.name]
        for n in range(120):  # everything again: every instance still knows what it handled
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        ledger.check([(f"k{n % KEYS}", n) for n in range(120)])

    run(scenario)


def test_an_instance_down_longer_than_dead_after_comes_back_to_its_partitions(tmp_path: Path) -> None:
    """Down for longer than ``handover_timeout`` after it was found dead, its partitions go to the
    survivors (as in memory mode); once back it takes them back, with the dedup ids the survivors
    gathered meanwhile (the handover), and nothing repeats."""
    ledger = Ledger()
    h = Harness(seed=21, data_root=tmp_path, config=FAST)
    client = h.add(None)
    instances = [h.add(ledger.service()) for _ in range(2)]

    async def scenario() -> None:
        await h.start()
        victim = instances[0]
        mine = sorted(victim.membership.partitions_of("meter", victim.incarnation))
        for n in range(60):
            await h.run(client.emit(reading(n)))
        h.crash(victim)
        for n in range(60, 120):  # waits, then goes to the survivor once the victim is declared dead
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 60, "the survivor took over")
        assert victim.name in h.declared_dead
        back = h.restart(victim)
        await h.run_until(lambda: sorted(back.membership.partitions_of("meter", back.incarnation)) == mine
                          and back.ownership.summary().get("owned", 0) == len(mine), 60, "its partitions back")
        for n in range(120):  # everything again: whoever owns a partition now knows what was handled
            await h.run(client.emit(reading(n)))
        for n in range(120, 180):
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 60, "acknowledged")
        ledger.check([(f"k{n % KEYS}", n) for n in range(180)])

    run(scenario)


def test_crashes_of_consumers_and_producers_mid_stream_lose_nothing_and_repeat_nothing(tmp_path: Path) -> None:
    ledger = Ledger()
    h = Harness(seed=14, drop=0.02, duplicate=0.02, reorder=0.05, data_root=tmp_path, config=FAST)
    client_endpoint = h.add(None).transport.endpoint
    consumers = [h.add(ledger.service()).transport.endpoint for _ in range(2)]
    emitted: list[tuple[str, int]] = []

    async def produce() -> None:
        n = 0
        while n < 400:
            engine = h.engines[client_endpoint]
            if client_endpoint in h.down:
                await h.sleep(0.05)
                continue
            try:
                await unless_crashed(h, engine, engine.emit(reading(n), timeout=5.0))
            except (ChoreoError, Crashed):  # backpressure, or the producer crashed: the same event again (same id)
                await h.sleep(0.05)
                continue
            emitted.append((f"k{n % KEYS}", n))
            n += 1
            await h.sleep(0.01)

    async def bounce() -> None:  # crash a node, start it again on its data dir a moment later
        rng = h.rng
        for i in range(8):
            await h.sleep(rng.uniform(0.3, 0.8))
            target = [client_endpoint, *consumers][i % 3]
            h.crash(h.engines[target])
            await h.sleep(rng.uniform(0.05, 0.5))
            h.restart(h.engines[target])

    async def scenario() -> None:
        await h.start()
        await h.run(asyncio.gather(produce(), bounce()), timeout=300)
        client = h.engines[client_endpoint]
        await h.run_until(lambda: client.state == "joined" and client.acknowledged, 60, "everything acknowledged")
        ledger.check(emitted, h)

    run(scenario)


def test_dead_letters_survive_a_restart_and_a_replay_takes_them_away_for_good(tmp_path: Path) -> None:
    ledger = Ledger(fail={3})
    h = Harness(seed=15, data_root=tmp_path, config=FAST)
    client = h.add(None)
    consumer = h.add(ledger.service())

    async def scenario() -> None:
        nonlocal consumer
        await h.start()
        for n in range(6):
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 60, "acknowledged (n=3 as a dead letter)")
        [letter] = list(consumer.dispatcher.dead_letters)
        consumer = h.restart(consumer)
        await h.run_until(lambda: consumer.state == "joined", 30, "rejoined")
        [kept] = list(consumer.dispatcher.dead_letters)
        assert (kept.id, kept.msg_id, kept.error) == (letter.id, letter.msg_id, "reading 3 is poison")
        ledger.fail.clear()
        consumer.dispatcher.replay(kept.id)
        replayed = consumer  # what `choreo dlq replay` asks until it says handled: then it is on disk
        args = {"id": kept.id, "msg_id": kept.msg_id.hex(), "replay": 1}
        await h.run_until(lambda: replay_outcome(replayed, args)["state"] == "handled", 30, "the replay said handled")
        assert ("k3", 3) in ledger.handled
        consumer = h.restart(consumer)  # a crash at once (no turn of the loop for a commit)
        await h.run_until(lambda: consumer.state == "joined", 30, "rejoined")
        assert list(consumer.dispatcher.dead_letters) == []
        ledger.check([(f"k{n % KEYS}", n) for n in range(6)])

    run(scenario)


def envelope_ids(bodies: list[bytes]) -> set[bytes]:
    return {env.msg_id for body in bodies for env in parse_envelopes(body)}


def test_emit_returns_only_once_its_event_is_on_disk() -> None:
    """The store models the OS: a write is lost to a power failure until it is synced."""
    ledger = Ledger()
    store = MemoryStore()
    h = Harness(seed=16, config=FAST, fsync="batch")
    client = h.add(None, store=store)
    consumer = h.add(ledger.service(), durable=False)

    async def scenario() -> None:
        nonlocal client
        await h.start()
        h.crash(consumer)  # nobody acknowledges: everything emitted stays in the producer's outbox
        for n in range(30):
            msg_id = await h.run(client.emit(reading(n)))
            on_disk = envelope_ids([body for _, _, body, _ in store.on_disk().outbox])
            assert msg_id in on_disk, f"emit of event {n} returned before it was on disk"
        commits = store.commits
        await h.run(asyncio.gather(*(client.emit(reading(n)) for n in range(30, 60))))  # concurrent emits
        assert store.commits - commits <= 2, f"30 concurrent emits took {store.commits - commits} commits"
        store.lose_power()
        h.crash(client)
        client = h.restart(client)
        h.restart(consumer)
        await h.run_until(lambda: client.state == "joined" and client.acknowledged, 60, "acknowledged")
        ledger.check([(f"k{n % KEYS}", n) for n in range(60)])

    run(scenario)


def test_an_acknowledgement_leaves_only_once_what_it_acknowledges_is_on_disk() -> None:
    ledger = Ledger()
    store = MemoryStore()
    h = Harness(seed=17, config=FAST, fsync="batch")
    client = h.add(None, durable=False)
    consumer = h.add(ledger.service(), store=store)
    ids_by_seq: dict[int, bytes] = {}
    acked: list[int] = []
    send = consumer.transport.send

    def watched(endpoint: str, frame: bytes) -> None:
        frame_type, flags, _, _ = wire.parse_header(frame)
        if frame_type == wire.ACK:
            cumulative, _, ranges = decode_ack(frame, wire.HEADER_SIZE)
            done = {s for s in ids_by_seq if s <= cumulative or any(lo <= s <= hi for lo, hi in ranges)}
            stored = {bytes(e[16 * i : 16 * i + 16]) for *_, e in store.on_disk().dedup for i in range(len(e) // 18)}
            missing = [s for s in done if ids_by_seq[s] not in stored]
            assert not missing, f"an ack covers seqs {sorted(missing)[:5]} whose ids are not on disk"
            acked.append(cumulative)
        send(endpoint, frame)

    consumer.transport.send = watched  # type: ignore[method-assign]
    on_frame = consumer.on_frame

    def seen(data: bytes, identity: bytes | None = None, principal: str | None = None) -> None:
        if wire.parse_header(data)[0] == wire.DATA:
            _, _, body_at = wire.split_ack(data, wire.parse_header(data)[1])
            for env in parse_envelopes(data, body_at):
                ids_by_seq[env.seq] = env.msg_id
        on_frame(data, identity, principal)

    consumer.on_frame = seen  # type: ignore[method-assign]

    async def scenario() -> None:
        await h.start()
        for n in range(200):
            client.try_emit(reading(n)) if n % 3 else await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 60, "acknowledged")
        assert acked and max(acked) >= 200

    run(scenario)


def test_a_full_disk_is_backpressure_and_nothing_is_lost_or_repeated_once_space_frees() -> None:
    ledger = Ledger()
    producer_store = MemoryStore(capacity=4_000)
    consumer_store = MemoryStore(capacity=2_000)
    h = Harness(seed=18, config=FAST, fsync="batch")
    client = h.add(None, store=producer_store)
    consumer = h.add(ledger.service(), store=consumer_store)

    async def scenario() -> None:
        await h.start()
        emitted, refused, tried = [], 0, 0
        for n in range(300):
            try:
                await h.run(client.emit(reading(n), timeout=1.0))
                emitted.append((f"k{n % KEYS}", n))
            except StoreFull as exc:  # a Backpressure: once the consumer's disk is full it holds its acks,
                # and what the producer sent and nobody acknowledges fills the producer's disk too
                assert isinstance(exc, Backpressure) and "the disk is full" in str(exc), exc
                refused += 1
                if client.journal.failing is not None:
                    with pytest.raises(StoreFull):  # try_emit refuses at once while commits fail
                        client.try_emit(reading(n))
                    tried += 1
            if n == 250:
                producer_store.capacity = consumer_store.capacity = None  # space freed
        assert refused > 50 and tried > 0, f"only {refused} emits met a full disk ({tried} try_emits)"
        await h.run_until(lambda: client.acknowledged, 60, "acknowledged")
        assert node_stats(client).store["failing"] is None and node_stats(consumer).store["failing"] is None
        ledger.check(emitted)

    run(scenario)


def test_store_rows_stay_bounded_under_steady_load(tmp_path: Path) -> None:
    class Short(Event, key="k", dedup_ttl=2.0, dedup_max=150):
        k: str
        n: int

    sink = Service("sink")
    counted: list[int] = []

    @sink.on(Short)
    def on_short(ev: Short) -> None:
        counted.append(ev.n)

    store, producer_store = MemoryStore(), MemoryStore()
    h = Harness(seed=19, config=FAST)
    client = h.add(None, store=producer_store)
    h.add(sink, store=store)

    async def scenario() -> None:
        await h.start()
        sizes = []
        for n in range(3000):
            client.try_emit(Short(k=f"k{n % 50}", n=n)) if n % 10 else await h.run(client.emit(Short(k="k", n=n)))
            if n % 10 == 9:
                await h.advance(0.01)
            if n % 500 == 499:
                await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
                await h.advance(1.5)  # compaction runs every second
                sizes.append((len(store.dedup), sum(len(r[4]) // 18 for r in store.dedup.values())))
                assert producer_store.outbox == {}, "acknowledged batches are still in the producer's store"
        assert len(counted) == 3000
        assert all(ids <= 150 + 50 for _, ids in sizes), f"(rows, dedup ids) kept: {sizes} (dedup_max=150)"
        assert max(rows for rows, _ in sizes) <= 50, sizes

    run(scenario)


class Measured(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


def test_a_durable_relay_acknowledges_once_what_it_emitted_is_stored(tmp_path: Path) -> None:
    """Its input's ack waits for its output's commit, not for the output's receiver; an output that
    cannot leave (no live instance) keeps the input waiting for the receiver, as in memory mode."""
    relay = Service("relay")
    sink = Service("sink")
    relayed: list[int] = []

    @relay.on(Reading, emits=[Measured])
    def on_reading(ev: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
        ctx.emit(Measured(k=ev.k, n=ev.n))

    @sink.on(Measured)
    def on_measured(ev: Measured) -> None:
        relayed.append(ev.n)

    h = Harness(seed=22, config=FAST)
    client = h.add(None, durable=False)
    relay_node = h.add(relay, store=MemoryStore())
    sink_node = h.add(sink, durable=False)

    async def scenario() -> None:
        await h.start()
        h.crash(sink_node)  # it acknowledges nothing, and is not declared dead yet
        await h.run(client.emit(reading(1)))
        await h.run_until(lambda: client.acknowledged, 1.0, "the relay acknowledged its input")
        assert not relay_node.acknowledged, "its output is still unacknowledged downstream"
        await h.run_until(lambda: "sink" not in relay_node.membership.services(), 30, "the sink declared dead")
        await h.run(client.emit(reading(2)))  # its output has nowhere to go: the input waits for the receiver
        await h.advance(1.0)
        assert not client.acknowledged
        h.restart(sink_node)
        await h.run_until(lambda: client.acknowledged and relay_node.acknowledged, 60, "everything acknowledged")
        assert sorted(set(relayed)) == [1, 2]

    run(scenario)


@pytest.mark.parametrize("policy", ["interval", "off"])
def test_interval_and_off_release_at_commit_and_interval_syncs_within_its_window(policy: str) -> None:
    store = MemoryStore()
    config = FAST
    h = Harness(seed=20, config=config, fsync=policy)
    client = h.add(None, store=store)
    consumer = h.add(Ledger().service(), durable=False)

    async def scenario() -> None:
        await h.start()
        h.crash(consumer)
        await h.run(client.emit(reading(1)))
        synced = store.syncs
        await h.advance(0.5)  # five times fsync_interval (0.1 s)
        if policy == "interval":
            assert store.syncs > synced
            assert envelope_ids([b for _, _, b, _ in store.on_disk().outbox]), "not on disk after the interval"
        else:
            assert store.syncs == synced

    run(scenario)


class Count(msgspec.Struct):
    readings: int = 0


def counting(handled: dict[tuple[str, int], int]) -> Service:
    """A service of 8 partitions that counts each key's readings in its state (and each handling)."""
    svc = Service("meter", partitions=8, state=[Count])

    @svc.on(Reading)
    def on_reading(ev: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
        handled[(ev.k, ev.n)] += 1
        count = ctx.state.get(Count) or Count()
        ctx.state.put(Count(count.readings + 1))

    return svc


def test_a_durable_instance_taken_for_dead_while_alive_keeps_its_state_and_handles_nothing_twice(
    tmp_path: Path,
) -> None:
    """Cut off for longer than ``suspect_after + dead_after``, a durable instance is taken for dead
    while it runs on, its partitions' ids and state in its store. The survivor does not start those
    partitions without them: it waits (up to ``handover_timeout``) for the instance's next life,
    which owns them again; what the producer sent meanwhile waits with it and then goes there.
    Started empty instead, the survivor handed back its own state, which replaced the instance's
    (durable seed 2103 of the 100 s schedules: each key of three partitions lost 23 readings)."""
    handled: dict[tuple[str, int], int] = defaultdict(int)
    svc = counting(handled)

    h = Harness(seed=5, data_root=tmp_path, config=FAST)
    client = h.add(None)
    victim, survivor = h.add(svc), h.add(svc)

    def counts() -> dict[str, int]:
        out = {}
        for i in range(KEYS):
            key = f"k{i}".encode()
            (owner,) = [e for e in h.up() if e.moves is not None and e.moves.ownership.state[
                core.partition_of(key, 8)] == "owned"]
            body = owner.dispatcher.state.get(0, core.partition_of(key, 8), key)
            out[key.decode()] = msgspec.msgpack.decode(body, type=Count).readings if body is not None else 0
        return out

    async def scenario() -> None:
        await h.start()
        for n in range(40):
            await h.run(client.emit(reading(n)))
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        h.partition([victim], [client, survivor])
        await h.run_until(lambda: victim.name in h.declared_dead, 30, "the victim taken for dead")
        for n in range(40, 80):  # those of the victim's partitions wait at the survivor
            await h.run(client.emit(reading(n)))
        await h.advance(1.0)
        assert survivor.ownership is not None and survivor.ownership.awaiting, "the survivor waits for it"
        h.heal()
        await h.run_until(lambda: client.acknowledged, 60, "everything acknowledged")
        await h.run_until(lambda: sum(e.moves.ownership.state.count("owned") for e in (victim, survivor)) == 8
                          and not victim.moves.busy and not survivor.moves.busy, 30, "partitions settled")

    run(scenario)
    assert sorted(handled) == sorted((f"k{n % KEYS}", n) for n in range(80)), "nothing lost"
    assert set(handled.values()) == {1}, "nothing twice"
    assert counts() == {f"k{i}": 10 for i in range(KEYS)}, "each key counted each of its readings once"


def test_of_two_stores_that_hold_one_partition_the_newer_copy_wins(tmp_path: Path) -> None:
    """Two durable instances come back at once, each with the same partition in its store: one
    drained it to nobody long ago, as the service's last instance; the other started it later
    (from nobody) and left last. The partition's owner now is the first, whose copy is the older.
    Each copy has its epoch (raised whenever an instance starts owning the partition): the newer
    copy is handed to the owner and the older one forgotten. Before epochs the newer copy's holder
    took it for stale (another instance held it), the owner waited for a hand-over that never
    came and then ran on its own older copy: what the newer copy had handled ran again (durable
    with standbys, seed 3004 of the 100 s schedules)."""
    handled: dict[tuple[str, int], int] = defaultdict(int)
    svc = counting(handled)

    older_name, newer_name = "meter#older", "meter#newer"
    keys = [durable_key(older_name), durable_key(newer_name)]
    key = next(f"k{i}" for i in range(100) if core.rendezvous_owner(core.partition_of(f"k{i}".encode(), 8), keys) == 0)
    p = core.partition_of(key.encode(), 8)
    h = Harness(seed=8, data_root=tmp_path, config=FAST)
    client = h.add(None)
    older = h.add(svc, name=older_name)

    def count(engine) -> int:  # type: ignore[no-untyped-def]
        body = engine.dispatcher.state.get(0, p, key.encode())
        return msgspec.msgpack.decode(body, type=Count).readings if body is not None else 0

    async def scenario() -> None:
        await h.start()
        for n in range(10):
            await h.run(client.emit(Reading(k=key, n=n)))
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        await h.leave(older)  # the last instance: the partition stays in its store
        newer = h.join(svc, name=newer_name)
        await h.run_until(lambda: newer.ownership is not None and newer.ownership.state[p] == "owned", 30,
                          "the newer instance owns the partition")
        for n in range(10, 20):
            await h.run(client.emit(Reading(k=key, n=n)))
        await h.run_until(lambda: client.acknowledged, 30, "acknowledged")
        assert count(newer) == 10, "it started the partition empty (the older store was away)"
        await h.leave(newer)
        back_older, back_newer = h.restart(older), h.restart(newer)
        for n in range(10, 30):  # again, and new ones
            await h.run(client.emit(Reading(k=key, n=n)))
        await h.run_until(lambda: client.acknowledged, 60, "acknowledged")
        assert back_older.ownership is not None and back_older.ownership.state[p] == "owned"
        assert count(back_older) == 20, "the newer copy's count, and the new readings on it"

    run(scenario)
    assert sorted(handled) == sorted((key, n) for n in range(30)), "nothing lost"
    assert set(handled.values()) == {1}, f"nothing twice: {sorted(m for m, c in handled.items() if c > 1)}"


class Seen(msgspec.Struct):
    readings: int = 0


class Relayed(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


def test_a_durable_instance_leaving_while_its_outputs_wait_for_an_absent_service_hands_over_and_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The meter's readings emit Relayed to a relay that has no instance left. A durable meter
    instance that leaves meanwhile must still hand its partitions over (their messages count as
    done once their outputs are stored, as a leaving node takes no new work), its drain must not
    time out, nothing may run twice, and no count may be lost; its Relayed wait in its store,
    named at its goodbye, and go out once it starts again and a relay is back (the saga
    workload's durable seeds 31, 42 and 78)."""
    handled: dict[tuple[str, int], list[str]] = defaultdict(list)
    relayed: dict[tuple[str, int], int] = defaultdict(int)
    meter = Service("meter", partitions=8, state=[Seen])

    @meter.on(Reading, emits=[Relayed])
    def on_reading(ev: Reading, ctx) -> None:  # type: ignore[no-untyped-def]
        handled[(ev.k, ev.n)].append(ctx.instance)
        seen = ctx.state.get(Seen) or Seen()
        ctx.state.put(Seen(seen.readings + 1))
        ctx.emit(Relayed(k=ev.k, n=ev.n))

    relay = Service("relay")

    @relay.on(Relayed)
    def on_relayed(ev: Relayed) -> None:
        relayed[(ev.k, ev.n)] += 1

    h = Harness(seed=31, data_root=tmp_path, config=FAST)
    client = h.add(None)
    leaver, stayer = h.add(meter), h.add(meter)
    relay_node = h.add(relay)

    async def scenario() -> None:
        await h.start()
        for n in range(20):
            await h.run(client.emit(reading(n), timeout=10))
        assert await h.leave(relay_node, timeout=10), "the relay's last instance left"
        for n in range(20, 60):  # their Relayed wait at the meter instances: no relay
            await h.run(client.emit(reading(n), timeout=10))
        with caplog.at_level("WARNING", logger="choreo.node"):
            assert await h.leave(leaver, timeout=10), "the meter instance drained: its partitions were handed over"
        assert any("stay in its store" in r.getMessage() for r in caplog.records), "its goodbye names what it keeps"
        h.restart(relay_node)  # (the readings at the other instance wait for it: a bound on its store)
        h.restart(leaver)  # on its data dir: what waited in its store goes out
        await h.run_until(lambda: len(relayed) == 60 and all(e.acknowledged for e in h.up()), 60,
                          "every reading acknowledged, every Relayed handled once a relay was back")
        totals = 0
        for k in range(KEYS):
            key = f"k{k}".encode()
            p = core.partition_of(key, 8)
            owner = next(e for e in h.up() if e.service is meter and e.moves.ownership.state[p] == "owned")
            body = owner.dispatcher.state.get(0, p, key)
            totals += msgspec.msgpack.decode(body, type=Seen).readings if body is not None else 0
        assert totals == 60, "every reading counted once, by whoever owns its key now"

    run(scenario)
    assert all(len(who) == 1 for who in handled.values()) and len(handled) == 60, "each reading handled once"
    assert all(n == 1 for n in relayed.values()), "each Relayed handled once"
