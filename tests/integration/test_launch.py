"""Starting nodes as processes: they leave with the program that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from choreo.launch import NodeProcess

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split()[2] != "Z"


def test_node_processes_stop_when_their_parent_is_killed() -> None:
    program = textwrap.dedent(
        """
        import sys, time
        from choreo.launch import NodeProcess
        from tests.integration.recording import audit
        proc = NodeProcess(audit)
        print(proc.pid, flush=True)
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, env=env)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)  # watching another process: nothing to wait on
        assert not _alive(child), "the node outlived the program that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_node_process_that_exits_before_it_is_ready_says_how() -> None:
    # (it used to wait out ready_timeout, then blame the time: the exit status tells the truth)
    with pytest.raises(TimeoutError, match=r"exited with status 1 before it was ready: (?s:.*)"
                                           r"No module named 'no_such_module_xyz'"):
        NodeProcess("no_such_module_xyz:svc", ready_timeout=60)
