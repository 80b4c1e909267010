"""processor: turns clicks into analytics, at a fixed capacity per instance (CAPACITY clicks/s).

Its capacity is a budget of time slots, like a database that takes so many writes a second:
every click waits for the next free slot. Clicks of different sessions are handled side by side
(the handler is async), clicks of one session one after the other; the slots cap the total.
Whatever arrives faster waits in the node: that is the consumer lag, which the stats report per
partition, and which is bounded by the producer's credit window.
"""

import asyncio
import os

from choreo import Service

from .messages import Click

CAPACITY = float(os.environ.get("SURGE_CAPACITY", "400"))  # clicks per second per instance

processor = Service("processor", partitions=256)  # many partitions: an even split over instances

_next_slot = 0.0


@processor.on(Click)
async def count_click(click: Click) -> None:
    global _next_slot
    now = asyncio.get_running_loop().time()
    _next_slot = max(_next_slot, now) + 1.0 / CAPACITY
    await asyncio.sleep(_next_slot - now)
