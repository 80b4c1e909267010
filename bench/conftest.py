"""Benchmarks share: the compiled core must really be the compiled one, and GC stays out of timings."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest

from choreo import _core


@pytest.fixture(scope="session", autouse=True)
def compiled_core_is_built() -> None:
    if _core.IMPLEMENTATION != "compiled":  # pragma: no cover
        pytest.exit("choreo._core is not the compiled core: run 'make bench' (it builds it)", returncode=2)


def best_of(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds taken by each of ``repeat`` calls of ``fn`` (GC off while timing)."""
    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e9)
    finally:
        if enabled:
            gc.enable()
    return times
