"""Helpers for the example tests: bounded runs, a client node of the test's own, and faults
(kill, add, stop instances) in the middle of a driver's run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from choreo.up import System


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a coroutine to completion, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def drive(system: System, timeout: float = 60.0, **options: Any) -> Any:
    return run(system.drive(**options), timeout)


async def ask_all(system: System, queries: list[Any], service: Any = None) -> list[Any]:
    """Ask queries from a client node of the test's own (not the driver's)."""
    async with system.client(service) as node:
        return [await node.ask(q) for q in queries]


async def drive_with(system: System, moment: asyncio.Event, fault: Callable[[], Awaitable[Any]], **options: Any) -> Any:
    """Run the driver; once ``moment`` is set (by the driver's progress), run ``fault()`` beside it.

    Returns the driver's outcome; raises if the driver ended before the moment came (the fault
    would then have hit nothing mid-run)."""
    driving = asyncio.create_task(system.drive(**options))
    waiting = asyncio.create_task(moment.wait())
    await asyncio.wait([driving, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not moment.is_set():
        waiting.cancel()
        raise AssertionError(f"the driver finished before the fault's moment: {driving.result()!r}")
    try:
        await fault()
    except BaseException:
        driving.cancel()
        raise
    return await driving


def replicas(system: System, service: str) -> dict[str, dict[str, int]]:
    """Each running instance's standby copies (``handler_state.replicas`` of its stats)."""
    return {name: s["handler_state"]["replicas"] for name, s in system.stats(service).items()}


async def standbys_complete(system: System, services: list[str], timeout: float = 20.0) -> None:
    """Wait until every partition of each service (two instances or more) has a complete standby
    copy: from then on a crash of its owner loses no state (README: Handler state)."""
    deadline = time.monotonic() + timeout
    while True:
        copies = {s: await asyncio.to_thread(replicas, system, s) for s in services}
        lacking = {s: {n: r for n, r in per.items() if r["standby_complete"] < r["owned"]} for s, per in copies.items()}
        unowned = [s for s, per in copies.items() if sum(r["owned"] for r in per.values()) == 0]
        if not any(lacking.values()) and not unowned:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"standby copies not complete within {timeout:.0f} s: {lacking}, no owner: {unowned}")
        await asyncio.sleep(0.05)
