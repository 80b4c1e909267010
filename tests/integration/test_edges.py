"""The guarantees at the edges of membership, with real processes on 127.0.0.1.

* a client that emits the moment it starts, before it knows the mesh: nothing goes nowhere;
* the only instance of a service stops gracefully (SIGTERM) mid-stream and is started again
  (a rolling restart of a one-instance service): what was emitted meanwhile waits at its
  producer and is handled once the instance is back: nothing lost, nothing twice, order kept;
* a seed that does not answer is named, and the node routes nothing meanwhile;
* a result too large to travel fails at once on both sides, with the sizes.

(The partition longer than ``dead_after`` with a rejoin runs across network namespaces in
test_membership.py; the fault schedules of tests/sim/test_nemesis.py cover the rest.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from choreo import MessageTooLarge, NotJoined, Query, Service
from choreo.client import rpc
from choreo.node import Node, NodeConfig
from tests.child import Child

from .checks import check_exactly_once_in_order, expected_stream
from .recording import Produced, Work, elastic, read_records, read_timed, slow

pytestmark = pytest.mark.slow

FAST = NodeConfig(heartbeat=0.2, suspect_after=1.0, dead_after=2.5, handover_timeout=5.0, rto=0.5, window=256)
REPO = Path(__file__).resolve().parents[2]


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 180))


def test_a_client_that_emits_at_once_loses_nothing(procs) -> None:  # type: ignore[no-untyped-def]
    consumer = procs.start(elastic, config=FAST)

    async def scenario() -> None:
        # no wait_for: the first emits happen before the client has heard from anyone
        async with Node(None, peers=[consumer.endpoint], config=FAST) as client:
            for n in range(500):
                await client.emit(Produced(k=f"k{n % 7}", n=n))
            await client.flush(timeout=30)

    run(scenario())
    procs.close()
    records = [("Produced", k, n, f) for k, n, _, f in read_timed(str(procs.record_dir), "elastic")]
    check_exactly_once_in_order(records, expected_stream(500, 7), "emits right after start")


def test_the_only_instance_stops_and_comes_back_and_nothing_is_lost(procs) -> None:  # type: ignore[no-untyped-def]
    count, keys = 6_000, 50
    first = procs.start(elastic, config=FAST)
    seed = first.endpoint
    restarted: dict[str, object] = {}

    async def scenario() -> None:
        async with Node(None, peers=[seed], config=FAST) as client:
            await client.wait_for({"elastic": 1}, timeout=30)
            for n in range(count):
                if n == 2_000:
                    # SIGTERM: it drains, hands over to nobody, says goodbye; elastic stays declared
                    await asyncio.to_thread(first.stop, 30)
                    assert client.stats().emitted >= n
                if n == 2_000 + FAST.window // 2:
                    # what was emitted since waits here; bring the service back (at a new address)
                    restarted["proc"] = await asyncio.to_thread(procs.start, elastic, [client.endpoint], config=FAST)
                await client.emit(Produced(k=f"k{n % keys}", n=n), timeout=60)
            await client.flush(timeout=60)
            assert client.stats().unrouted == 0, "nothing was counted as unrouted while elastic is declared"

    run(scenario())
    assert "proc" in restarted
    procs.close()
    records = [("Produced", k, n, f) for k, n, _, f in read_timed(str(procs.record_dir), "elastic")]
    check_exactly_once_in_order(records, expected_stream(count, keys), "the only instance stopped and restarted")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nobody listens there once the socket is closed


def test_a_silent_seed_is_named_and_nothing_is_routed() -> None:
    seed = f"tcp://127.0.0.1:{_closed_port()}"

    async def scenario() -> None:
        async with Node(None, peers=[seed], config=FAST) as client:
            with pytest.raises(NotJoined, match=rf"no answer from its seeds {seed} \(\d+\.\d s\)"):
                await client.emit(Produced(k="k", n=1), timeout=1.0)
            assert client.stats().state == "joining"
            await client.stop(drain=False)

    run(scenario())


def test_choreo_run_names_a_seed_that_does_not_answer_on_stderr() -> None:
    seed = f"tcp://127.0.0.1:{_closed_port()}"
    run = Child(
        [sys.executable, "-m", "choreo", "run", "tests.integration.recording:elastic", "--peer", seed],
        what="choreo run", stderr_only=True,
    )
    try:
        run.wait_for(re.escape(f"seed {seed} does not answer"), timeout=20)
    finally:
        run.stop(signal.SIGTERM, 15)


class Ledger(Query):
    account: str


big = Service("big")


@big.query(Ledger)
def ledger(q: Ledger) -> str:
    return "x" * 4096  # larger than the caller accepts (max_message_bytes=2048 below)


def test_a_second_sigterm_cuts_a_long_drain_short_and_nothing_is_lost(procs) -> None:  # type: ignore[no-untyped-def]
    """An operator stops an instance whose drain would take minutes (a slow handler, a queue of
    work), then signals again: it leaves at once (before, it drained on for ``drain_timeout``),
    and what it had not handled is resent to the next instance: nothing is lost."""
    count = 40
    patient = dataclasses.replace(FAST, drain_timeout=300.0)
    # ~80 s of work queued; INFO: its log says when it starts to drain
    first = procs.start(slow, config=patient, env={"CHOREO_SLOW_DELAY": "2.0"}, log_level="INFO")

    async def scenario() -> None:
        async with Node(None, peers=[first.endpoint], config=FAST) as client:
            await client.wait_for({"slow": 1}, timeout=30)
            for n in range(count):
                await client.emit(Work(k="k", n=n), timeout=30)
            deadline = time.monotonic() + 30
            while not read_records(str(procs.record_dir), "slow") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # it has started on the queue
            first.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while "draining" not in first.stderr() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert "draining" in first.stderr() and first.alive(), "the first signal drains (for over a minute)"
            first.proc.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(first.proc.wait, 60)  # (TimeoutExpired if it drained on)
            assert status == 0
            assert "a second signal: leaving now" in first.stderr()
            # what it had not handled waits here for the next instance of slow, a fast one
            await asyncio.to_thread(procs.start, slow, [client.endpoint], config=FAST, env={"CHOREO_SLOW_DELAY": "0"})
            await client.flush(timeout=60)

    run(scenario())
    procs.close()
    handled = [n for _, _, n, _ in read_records(str(procs.record_dir), "slow")]
    assert set(handled) == set(range(count)), f"lost: {sorted(set(range(count)) - set(handled))}"
    first_seen = list(dict.fromkeys(handled))
    assert first_seen == sorted(first_seen), "one key: handled in order"


def test_a_result_too_large_fails_at_once_on_both_sides(procs) -> None:  # type: ignore[no-untyped-def]
    server = procs.start(big, config=FAST)
    small = NodeConfig(heartbeat=0.2, suspect_after=1.0, dead_after=2.5, max_message_bytes=2048)

    async def scenario() -> None:
        async with Node(None, peers=[server.endpoint], config=small) as client:
            await client.wait_for({"big": 1}, timeout=30)
            # MessageTooLarge, not DeliveryTimeout: the owner said why instead of leaving the caller waiting
            with pytest.raises(MessageTooLarge, match=r"big refused Ledger: the result of Ledger is \d+ bytes, above the limit of 2048"):
                await client.ask(Ledger("a"), timeout=20)

    run(scenario())
    assert rpc(server.endpoint, "stats")["refused"].get("result_too_large") == 1
