"""Processes for the durability tests: a durable consumer that logs what it does, and a producer.

The consumer service ``ledger`` appends one line per handling to ``$CHOREO_DURABLE_LOG``
(``H <n> <key> <pid>``, with ``O_APPEND``: a line written survives a SIGKILL of the process, as a
handler's effect outside choreo would), and one line ``C <pid>`` each time a commit of its data
dir is on disk: a handling logged before a ``C`` of the same process was committed with its
acknowledgement; one after the last ``C`` of a killed process was not, and may run again.
``$CHOREO_DURABLE_PAUSE_AT=N`` makes the Nth commit stop inside its transaction (rows written,
``COMMIT`` not yet sent) and create the file ``$CHOREO_DURABLE_PAUSED``: the test kills it there.
A reading whose key is ``poison`` fails while the file ``$CHOREO_DURABLE_POISON`` exists.

The producer (``python -m tests.integration.durable_procs SEEDS DATA_DIR LOG COUNT KEYS``) is a
durable client: it emits readings ``n`` = 0..COUNT-1 (idempotency key: their key and ``n``) and
appends ``E <n>`` to LOG once ``await emit`` returned; started again on the same data dir it
goes on after the last ``E`` of its log (the event after it may have been emitted already: the
same id, deduplicated), then flushes and prints ``done``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

from choreo import Event, NodeConfig, Service
from choreo.errors import ChoreoError
from choreo.node import Node

CONFIG = NodeConfig(window=256, suspect_after=1.0, dead_after=3.0, heartbeat=0.25, handover_timeout=5.0,
                    emit_timeout=5.0, request_timeout=5.0)


class Reading(Event, key="k", idempotency=["k", "n"]):
    k: str
    n: int


def _append(line: str) -> None:
    path = os.environ["CHOREO_DURABLE_LOG"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


ledger = Service("ledger", partitions=16)


@ledger.on(Reading)
def on_reading(ev: Reading) -> None:
    if ev.k == "poison" and os.path.exists(os.environ.get("CHOREO_DURABLE_POISON", "/nonexistent")):
        raise RuntimeError(f"reading {ev.n} is poison")
    _append(f"H {ev.n} {ev.k} {os.getpid()}\n")


@ledger.task
async def watch_commits(node: Any) -> None:
    """Log each commit once it is on disk; stop inside the Nth commit if asked to."""
    journal = node.engine.journal
    released = journal.on_durable
    pid = os.getpid()

    def durable(generation: int) -> None:
        released(generation)
        _append(f"C {pid}\n")

    journal.on_durable = durable
    pause_at = int(os.environ.get("CHOREO_DURABLE_PAUSE_AT", "0"))
    if pause_at:
        store = journal.store
        store._conn = _PausingConnection(store._conn, pause_at, os.environ["CHOREO_DURABLE_PAUSED"])


class _PausingConnection:
    """An sqlite3 connection that stops before the COMMIT of its Nth transaction (to be killed there)."""

    def __init__(self, conn: Any, at: int, flag: str) -> None:
        self._conn, self._at, self._flag, self._commits = conn, at, flag, 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self._commits += 1
            if self._commits == self._at:
                with open(self._flag, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(120)  # the rows are written, the transaction open: the test kills us here
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def produce(seeds: str, data_dir: str, log: str, count: int, keys: int) -> None:
    done = -1
    if os.path.exists(log):
        with open(log) as f:
            returned = [int(line.split()[1]) for line in f if line.startswith("E ")]
        done = max(returned, default=-1)
    os.environ["CHOREO_DURABLE_LOG"] = log
    async with Node(None, peers=seeds.split(","), config=CONFIG, data_dir=data_dir) as client:
        pause_at = int(os.environ.get("CHOREO_DURABLE_PAUSE_AT", "0"))
        if pause_at:
            store = client.engine.journal.store
            store._conn = _PausingConnection(store._conn, pause_at, os.environ["CHOREO_DURABLE_PAUSED"])
        await client.wait_for({"ledger": 1}, timeout=60)
        n = done + 1
        while n < count:
            try:
                await client.emit(Reading(k=f"k{n % keys}", n=n), timeout=10)
            except ChoreoError:  # backpressure while a consumer restarts: the same event again (same id)
                await asyncio.sleep(0.05)
                continue
            _append(f"E {n}\n")
            n += 1
        await client.flush(timeout=120)
        print("done", flush=True)


if __name__ == "__main__":
    # INFO: a failing run's story is in what each life said (the test keeps its stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed_, data_dir_, log_, count_, keys_ = sys.argv[1:6]
    asyncio.run(produce(seed_, data_dir_, log_, int(count_), int(keys_)))
