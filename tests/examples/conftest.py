"""Running example systems in tests: real processes on 127.0.0.1, always reaped.

``up("examples.shop")`` starts an example's every service (a :class:`choreo.up.System` with a
data directory under the test's tmp_path) and returns it once the mesh is complete; at the end
of the test every process is stopped, and killed if it will not stop; ``instances={"orders": 2}``
runs other numbers of instances than the example's SYSTEM says. ``drive(system, ...)`` runs the
example's driver and returns its outcome (helpers in ``example_run.py``).

This directory has no ``__init__.py`` on purpose: ``tests/`` is on ``sys.path``, and a package
``tests/examples`` would shadow the repository's ``examples`` package.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from choreo.up import System, load_example

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., System]]:
    systems: list[System] = []

    def start(target: str, instances: Mapping[str, int] | None = None, **kwargs: Any) -> System:
        example = load_example(target)
        if instances:
            unknown = set(instances) - set(example.count())
            assert not unknown, f"{target} runs no {sorted(unknown)}"
            services = [(name, ref, instances.get(name, n)) for name, ref, n in example.services]
            example = dataclasses.replace(example, services=services)
        system = System(example, data_dir=tmp_path / "data", log=lambda line: print(line), **kwargs)
        systems.append(system)
        system.start()
        return system

    try:
        yield start
    finally:
        for system in systems:
            system.stop(timeout=10)
            for inst in system.instances:  # shown by pytest when the test failed
                print(f"--- {inst.name} pid {inst.proc.proc.pid if inst.proc.proc else '?'} "
                      f"exit {inst.returncode}\n{inst.proc.stderr()[-2000:]}")
            system.cleanup_logs()
            left = [i.name for i in system.instances if i.alive()]
            assert not left, f"processes left running: {left}"
