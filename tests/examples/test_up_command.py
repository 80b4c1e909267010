"""``choreo up`` itself: the command line, its exit statuses, Ctrl-C, and no process left behind."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from choreo.errors import ChoreoUsageError
from choreo.up import exit_status, load_example, resolve_target
from choreo.up_commands import parse_options
from tests.child import Child

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class Up(Child):
    """``choreo up ...`` as a child process whose output is read with deadlines, always reaped."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
        super().__init__([sys.executable, "-m", "choreo", "up", *args], what="choreo up", env=env)

    def pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"pid (\d+) +(?:[\w.-]+@)?tcp://", self.output)]

    def close(self) -> None:
        self.stop(signal.SIGINT, 20)
        for pid in self.pids():  # if the test failed half-way, nothing of it may survive
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def up_cmd():
    started: list[Up] = []

    def start(*args: str) -> Up:
        started.append(Up(*args))
        return started[-1]

    yield start
    for u in started:
        u.close()


@pytest.mark.slow
def test_up_shop_drives_prints_the_outcome_and_stops_everything(up_cmd) -> None:
    run = up_cmd("examples/shop", "--interval", "0")
    status = run.finish(timeout=90)
    out = run.output
    assert status == 0, out
    assert "mesh complete: 7 nodes" in out
    assert re.search(r"orders created 40 orders, (\d+) duplicate CreateOrders", out), out
    assert "consistent: every order placed once" in out, out
    pids = run.pids()
    assert len(pids) == 7, out
    assert len(re.findall(r"pid \d+ +exit 0 ", out)) == 7, out
    assert not [p for p in pids if alive(p)]


@pytest.mark.slow
def test_up_secure_runs_the_shop_over_curve_with_a_key_per_process(up_cmd) -> None:
    run = up_cmd("examples/shop", "--secure", "--interval", "0")
    status = run.finish(timeout=90)
    out = run.output
    assert status == 0, out
    assert "consistent: every order placed once" in out, out
    # every process has a key of its own, in its address; the seed line says how to observe the mesh
    assert len(re.findall(r"pid \d+ +(api-[12]|orders-1|inventory-1|payments-1|shipping-1|notifications-1)@tcp://", out)) == 7
    keys = re.search(r"--peer api-1@tcp://127.0.0.1:\d+ --keys (\S+) --as ops", out)
    assert keys is not None, out
    assert not os.path.exists(keys.group(1)), "the keys of the run were left behind"
    assert len(re.findall(r"pid \d+ +exit 0 ", out)) == 7, out
    assert not [p for p in run.pids() if alive(p)]


@pytest.mark.slow
def test_ctrl_c_stops_every_process(up_cmd) -> None:
    run = up_cmd("examples.products", "--no-drive", "--interval", "0.5")
    run.wait_for("running until Ctrl-C", timeout=60)
    run.wait_for("processed", timeout=10)  # one status line per process
    pids = run.pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=30) == 0, run.output  # no driver: Ctrl-C is the way to end it
    assert "Ctrl-C: stopping" in run.output
    assert not [p for p in pids if alive(p)], run.output


@pytest.mark.slow
def test_a_dying_service_stops_the_system_with_its_reason(up_cmd) -> None:
    run = up_cmd(str(HERE / "up_systems" / "crashing"), "--interval", "0")
    assert run.finish(timeout=60) == 1, run.output
    assert re.search(r"error: victim#1 \(pid \d+\) exited with status 3", run.output), run.output
    assert "crashing on purpose" in run.output  # the tail of its stderr
    assert len(re.findall(r"bystander#\d +pid \d+ +exit 0 ", run.output)) == 2, run.output
    assert not [p for p in run.pids() if alive(p)]


@pytest.mark.slow
def test_the_drivers_outcome_is_the_exit_status(up_cmd) -> None:
    failing = up_cmd("up_systems.failing_driver", "--interval", "0")
    passing = up_cmd("tests/examples/up_systems/failing_driver", "--interval", "0", "-o", "fail=False")
    assert failing.finish(timeout=60) == 4, failing.output
    assert passing.finish(timeout=60) == 0, passing.output
    assert "echo answered 'pong'" in failing.output
    assert "starting 1 process: echo" in failing.output and "stopping 1 process (SIGTERM" in failing.output
    bad = up_cmd("up_systems.failing_driver", "-o", "loud=1")
    assert bad.finish(timeout=30) == 2
    assert "the driver takes no option loud; its options: fail=True" in bad.output


def test_targets_and_options() -> None:
    assert resolve_target("examples.shop") == "examples.shop"
    assert resolve_target(str(REPO / "examples" / "patterns")) == "examples.patterns"
    example = load_example(str(REPO / "examples" / "shop") + "/")
    assert example.module == "examples.shop" and example.count()["api"] == 2 and example.client
    with pytest.raises(ChoreoUsageError, match="declares no SYSTEM"):
        load_example("examples")
    with pytest.raises(ChoreoUsageError, match="not a package directory"):
        resolve_target(str(REPO / "tests" / "examples"))
    with pytest.raises(ChoreoUsageError) as missing:
        resolve_target("examples/nope")
    assert str(missing.value).startswith("examples/nope: no such directory; the examples are: examples/patterns/")
    assert "examples/shop" in str(missing.value)

    async def drive(client, system, orders=10, name="x"): ...

    assert parse_options(["orders=3", "name=abc"], drive) == {"orders": 3, "name": "abc"}
    with pytest.raises(ChoreoUsageError, match="KEY=VALUE"):
        parse_options(["orders"], drive)
    assert exit_status(None) == 0 and exit_status(5) == 5 and exit_status(True) == 0
