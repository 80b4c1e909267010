"""What ``pip install choreo`` gives a user: a wheel built without warnings, whose examples run.

The wheel is built from this tree the way pip builds it (an isolated build environment; in the
background while the simulations run, when they run in the same session: see wheel_build.py), then
unpacked and put first on ``PYTHONPATH`` of commands run in an empty directory: no clone, no
``examples/`` next to them, as after ``pip install``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .wheel_build import session_build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(request: pytest.FixtureRequest) -> Path:
    build = session_build(request.config)  # (usually started in the background: see wheel_build.py)
    status, log = build.wait(timeout=600)
    out = build.out
    assert status == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if "Warning" in line and "Location '" not in line]
    assert not warnings, "the build warns:\n" + "\n".join(warnings)
    (wheel,) = out.glob("choreo-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"choreo/examples/shop/__init__.py", "choreo/examples/patterns/cqrs/__init__.py",
                "choreo/examples/patterns/cqrs/README.md", "choreo/py.typed"} <= names  # fmt: skip
        assert not [n for n in names if n.startswith("examples/")], "no top-level 'examples' package"
        z.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "choreo", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)  # fmt: skip


def test_the_installed_examples_run_from_any_directory(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import choreo; print(choreo.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)}, timeout=60,
    )  # fmt: skip
    assert where.stdout.strip() == str(installed / "choreo" / "__init__.py")
    lint = _run(installed, tmp_path, "lint", "examples.shop")
    assert lint.returncode == 0 and lint.stdout.startswith("examples.shop: 8 services"), lint.stdout + lint.stderr
    up = _run(installed, tmp_path, "up", "examples/patterns/event_notification", "--interval", "0")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert "choreo up choreo.examples.patterns.event_notification" in up.stdout
    missing = _run(installed, tmp_path, "up", "examples/nope")
    assert missing.returncode == 2
    assert missing.stderr.startswith("choreo: error: examples/nope: no such directory; the examples are: ")
    assert "examples/shop" in missing.stderr and "\n" == missing.stderr[-1] and missing.stderr.count("\n") == 1
