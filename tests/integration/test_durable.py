"""Durable nodes as real processes, killed with SIGKILL and started again on their data dirs.

A durable producer process emits numbered readings to a durable service of two instances while
the test kills one of the three processes at seeded random moments (SIGKILL: no drain, no
goodbye, nothing more written) and starts it again a moment later on the same data dir and
endpoint. At the end the checker reads what every process logged (tests/integration/
durable_procs.py) and asserts:

* nothing lost: every reading whose ``emit`` returned, before or after any kill, was handled;
* nothing committed handled twice: a reading handled more than once was first handled by a
  killed instance *after its last commit* (the handler ran, the process died before its dedup
  id and acknowledgement were on disk: the one window README's "Guarantees" calls
  at-least-once), never by a live one, never before a commit;
* per-key order of first handlings.

A kill inside a commit (rows written, COMMIT not sent), of a consumer and of the producer, leaves
a store that opens and the same checks pass. ``choreo dlq`` lists and replays a dead letter
after its node was killed and restarted. Every wait is bounded; the seed is in every failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo.launch import NodeProcess

from .durable_procs import CONFIG, Reading, ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COUNT = 1500
KEYS = 20
SEEDS = int(os.environ.get("DURABLE_KILL_SEEDS", "2"))
FIRST = int(os.environ.get("DURABLE_KILL_FIRST", "1"))  # (make soak: new seeds each night)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mesh:
    """Two durable instances of ``ledger`` and a durable producer, each restartable on its dir."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.log = tmp / "consumers.log"
        self.producer_log = tmp / "producer.log"
        self.ports = [free_port(), free_port()]
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in self.ports]
        self.env = {"CHOREO_DURABLE_LOG": str(self.log), **(env or {})}
        self.consumers: list[NodeProcess | None] = [None, None]
        self.producer: subprocess.Popen[bytes] | None = None
        self.killed: set[int] = set()  # pids that died by SIGKILL
        self.story: list[str] = []
        self.lives = 0  # consumer lives started; each one's stderr (INFO) is kept as consumer-I.life-N.log
        self.life = [0, 0]  # the life each consumer runs

    def start_consumer(self, i: int, env: dict[str, str] | None = None) -> None:
        others = [e for j, e in enumerate(self.endpoints) if j != i and self.consumers[j] is not None]
        self.consumers[i] = NodeProcess(
            ledger, bind=self.endpoints[i], peers=others, config=CONFIG, data_dir=self.tmp / f"consumer-{i}",
            env={**self.env, **(env or {})}, ready_timeout=30, log_level="INFO",
        )
        self.lives += 1
        self.life[i] = self.lives

    def keep_log(self, i: int) -> None:
        """Copy consumer i's stderr (its whole life, at INFO) beside the test's other files."""
        proc = self.consumers[i]
        if proc is not None and proc.stderr_path and os.path.exists(proc.stderr_path):
            shutil.copyfile(proc.stderr_path, self.tmp / f"consumer-{i}.life-{self.life[i]}.log")

    def start_producer(self, env: dict[str, str] | None = None) -> None:
        self.producer = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.durable_procs", ",".join(self.endpoints),
             str(self.tmp / "producer"), str(self.producer_log), str(COUNT), str(KEYS)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.tmp / "producer.err", "ab"),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **(env or {})},
        )

    def pid(self, target: str) -> int:
        if target == "producer":
            assert self.producer is not None
            return self.producer.pid
        proc = self.consumers[int(target[-1])]
        assert proc is not None and proc.proc is not None
        return proc.proc.pid

    def alive(self, target: str) -> bool:
        if target == "producer":
            return self.producer is not None and self.producer.poll() is None
        proc = self.consumers[int(target[-1])]
        return proc is not None and proc.alive()

    def kill(self, target: str) -> None:
        pid = self.pid(target)
        os.kill(pid, signal.SIGKILL)
        self.killed.add(pid)
        self.story.append(f"t={time.monotonic() - self.t0:5.2f}s kill -9 {target} (pid {pid})")
        if target == "producer":
            assert self.producer is not None
            self.producer.wait(10)
        else:
            proc = self.consumers[int(target[-1])]
            assert proc is not None
            proc.kill()  # reaps it
            self.keep_log(int(target[-1]))

    def restart(self, target: str, env: dict[str, str] | None = None) -> None:
        if target == "producer":
            self.start_producer(env)
        else:
            self.start_consumer(int(target[-1]), env)
        self.story.append(f"t={time.monotonic() - self.t0:5.2f}s start {target} again (pid {self.pid(target)})")

    def wait_done(self, timeout: float) -> None:
        assert self.producer is not None and self.producer.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.producer.poll() is not None:
                out = self.producer.stdout.read().decode()
                assert "done" in out, f"the producer exited ({self.producer.returncode}) without finishing:\n" \
                    f"{(self.tmp / 'producer.err').read_text()[-3000:]}\n{self.describe()}"
                return
            time.sleep(0.1)
        raise AssertionError(f"the producer did not finish within {timeout:.0f} s\n{self.describe()}")

    def stop(self) -> None:
        for i, proc in enumerate(self.consumers):
            if proc is not None:
                proc.stop(timeout=20)
                proc.kill()
                self.keep_log(i)
        if self.producer is not None and self.producer.poll() is None:
            self.producer.kill()
            self.producer.wait(10)

    def describe(self) -> str:
        return ("what happened:\n  " + "\n  ".join(self.story)
                + f"\n  (every life's log, at INFO: {self.tmp}/consumer-*.life-*.log and producer.err)")

    def evidence(self) -> str:
        """What the processes said and did so far: their stderr, the consumers' log (for a failure
        that a later run does not repeat)."""
        parts = [self.describe()]
        err = self.tmp / "producer.err"
        parts.append("producer stderr:\n" + (err.read_text(errors="replace")[-2000:] if err.exists() else "(none)"))
        for i, proc in enumerate(self.consumers):
            if proc is not None:
                parts.append(f"consumer-{i} (alive: {proc.alive()}) stderr:\n{proc.stderr()[-2000:]}")
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        commits = {pid: sum(1 for line in lines if line == f"C {pid}") for pid in {line[2:] for line in lines if line.startswith("C ")}}
        parts.append(f"consumers' log: {len(lines)} lines, commits per pid {commits}, last {lines[-5:]}")
        return "\n".join(parts)

    def check(self) -> None:
        """The invariants of the module docstring, from the logs."""
        handled: dict[int, list[tuple[int, int]]] = defaultdict(list)  # n -> (pid, line index)
        last_commit: dict[int, int] = {}
        firsts: dict[str, list[int]] = defaultdict(list)
        for index, line in enumerate(self.log.read_text().splitlines()):
            fields = line.split()
            if fields[0] == "H":
                n, key, pid = int(fields[1]), fields[2], int(fields[3])
                if n not in handled:
                    firsts[key].append(n)
                handled[n].append((pid, index))
            elif fields[0] == "C":
                last_commit[int(fields[1])] = index
        returned = {int(line.split()[1]) for line in self.producer_log.read_text().splitlines()}
        story = self.describe()
        assert returned == set(range(COUNT)), f"the producer's emits returned for {len(returned)} of {COUNT}\n{story}"
        lost = sorted(returned - handled.keys())
        assert not lost, f"{len(lost)} readings emitted and never handled, e.g. {lost[:10]}\n{story}"
        repeated = {}
        for n, runs in handled.items():
            for pid, index in runs[:-1]:  # a handling that another one followed
                if pid not in self.killed or index < last_commit.get(pid, -1):
                    repeated[n] = runs
        assert not repeated, (
            f"{len(repeated)} readings handled again after a committed handling, e.g. {list(repeated.items())[:3]} "
            f"(killed pids {sorted(self.killed)}, last commits {last_commit})\n{story}"
        )
        for key, ns in firsts.items():
            assert ns == sorted(ns), f"key {key}: first handlings out of order: {ns[:30]}\n{story}"
        if os.environ.get("DURABLE_SHOW"):  # DURABLE_SHOW=1 pytest -s: what each run did
            again = sum(len(runs) - 1 for runs in handled.values())
            print(f"\n{story}\n  {len(handled)} readings handled, {again} handlings repeated (uncommitted at a kill)")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def run_with_kills(m: Mesh, seed: int, kills: int) -> None:
    rng = random.Random(seed)
    m.t0 = time.monotonic()  # type: ignore[attr-defined]
    m.start_consumer(0)
    m.start_consumer(1)
    m.start_producer()
    targets = ["producer", "consumer-0", "consumer-1"]
    for _ in range(kills):
        time.sleep(rng.uniform(0.3, 1.0))
        if not m.alive("producer"):
            break  # it finished
        target = rng.choice(targets)
        m.kill(target)
        time.sleep(rng.uniform(0.05, 0.5))
        m.restart(target)
    m.story.append(f"seed {seed}: no more kills")
    m.wait_done(180)
    m.stop()  # graceful: the consumers drain, the logs are complete
    m.check()


