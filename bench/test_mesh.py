"""What membership costs: idle meshes of real processes, and membership alone simulated to 1,000 nodes.

``test_mesh_idle``: N processes (5, 20, 60) of ``choreo run bench.idle:idle`` on 127.0.0.1, the
first one the seed of all the others; a service that never gets a message, so each process
costs what membership and the node's own upkeep cost. Figures per size:

* ``scale.mesh.ready_seconds.N``: from starting the first process until every one printed
  ``choreo-ready`` (Python starting N interpreters on 2 cores, mostly);
* ``scale.mesh.join_seconds.N``: from starting the first process until every node's ``peers``
  (asked with ``choreo.client.rpc``, every quarter second) lists all N alive;
* ``scale.mesh.idle_cpu_per_node.N``: then, after 3 quiet seconds, the CPU time of each
  process over ``WINDOW`` seconds (every thread's, from ``/proc/PID/task/*/schedstat``,
  nanoseconds: ZeroMQ's I/O thread included), as percent of one core, the mean over processes;
  ``...idle_cpu_max.N`` the busiest process;
* ``scale.mesh.idle_cpu_per_node.flatness``: max / min of the means over the three sizes.

Nothing polls the nodes while their CPU is measured.

``test_mesh_sim``: :class:`choreo.meshsim.MeshSim`, the gossip part alone on a fake link under
a virtual clock, at 10, 100 and 1,000 nodes (a converged mesh to start with):

* ``scale.sim.bytes_per_node.N`` / ``frames_per_node.N``: membership bytes (headers included)
  and frames each node sends per protocol period, over 40 quiet periods (two anti-entropy
  rounds); ``scale.sim.bytes_per_node_flatness``: max / min over the three sizes;
* ``scale.sim.{join,crash,crash_spread,leave}_periods.N``: periods until every node sees a
  newcomer, then its crash (``crash_spread``: from the first node that declared it dead), then
  another node's graceful leave;
* ``scale.sim.false_suspicions_per_1000.loss_P`` (suspicions of live nodes per 1,000 node-periods)
  and ``false_deaths.loss_P``, at
  1,000 nodes over 100 periods with P percent of frames lost (1 and 5), no node failing;
  ``scale.sim.bytes_per_node.loss_P`` what membership costs a node per period meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.results import record
from choreo.client import rpc
from choreo.meshsim import MeshSim

ROOT = Path(__file__).resolve().parent.parent
SIZES = [5, 20, 60]
WINDOW = 20.0  # seconds of idle CPU measured
SIM_SIZES = [10, 100, 1000]


def _spawn(peers: list[str]) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "choreo", "run", "bench.idle:idle", "--log-level", "WARNING"]
    for peer in peers:
        args += ["--peer", peer]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), *sys.path] if p)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)


def _ready(proc: subprocess.Popen[bytes], deadline: float) -> str:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    line = proc.stdout.readline().decode()
    if not line.startswith("choreo-ready ") or time.monotonic() > deadline:
        raise RuntimeError(f"a node did not start: {line!r} (exit {proc.poll()})")
    return line.split()[1]


def _cpu_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def _alive_everywhere(endpoints: list[str]) -> bool:
    n = len(endpoints)
    for endpoint in endpoints:
        peers = rpc(endpoint, "peers", timeout=5.0)
        if sum(p["state"] == "alive" for p in peers) < n:
            return False
    return True


def idle_mesh(n: int) -> dict[str, float]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start = time.monotonic()
        deadline = start + 120
        procs.append(_spawn([]))
        seed = _ready(procs[0], deadline)
        procs += [_spawn([seed]) for _ in range(n - 1)]
        endpoints = [seed] + [_ready(p, deadline) for p in procs[1:]]
        ready = time.monotonic() - start
        while not _alive_everywhere(endpoints):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes did not all see each other within 120 s")
            time.sleep(0.25)
        joined = time.monotonic() - start
        time.sleep(3.0)
        before = [_cpu_ns(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(WINDOW)
        after = [_cpu_ns(p.pid) for p in procs]
        elapsed = time.monotonic() - t0
        per = [100 * (b - a) / 1e9 / elapsed for a, b in zip(before, after)]
        assert all(p.poll() is None for p in procs), "a node exited while idle"
        return {"ready": ready, "joined": joined, "cpu": sum(per) / n, "cpu_max": max(per)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_mesh_idle(benchmark) -> None:
    results: dict[int, dict[str, float]] = {}

    def measure() -> None:
        for n in SIZES:
            results[n] = idle_mesh(n)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for n, r in results.items():
        record(f"scale.mesh.ready_seconds.{n}", r["ready"])
        record(f"scale.mesh.join_seconds.{n}", r["joined"])
        record(f"scale.mesh.idle_cpu_per_node.{n}", r["cpu"])
        record(f"scale.mesh.idle_cpu_max.{n}", r["cpu_max"])
        benchmark.extra_info[f"nodes={n}"] = r
    means = [r["cpu"] for r in results.values()]
    record("scale.mesh.idle_cpu_per_node.flatness", max(means) / min(means))


def test_mesh_sim(benchmark) -> None:
    results: dict[str, float] = {}

    def measure() -> None:
        for n in SIM_SIZES:
            sim = MeshSim(seed=n)
            sim.bootstrap(n)
            sim.run(5 * sim.config.heartbeat)
            mark = sim.mark()
            sim.run(40 * sim.config.heartbeat)
            traffic = sim.traffic(mark)
            results[f"bytes_per_node.{n}"] = traffic.bytes
            results[f"frames_per_node.{n}"] = traffic.frames
            for what, periods in sim.churn().items():
                results[f"{what}_periods.{n}"] = periods
        for percent in (1, 5):
            sim = MeshSim(seed=percent, loss=percent / 100)
            sim.bootstrap(SIM_SIZES[-1])
            mark = sim.mark()
            periods = 100
            sim.run(periods * sim.config.heartbeat)
            node_periods = SIM_SIZES[-1] * periods
            results[f"false_suspicions_per_1000.loss_{percent}"] = 1000 * len(sim.suspicions) / node_periods
            results[f"false_deaths.loss_{percent}"] = len(sim.deaths)
            results[f"bytes_per_node.loss_{percent}"] = sim.traffic(mark).bytes

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for name, value in results.items():
        record(f"scale.sim.{name}", value)
    record("scale.sim.period_seconds", MeshSim().config.heartbeat)
    sizes = [results[f"bytes_per_node.{n}"] for n in SIM_SIZES]
    record("scale.sim.bytes_per_node_flatness", max(sizes) / min(sizes))
    benchmark.extra_info.update(results)
