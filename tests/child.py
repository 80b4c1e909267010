"""A child process whose output is read under deadlines, so a test that waits for a line fails
with what was printed instead of hanging on a ``readline`` that never returns."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Child:
    """``argv`` run in its own session from the repository's root.

    What it prints is collected in ``output``: its stdout and stderr merged, or with
    ``stderr_only`` its stderr alone (stdout discarded), for a test about what goes there.
    """

    def __init__(
        self, argv: Sequence[str], *, what: str, env: Mapping[str, str] | None = None, stderr_only: bool = False
    ) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            stdout=subprocess.DEVNULL if stderr_only else subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_only else subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
        self._pipe = self.proc.stderr if stderr_only else self.proc.stdout
        assert self._pipe is not None
        self.output = ""
        os.set_blocking(self._pipe.fileno(), False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._pipe, selectors.EVENT_READ)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False at the end of the output."""
        if self._sel.select(timeout):
            chunk = self._pipe.read()
            if chunk:
                self.output += chunk.decode(errors="replace")
                return True
            return False
        return True

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Return once the output matches the regular expression ``pattern``; fail at ``timeout``."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} not printed by {self.what} within {timeout:.0f} s; output so far:\n{self.output}"
            if not self._read(min(left, 0.2)) and self.proc.poll() is not None:
                raise AssertionError(f"{self.what} exited ({self.proc.returncode}) before printing {pattern!r}:\n{self.output}")

    def finish(self, timeout: float) -> int:
        """Read to the end of the output and return the exit status; fail at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.what} still running after {timeout:.0f} s; output so far:\n{self.output}"
            if not self._read(min(left, 0.2)) and self.proc.poll() is not None:
                return self.proc.wait(1)

    def stop(self, sig: int, timeout: float) -> None:
        """Send ``sig``; kill its whole session if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._sel.close()
        self._pipe.close()

