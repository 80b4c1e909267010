"""Helpers for the example tests: bounded runs, and a client node of the test's own."""

from __future__ import annotations

import asyncio
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
