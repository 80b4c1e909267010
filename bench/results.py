"""bench/results.json: one flat JSON object of named figures, merged run after run.

Benchmarks call :func:`record`; ``python -m bench.report`` turns the file into the README's table.
Each write also refreshes the ``machine.*`` entries, so every figure sits beside the machine it
was measured on (figures are ratios to baselines taken in the same run wherever possible: the
machine is shared and noisy, see shared/PERFORMANCE.md).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str | int]:
    """Python, pyzmq/libzmq versions, CPU model, core count and the date (UTC)."""
    try:
        import zmq

        pyzmq, libzmq = zmq.__version__, zmq.zmq_version()
    except ImportError:  # pragma: no cover - pyzmq is a dependency
        pyzmq = libzmq = "not installed"
    return {
        "machine.python": platform.python_version(),
        "machine.pyzmq": pyzmq,
        "machine.libzmq": libzmq,
        "machine.cpu": _cpu_model(),
        "machine.cores": os.cpu_count() or 0,
        "machine.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load(path: Path = RESULTS) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(name: str, value: float, path: Path = RESULTS) -> None:
    """Merge ``name: value`` (and the machine info) into the flat JSON object at ``path``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a figure needs a non-empty name, got {name!r}")
    value = float(value)
    data = load(path)
    data.update(machine_info())
    data[name] = round(value, 4) if abs(value) < 1e6 else round(value)
    text = json.dumps(dict(sorted(data.items())), indent=2) + "\n"
    # write then rename, so an interrupted run never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
