"""The wheel ``test_wheel.py`` installs: built once per session, in the background where it can be.

Building it the way pip does (an isolated build environment, then the compiled core) takes most
of a minute of one core. When the simulations run in the same session, the root conftest starts
the build as the first of them starts and runs ``test_wheel.py`` right after the last: they run
in virtual time, so the build on the second core slows them without changing what they do, and
the suite does not wait for the build on its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class WheelBuild:
    """``pip wheel`` of this tree into a directory of its own, started at construction."""

    def __init__(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="choreo-wheel-"))
        self._log = open(self.out / "build.log", "w+")  # noqa: SIM115 - read in wait(), closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-v", "-w", str(self.out)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip

    def wait(self, timeout: float) -> tuple[int, str]:
        """The build's exit status and its whole output (``subprocess.TimeoutExpired`` past ``timeout``)."""
        status = self.proc.wait(timeout)
        self._log.seek(0)
        return status, self._log.read()

    def close(self) -> None:
        """Stop the build if it still runs, and remove what it made."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
        shutil.rmtree(self.out, ignore_errors=True)


# the session's build, once started (the root conftest's hooks, or test_wheel.py's fixture)
BUILD = pytest.StashKey[WheelBuild]()


def session_build(config: pytest.Config) -> WheelBuild:
    """The session's build: the one already started, else one started now."""
    if BUILD not in config.stash:
        config.stash[BUILD] = WheelBuild()
    return config.stash[BUILD]


def is_wheel_test(item: pytest.Item) -> bool:
    return item.path.name == "test_wheel.py"


def is_simulation(item: pytest.Item) -> bool:
    return item.path.parent.name == "sim" and item.path.parent.parent.name == "tests"