@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_sigkill_at_seeded_random_moments_loses_nothing_and_repeats_nothing_committed(mesh: Mesh, seed: int) -> None:
    run_with_kills(mesh, seed, kills=8)


@pytest.mark.parametrize("target", ["consumer-0", "producer"])
def test_a_kill_inside_a_commit_leaves_a_store_that_opens_and_loses_nothing(tmp_path: Path, target: str) -> None:
    m = Mesh(tmp_path)
    paused = tmp_path / "paused"
    pause = {"CHOREO_DURABLE_PAUSE_AT": "20", "CHOREO_DURABLE_PAUSED": str(paused)}
    try:
        m.t0 = time.monotonic()  # type: ignore[attr-defined]
        m.start_consumer(0, pause if target == "consumer-0" else None)
        m.start_consumer(1)
        m.start_producer(pause if target == "producer" else None)
        deadline = time.monotonic() + 60
        while not paused.exists():
            assert time.monotonic() < deadline, f"{target} never reached its 20th commit\n{m.evidence()}"
            time.sleep(0.02)
        m.story.append(f"{target} stopped inside its 20th commit (rows written, COMMIT not sent)")
        m.kill(target)
        m.restart(target)  # without the pause: the store must open, and recover what was committed
        m.wait_done(180)
        m.stop()
        m.check()
    finally:
        m.stop()


