"""A producer process for multi-host tests: emit keyed events, report what it saw as JSON.

    python -m tests.integration.producer_proc SEED_ENDPOINT BIND COUNT KEYS [SERVICE PREFIX RATE]

Runs a client node bound at BIND, waits for the SERVICE service (``elastic``), emits COUNT events
(keys {PREFIX}0..{PREFIX}{KEYS-1}, ``k``; at most RATE a second, 0: as fast as it can), waits
until all are acknowledged, then prints one JSON line: the peak of its in-flight envelopes, how
often emit had to wait for credit, and its endpoint (printed first, so the test can ask the node
for its stats while it runs).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from choreo.node import Node

from .recording import Produced
from .test_membership import FAST


async def main(seed: str, bind: str, count: int, keys: int, service: str = "elastic", prefix: str = "k",
               rate: float = 0.0) -> None:
    async with Node(None, bind=bind, peers=[seed], config=FAST, insecure=True) as client:
        print(json.dumps({"endpoint": client.endpoint}), flush=True)
        await client.wait_for({service: 1}, timeout=30)
        peak = 0
        start = time.monotonic()
        for n in range(count):
            await client.emit(Produced(k=f"{prefix}{n % keys}", n=n), timeout=300)
            if n % 64 == 0:
                peak = max(peak, client.stats().in_flight)
                if rate and (ahead := start + n / rate - time.monotonic()) > 0:
                    await asyncio.sleep(ahead)
        await client.flush(timeout=300)
        stats = client.stats()
        print(json.dumps({"peak_in_flight": peak, "backpressure_waits": stats.backpressure_waits,
                          "reincarnations": stats.reincarnations}), flush=True)


if __name__ == "__main__":
    seed, bind, count, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    more = sys.argv[5:8]
    asyncio.run(main(seed, bind, count, keys, *more[:2], *(float(r) for r in more[2:])))
