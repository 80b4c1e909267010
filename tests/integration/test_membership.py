"""Issue 4: instances crash, join, leave and restart while keyed events stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest

from choreo.client import rpc
from choreo.node import Node, NodeConfig

from .checks import check_moves, expected_stream
from .netns import Hosts
from .recording import Produced, elastic, read_timed, tally

pytestmark = pytest.mark.slow

COUNT, KEYS, AT = 100_000, 1_000, 30_000
FAST = NodeConfig(heartbeat=0.2, suspect_after=1.0, dead_after=2.5, handover_timeout=5.0, rto=0.5)
# the firewall cut between two hosts; longer than 45 s, the kernel closes the connection that has
# data unacknowledged (TCP_USER_TIMEOUT) and ZeroMQ dials again once the cut heals
CUT_SECONDS = float(os.environ.get("CHOREO_TEST_CUT_SECONDS", FAST.dead_after * 3))


class Placement:
    """Where the nodes run: all on loopback, or each on a host (network namespace) of its own."""

    def __init__(self, hosts: Hosts | None) -> None:
        self.hosts = hosts
        self._next = 0

    def node(self) -> dict:
        """NodeProcess keyword arguments for the next node."""
        if self.hosts is None:
            return {"config": FAST}
        self._next += 1
        host = (self._next - 1) % self.hosts.count + 1
        # hosts of a private test network, without keys: insecure on purpose
        return {"config": FAST, "netns": self.hosts.namespace(host), "bind": f"tcp://{self.hosts.address(host)}:0",
                "insecure": True}

    @property
    def client_bind(self) -> str:
        return "tcp://127.0.0.1:0" if self.hosts is None else f"tcp://{self.hosts.gateway}:0"


@pytest.fixture(params=["loopback", "netns"])
def where(request) -> Iterator[Placement]:
    if request.param == "loopback":
        yield Placement(None)
    else:
        with Hosts(3) as hosts:
            yield Placement(hosts)


async def stream(seed: str, instances: int, action, at: int = AT, bind: str = "tcp://127.0.0.1:0") -> None:
    """Emit COUNT keyed events; run ``action()`` (a coroutine) once ``at`` have been emitted."""
    async with Node(None, bind=bind, peers=[seed], config=FAST, insecure=True) as client:
        await client.wait_for({"elastic": instances}, timeout=30)
        for n in range(COUNT):
            if n == at:
                await action(client)
            await client.emit(Produced(k=f"k{n % KEYS}", n=n), timeout=60)
        await client.flush(timeout=120)


def test_kill_one_of_two_consumers_mid_stream(procs, where) -> None:
    a = procs.start(elastic, **where.node())
    b = procs.start(elastic, peers=[a.endpoint], **where.node())

    async def kill(client: Node) -> None:
        await asyncio.to_thread(b.kill)  # SIGKILL: no drain, no goodbye

    asyncio.run(asyncio.wait_for(stream(a.endpoint, 2, kill, bind=where.client_bind), 300))
    crashed = f"elastic-{b.pid}.log"
    procs.close()
    records = read_timed(str(procs.record_dir), "elastic")
    assert any(r[3] == crashed for r in records), "the killed instance had taken part of the work"
    dups = check_moves(
        records,
        expected_stream(COUNT, KEYS),
        "kill one of two consumers",
        crashed=crashed,
        max_duplicates=FAST.window,  # README: at most what the dead instance held unacknowledged
    )
    print(f"duplicates after the crash: {dups}")


def test_third_instance_joins_mid_stream_without_loss_or_duplicates(procs, where) -> None:
    a = procs.start(elastic, **where.node())
    procs.start(elastic, peers=[a.endpoint], **where.node())

    async def join(client: Node) -> None:
        await asyncio.to_thread(procs.start, elastic, [a.endpoint], **where.node())
        await client.wait_for({"elastic": 3}, timeout=30)

    asyncio.run(asyncio.wait_for(stream(a.endpoint, 2, join, bind=where.client_bind), 300))
    procs.close()
    records = read_timed(str(procs.record_dir), "elastic")
    check_moves(records, expected_stream(COUNT, KEYS), "a third instance joins", max_duplicates=0)
    assert len({r[3] for r in records}) == 3, "the newcomer took part of the work"


def test_sigterm_one_instance_mid_stream_hands_over_cleanly(procs, where) -> None:
    a = procs.start(elastic, **where.node())
    procs.start(elastic, peers=[a.endpoint], **where.node())
    c = procs.start(elastic, peers=[a.endpoint], **where.node())

    async def leave(client: Node) -> None:
        status = await asyncio.to_thread(c.stop)  # SIGTERM: drain, hand over, leave
        assert status == 0, c.stderr()[-2000:]

    asyncio.run(asyncio.wait_for(stream(a.endpoint, 3, leave, bind=where.client_bind), 300))
    procs.close()
    records = read_timed(str(procs.record_dir), "elastic")
    assert any(r[3] == f"elastic-{c.pid}.log" for r in records), "the leaving instance had taken part of the work"
    check_moves(records, expected_stream(COUNT, KEYS), "SIGTERM", max_duplicates=0)


def test_killed_node_restarted_on_the_same_address_rejoins_and_takes_work(procs, where) -> None:
    a = procs.start(elastic, **where.node())
    b_where = where.node()
    b = procs.start(elastic, peers=[a.endpoint], **b_where)
    address = b.endpoint
    restarted = {}

    async def crash_and_restart(client: Node) -> None:
        old_name = next(p.node for p in client.stats().peers if p.endpoint == address)
        await asyncio.to_thread(b.kill)
        new = await asyncio.to_thread(procs.start, elastic, [a.endpoint], **{**b_where, "bind": address})
        assert new.endpoint == address
        restarted["proc"] = new

        def has_new_incarnation() -> bool:
            return any(p.endpoint == address and p.state == "alive" and p.node != old_name
                       for p in client.stats().peers)

        await client.until(has_new_incarnation, 30, "the restarted node rejoined")

    asyncio.run(asyncio.wait_for(stream(a.endpoint, 2, crash_and_restart, bind=where.client_bind), 300))
    new_pid = restarted["proc"].pid
    stats = rpc(address, "stats")
    assert stats["processed"] > 0, "the restarted node took work again"
    procs.close()
    records = read_timed(str(procs.record_dir), "elastic")
    assert any(r[3] == f"elastic-{new_pid}.log" for r in records)
    check_moves(records, expected_stream(COUNT, KEYS), "kill and restart", crashed=f"elastic-{b.pid}.log",
                max_duplicates=FAST.window)


def test_partition_between_two_hosts_backs_the_producer_off_and_heals(procs) -> None:
    """Producer on host 1, consumer on host 2; a firewall rule cuts them apart, then goes."""
    count, window = 60_000, FAST.window
    with Hosts(2) as hosts:
        consumer = procs.start(elastic, netns=hosts.namespace(2), bind=f"tcp://{hosts.address(2)}:0", config=FAST,
                               insecure=True)
        producer = subprocess.Popen(
            ["ip", "netns", "exec", hosts.namespace(1), sys.executable, "-m", "tests.integration.producer_proc",
             consumer.endpoint, f"tcp://{hosts.address(1)}:0", str(count), str(KEYS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            start_new_session=True,
        )
        try:
            producer_endpoint = json.loads(producer.stdout.readline())["endpoint"]

            def processed() -> int:
                return rpc(consumer.endpoint, "stats")["processed"]

            deadline = time.monotonic() + 60
            while processed() < 10_000:
                assert time.monotonic() < deadline and producer.poll() is None, producer.stderr.read()
                time.sleep(0.05)  # polling another process's counter
            hosts.cut(1, 2)
            time.sleep(CUT_SECONDS)  # the cut lasts long enough for both sides to declare death
            at_cut = processed()
            time.sleep(1.0)
            assert processed() == at_cut, "nothing crosses the cut"
            stalled = rpc(producer_endpoint, "stats")
            assert stalled["in_flight"] <= window, f"no unbounded queue: {stalled['in_flight']} in flight"
            assert producer.poll() is None, "the producer waits instead of finishing (or failing)"
            hosts.heal()
            out, err = producer.communicate(timeout=240)
            assert producer.returncode == 0, err[-3000:]
        finally:
            if producer.poll() is None:
                os.killpg(producer.pid, 9)
                producer.wait(10)
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["peak_in_flight"] <= window
        assert summary["backpressure_waits"] > 0, "the producer backed off during the cut"
        procs.close()
        check_moves(read_timed(str(procs.record_dir), "elastic"), expected_stream(count, KEYS),
                    "partition and heal", max_duplicates=0)


def _stuck(exc: subprocess.TimeoutExpired, endpoints: list[str]) -> str:
    """What a producer that did not finish said on stderr, and each node's stats now (the
    producers', then the instances': their partitions by state, and what waits in each)."""
    err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    stats = []
    for endpoint in endpoints:
        try:
            stats.append(rpc(endpoint, "stats", timeout=2.0))
        except Exception as e:  # noqa: BLE001 - a diagnostic: say why there is none
            stats.append(f"no stats: {e}")
    return f"its stderr: {err[-5000:]}\neach node's stats: {stats}"


# Opt-in (CHOREO_HEAL_RUNS=10, say): 22 s a run. It fails in some of its runs (README's
# long-partition row: 7 of 80 on 2026-12-07, one in six before), so ``make test`` does not run
# it; it is the reproduction for the fix.
HEAL_RUNS = int(os.environ.get("CHOREO_HEAL_RUNS", "0"))


@pytest.mark.parametrize("run", range(HEAL_RUNS))
def test_a_long_partition_with_two_instances_and_a_producer_on_each_side_runs_each_event_once(procs, run) -> None:
    """Two hosts, each with two instances of a service that keeps a standby copy of its state,
    and a producer of keys of its own; a firewall cut longer than ``dead_after`` splits them.
    Each side takes the other for dead and runs every partition; at the heal every node hears it
    was declared dead and rejoins, with events in flight both ways and handlers waiting for
    their standby's ack. Nothing is lost; per key, first handlings come in order; and no event
    runs twice, but for the crash window of the cut (README: an event handled on the far side
    just before the cut, whose ack the cut lost, runs again on the producer's side). That is the
    goal, stricter than what the README promises today: tests/sim/test_partition.py holds the
    same heal in virtual time, where each event runs once in memory (with a standby too) since a
    node declared dead acknowledges what ran with a copy kept at its sender, sent to its next life.

    Here, over real sockets, some events run twice in some runs, a fraction of a second after
    the heal: 8 to 31 events in 6 of 19 runs. The logs show the simulated case at scale: the
    producer's rejoin found 53 envelopes in flight to one instance, which had run 33 of them and
    waited for its standby's acks when it heard it was declared dead; no ack came for them, and
    the producer sent them again to their partitions' next owners. Two fixes were tried and
    backed out: the last life acking what its handlers finish, the new life joining once its
    receivers had spoken (e830b64, backed out in 8b79808: 1 failing run in 6 here, and its wait to
    join wedged saga replicas 189); and acknowledging what ran as the node rejoins, its outputs
    going again from the new life (f5e3e94, backed out in 87b64b2: 6 of 6 runs
    here, but a crash after the rejoin lost those outputs, saga plain 195). What is kept: the
    same with the sender keeping a copy (``PartitionData.keep_all_ran``), sent to the receiver's
    next life (``Router.send_again``). In virtual time each event runs once; here 4 of 16 runs
    still ran 7 to 19 events twice, each handled by one instance about 0.3 s after the heal and
    by another about 0.4 s later: a case of real timing the simulation does not reach (before
    the change: 6 of 19 runs). Traces of such runs (each message's path logged at every node)
    found two races: an instance hears of its sender's next life, and closes that sender's
    channel, between running a message and hearing it was declared dead itself, so nothing
    acknowledges what ran; and a copy on its way to a receiver's next life comes back from the
    window without that destination (``Outgoing.home``) when its sender rejoins too, and goes by
    partition. Both are fixed: a channel acknowledges as it closes (``Outbox.close``: any
    channel, as its sender goes), and a copy in flight to a next life keeps that destination
    across its sender's rejoin (``OutChannel.homes``; a forward kept as one that ran reopens its
    partition, ``_Forwarded.ran_at_target``, or saga plain 174 wedges). On 2026-12-07: 23 of 86
    runs failed without the first, 19 of 114 with it, 2 to 70 events each, every one first run at
    an instance's last life 5 to 90 ms before it heard it was declared dead; with both, 7 of 80
    (one of them first handlings out of order). Traced again with both (4 of 87 runs failed):
    the copy now comes home, and what is left is the home forgetting the id (it ran there,
    its write to the standby was never acknowledged, and the next life, not the partition's owner,
    drops its ids with a standby copy of that partition it lets go): the copy goes on to the
    owner and runs again there, which is also what keeps its write. One run never
    finished (a partition that never drained: fixed, see the sim test of a producer frozen with
    events behind a busy key). A failure prints every instance's log; a producer that does not
    finish, its stderr and every node's stats; first handlings out of order, which events."""
    count, keys, rate = 24_000, 200, 1_500.0
    with Hosts(2) as hosts:
        def instance(host: int, peers: list[str]) -> str:
            return procs.start(tally, peers=peers, netns=hosts.namespace(host), bind=f"tcp://{hosts.address(host)}:0",
                               config=FAST, insecure=True, log_level="INFO").endpoint  # (printed on a failure)

        first = instance(1, [])
        seeds = [first, instance(1, [first]), instance(2, [first]), instance(2, [first])]

        def producer(host: int, prefix: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                ["ip", "netns", "exec", hosts.namespace(host), sys.executable, "-m", "tests.integration.producer_proc",
                 seeds[2 * host - 2], f"tcp://{hosts.address(host)}:0", str(count), str(keys), "tally", prefix,
                 str(rate)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}, start_new_session=True,
            )

        producers = [producer(1, "a"), producer(2, "b")]
        try:
            endpoints = [json.loads(p.stdout.readline())["endpoint"] for p in producers]  # (it runs)

            def processed() -> int:
                return sum(rpc(endpoint, "stats")["processed"] for endpoint in seeds)

            deadline = time.monotonic() + 60
            while processed() < 4_000:
                assert time.monotonic() < deadline and all(p.poll() is None for p in producers), procs.stderr()
                time.sleep(0.05)  # polling other processes' counters
            hosts.cut(1, 2)
            cut_at = time.time_ns()  # (once the rule is in: what was handled before crossed it)
            time.sleep(CUT_SECONDS)  # long enough for each side to take the other for dead
            assert all(p.poll() is None for p in producers), "both producers go on through the cut"
            healed_at = time.time_ns()
            hosts.heal()
            try:
                outcomes = [p.communicate(timeout=240) for p in producers]
            except subprocess.TimeoutExpired as exc:  # (seen once in 20 runs: what each side held, then)
                raise AssertionError(f"a producer did not finish within 240 s of the heal\n{_stuck(exc, endpoints + seeds)}\n"
                                     + procs.stderr(tail=None)) from None
            assert all(p.returncode == 0 for p in producers), [err[-3000:] for _, err in outcomes]
        finally:
            for p in producers:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait(10)
        reincarnations = [json.loads(out.strip().splitlines()[-1])["reincarnations"] for out, _ in outcomes]
        assert min(reincarnations) >= 1, "each producer was taken for dead by the other side, and rejoined"
        procs.close()
    handlings: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    for key, n, t, file in read_timed(str(procs.record_dir), "tally"):
        handlings[(key, n)].append((t, file))
    expected = {(f"{prefix}{k}", n) for prefix in "ab" for k in range(keys) for n in range(k, count, keys)}
    missing = expected - set(handlings)
    assert not missing, f"{len(missing)} events never handled, e.g. {sorted(missing)[:5]}"
    # the crash window of the cut: handled on the far side in the moment before it, the ack lost
    in_cut = [m for m, hs in handlings.items() if len(hs) > 1 and cut_at - 500_000_000 <= min(hs)[0] <= cut_at]
    twice = {m: sorted(hs) for m, hs in handlings.items() if len(hs) > 1 and m not in in_cut}
    assert not twice, (f"{len(twice)} events ran twice, not caught by the cut, e.g. "
                       f"{[(m, [(round((t - healed_at) / 1e9, 3), f) for t, f in hs]) for m, hs in list(twice.items())[:4]]}"
                       " (seconds after the heal, record file tally-PID.log; each process's log follows)\n"
                       + procs.stderr(tail=None))
    assert len(in_cut) <= 2 * FAST.window, f"{len(in_cut)} events ran twice across the cut, more than in flight"
    firsts: dict[str, list[tuple[int, int, str]]] = defaultdict(list)  # key -> (first handled at, n, by whom)
    for (key, n), hs in handlings.items():
        t, file = min(hs)
        firsts[key].append((t, n, file))

    def inversions(ns: list[tuple[int, int, str]]) -> list[str]:
        ns = sorted(ns)
        return [f"{b[1]} at {(b[0] - healed_at) / 1e9:.3f} s ({b[2]}) after {a[1]} at {(a[0] - healed_at) / 1e9:.3f} s ({a[2]})"
                for a, b in zip(ns, ns[1:]) if b[1] < a[1]]

    disordered = {key: pairs for key, ns in firsts.items() if (pairs := inversions(ns))}
    assert not disordered, (f"first handlings out of order for {len(disordered)} keys, e.g. "
                            f"{[(key, pairs[:2]) for key, pairs in list(disordered.items())[:3]]}"
                            " (seconds after the heal; each process's log follows)\n" + procs.stderr(tail=None))
