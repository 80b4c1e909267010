"""``make demo`` (``python -m choreo.demo``): it runs the shop to the end and tells the story right,
and Ctrl-C, whenever it comes, leaves no process behind.

The demo runs as a child process whose output is read with deadlines. What it prints is checked
against an independent account: the shop's phones replayed against a stub (the same seeded
carts, losses and double taps, no mesh), which says how many attempts, retries and duplicates
there must be, and which checkouts were retried. Every process the demo starts inherits a
marker in its environment, so the test can find any survivor wherever it was reparented.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
import uuid
from pathlib import Path

import pytest

from examples.shop.mobile import Outcome, checkouts, phone
from tests.child import Child

pytestmark = pytest.mark.slow  # real processes

REPO = Path(__file__).resolve().parents[2]
MARKER = "CHOREO_DEMO_TEST_RUN"


class Demo(Child):
    """``python -m choreo.demo ARGS`` with its output read under deadlines; always reaped."""

    def __init__(self, *args: str) -> None:
        self.marker = uuid.uuid4().hex
        env = {**os.environ, MARKER: self.marker, "NO_COLOR": "1"}
        super().__init__([sys.executable, "-m", "choreo.demo", *args], what="the demo", env=env)

    def survivors(self) -> list[str]:
        """Processes (other than zombies) that carry this run's marker: what the demo left behind."""
        found = []
        needle = f"{MARKER}={self.marker}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if state != "Z":
                found.append(f"pid {entry} ({state}): {cmd}")
        return found

    def close(self) -> None:
        self.stop(signal.SIGKILL, 10)
        for line in self.survivors():  # if a test failed half-way, nothing of it may outlive it
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def demo():
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        started.append(Demo(*args))
        return started[-1]

    yield start
    for d in started:
        d.close()


def expected(orders: int, phones: int, loss: float, double_tap: float, seed: int) -> tuple[Outcome, dict[str, int]]:
    """The phones' side of a run, replayed against a stub: the Outcome's counts and retried
    checkouts, and the PlaceOrder attempts of each order."""
    attempts: dict[str, int] = {}

    class Stub:
        async def send(self, cmd, **_):
            oid = f"{cmd.customer_id}-{cmd.cart_id}"
            attempts[oid] = attempts.get(oid, 0) + 1

    out = Outcome(checkouts=orders)
    carts = checkouts(orders, seed)

    async def play() -> None:
        await asyncio.gather(*(
            phone(Stub(), carts[p::phones], random.Random(f"{seed}/{p}"), loss, double_tap, out, seed, None)
            for p in range(phones)
        ))  # fmt: skip

    asyncio.run(play())
    return out, attempts


def test_the_demo_drives_the_shop_and_tells_the_story(demo) -> None:
    orders, phones, seed = 160, 8, 11
    run = demo("--orders", str(orders), "--phones", str(phones), "--rate", "80", "--seed", str(seed),
               "--interval", "0.5")  # fmt: skip
    status = run.finish(timeout=120)
    out = run.output
    assert status == 0, out
    assert not run.survivors(), out
    want, attempts = expected(orders, phones, 0.3, 0.1, seed)
    retries = want.attempts - orders
    assert want.lost >= 10 and want.double_taps >= 3, "the seed should make a flaky run"

    # every service as its own process, and all of them stopped at the end
    pids = re.findall(r"pid (\d+) +tcp://", out)
    assert len(pids) == 7, out
    assert "all 7 stopped" in out and out.count("exit 0") >= 7, out

    # the live view, without a terminal: periodic lines up to every checkout done
    live = re.findall(rf"\[ *[\d.]+ s\] (\d+)/{orders} checkouts, .* \| done/s(.*?): api .* \| dedup ", out)
    assert len(live) >= 3 and live[-1] == (str(orders), " (average)"), out  # the last: averages over the run
    assert "\x1b[" not in out, "no ANSI codes without a terminal"

    # the driver's verdict
    assert f"mobile: {orders} checkouts, {want.attempts} PlaceOrder attempts" in out, out
    assert "consistent: every order placed once" in out, out

    # the flow graph, as the analyzer draws it
    assert "PlaceOrder (command, from mobile): depth 8" in out, out
    assert re.search(r"└─ sends CreateOrder \(command\)\n +└─ orders\.create_order", out), out
    assert "no findings" in out

    # the retries, deduplicated: the numbers are the phones' own
    m = re.search(r"retries +(\d+) = (\d+) answers lost .* \+ (\d+) double taps", out)
    assert m and tuple(map(int, m.groups())) == (retries, want.lost, want.double_taps), (m and m.groups(), out)
    m = re.search(r"api +ran all (\d+) attempts", out)
    assert m and int(m.group(1)) == want.attempts, out
    m = re.search(r"orders +deduplicated (\d+) CreateOrders", out)
    assert m and int(m.group(1)) == retries, out
    assert f"{orders} orders for {orders} checkouts: every checkout placed once" in out, out

    # one retried checkout's trace: every attempt reached the api, only the first created the order
    m = re.search(r"one retried checkout, (\S+) \(choreo trace ([0-9a-f]{32}) --peer tcp://", out)
    assert m, out
    oid, trace_id = m.groups()
    assert oid in want.retried and trace_id == want.traces[oid], (oid, trace_id)
    trace = out[m.end():out.index("stopping 7 processes")]
    assert re.search(rf"trace {trace_id}: ok, \d+ steps, 6 services", trace), trace
    n = attempts[oid]
    assert n >= 2
    assert len(re.findall(r"PlaceOrder -> api\.place_order @api#\d", trace)) == n, trace
    creates = re.findall(r"CreateOrder -> orders\.create_order @orders#1 key=\S+(.*)", trace)
    assert sorted(c.strip() for c in creates) == [""] + ["= deduplicated: not run again"] * (n - 1), trace
    assert f"= deduplicated: {n - 1} duplicate" in trace, trace
    for step in ("OrderPlaced -> inventory.reserve", "StockReserved -> payments.charge", "PaymentCaptured -> shipping.ship",
                 "OrderShipped -> notifications.shipped"):  # fmt: skip
        assert step in trace, f"{step!r} missing from the trace of a shipped order:\n{trace}"
    assert "critical path: api.place_order -> orders.create_order -> inventory.reserve" in trace, trace


@pytest.mark.parametrize("moment", ["starting", "driving"])
def test_ctrl_c_stops_every_process_the_demo_started(demo, moment: str) -> None:
    run = demo("--orders", "20000", "--interval", "0.5")  # would drive for five minutes
    if moment == "starting":
        run.wait_for(r"pid \d+ +tcp://\S+ +ready", timeout=60)  # the first service is up, the others coming
    else:
        run.wait_for(r"\] [1-9]\d*/20000 checkouts", timeout=60)  # checkouts under way
    assert len(run.survivors()) >= 2, "the demo and its processes should carry the marker"
    run.proc.send_signal(signal.SIGINT)
    status = run.finish(timeout=60)
    left = run.survivors()  # at once: the demo waits for its processes before it exits
    assert status == 130, run.output
    assert not left, "still running after the demo exited:\n" + "\n".join(left) + f"\n{run.output}"
    assert re.search(r"(interrupted|Ctrl-C): stopping every process", run.output), run.output
    assert "not reached within" not in run.output, "a stop says what it leaves behind, or nothing"
    if moment == "driving":
        assert "all 7 stopped" in run.output, run.output