def choreo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreo", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_dead_letters_are_listed_and_replayed_across_restarts(tmp_path: Path) -> None:
    import asyncio

    from choreo.node import Node

    poison = tmp_path / "poison"
    poison.write_text("")
    env = {"CHOREO_DURABLE_LOG": str(tmp_path / "consumers.log"), "CHOREO_DURABLE_POISON": str(poison)}
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "ledger"

    def start() -> NodeProcess:
        return NodeProcess(ledger, bind=endpoint, config=CONFIG, data_dir=data_dir, env=env)

    async def emit_poison() -> None:
        async with Node(None, peers=[endpoint], config=CONFIG) as client:
            await client.wait_for({"ledger": 1}, timeout=30)
            await client.emit(Reading(k="poison", n=7))
            await client.flush(timeout=60)  # acknowledged once it is a dead letter

    node = start()
    try:
        asyncio.run(asyncio.wait_for(emit_poison(), 90))
        node.kill()  # SIGKILL
        node = start()
        listed = choreo("dlq", "list", "--peer", endpoint)
        assert listed.returncode == 0 and "reading 7 is poison" in listed.stdout, listed.stdout + listed.stderr
        letter_id = next(line.split()[0] for line in listed.stdout.splitlines() if "poison" in line)
        poison.unlink()  # fixed
        replayed = choreo("dlq", "replay", letter_id.lstrip("#"), "--peer", endpoint)
        assert replayed.returncode == 0 and "handled" in replayed.stdout, replayed.stdout + replayed.stderr
        node.kill()
        node = start()
        listed = choreo("dlq", "list", "--peer", endpoint)
        assert listed.returncode == 0 and "poison" not in listed.stdout, listed.stdout
    finally:
        node.stop(timeout=20)
        node.kill()
    lines = (tmp_path / "consumers.log").read_text().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("H")] == ["7"], lines


def test_choreo_run_refuses_a_data_dir_in_use_or_damaged_in_one_line(tmp_path: Path) -> None:
    holder = NodeProcess(ledger, config=CONFIG, data_dir=tmp_path / "d")
    try:
        busy = choreo("run", "tests.integration.durable_procs:ledger", "--data-dir", str(tmp_path / "d"), timeout=30)
        assert busy.returncode == 2, busy
        assert f"data dir {tmp_path / 'd'} is in use by another node (pid {holder.pid}" in busy.stderr, busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    finally:
        holder.stop(timeout=20)
        holder.kill()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "store.sqlite3").write_bytes(b"\x00garbage" * 512)
    damaged = choreo("run", "tests.integration.durable_procs:ledger", "--data-dir", str(tmp_path / "e"), timeout=30)
    assert damaged.returncode == 2 and "is not a choreo store, or is damaged" in damaged.stderr, damaged.stderr
    assert (tmp_path / "e" / "store.sqlite3").read_bytes() == b"\x00garbage" * 512
