"""Fixtures for multi-process tests: a record directory, and processes that are always reaped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from choreo.launch import NodeProcess, stop_all


class Procs:
    """Starts NodeProcess children and guarantees they are killed when the test ends."""

    def __init__(self, record_dir: Path) -> None:
        self.record_dir = record_dir
        self.started: list[NodeProcess] = []

    def start(self, service, peers=(), **kwargs) -> NodeProcess:
        env = {"CHOREO_RECORD_DIR": str(self.record_dir), **kwargs.pop("env", {})}
        proc = NodeProcess(service, peers=peers, env=env, **kwargs)
        self.started.append(proc)
        return proc

    def stderr(self, tail: int | None = 3000) -> str:
        """Every process's log, each cut to its last ``tail`` characters (None: whole)."""
        def log(p: NodeProcess) -> str:
            text = p.stderr()
            return text if tail is None else text[-tail:]

        return "\n".join(f"--- {p.service if isinstance(p.service, str) else getattr(p.service, 'name', p.service)} "
                         f"pid {p.proc.pid if p.proc else '?'} (whole log: {p.stderr_path})\n{log(p)}"
                         for p in self.started)

    def close(self) -> None:
        """Stop every process at once, as ``choreo up`` stops a system (``stop_all``), within 10 s.
        (Stopped so, the last two instances of the chaos test on hosts used to take each other
        for dead as they drained and run an old event again: one direction between them had
        carried nothing since a heal, hidden while the producer answered their probes for each
        other; a probe without an answer of its own now dials the member afresh, see
        ``Contacts.redial``.)"""
        stop_all(self.started, timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    p = Procs(record_dir)
    try:
        yield p
    finally:
        p.close()
