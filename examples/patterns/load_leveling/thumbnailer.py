"""thumbnailer: renders thumbnails with a fixed budget (SLOTS renders at once, RENDER_SECONDS each).

Like a GPU or a licence-limited library: it must never run more than SLOTS jobs at a time, and
it cannot go faster than SLOTS / RENDER_SECONDS images a second however many arrive. What
arrives faster waits in the node, received but not yet handled: that is the queue (the lag in
the stats), and it is what levels the burst.
"""

import asyncio
import time

from choreo import Service

from .messages import GetRenderStats, ImageUploaded, RenderStats

SLOTS = 4
RENDER_SECONDS = 0.01

thumbnailer = Service("thumbnailer")

_slots: asyncio.Semaphore | None = None
_running = 0
_stats = {"rendered": 0, "peak": 0, "first": 0.0, "last": 0.0}


@thumbnailer.on(ImageUploaded)
async def render(event: ImageUploaded) -> None:
    global _slots, _running
    if _slots is None:
        _slots = asyncio.Semaphore(SLOTS)  # created in the node's event loop
    async with _slots:
        _running += 1
        _stats["peak"] = max(_stats["peak"], _running)
        _stats["first"] = _stats["first"] or time.time()
        await asyncio.sleep(RENDER_SECONDS)  # the render itself
        _running -= 1
        _stats["rendered"] += 1
        _stats["last"] = time.time()


@thumbnailer.query(GetRenderStats)
def render_stats(query: GetRenderStats) -> RenderStats:
    return RenderStats(_stats["rendered"], _stats["peak"], _stats["first"], _stats["last"])
