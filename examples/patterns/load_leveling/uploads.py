"""The upload front end: a burst of uploads arrives at once (a marketing mail went out)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from choreo import Service

from .messages import GetRenderStats, ImageUploaded, RenderStats
from .thumbnailer import RENDER_SECONDS, SLOTS

uploads = Service("uploads", emits=[ImageUploaded], sends=[GetRenderStats], doc="the upload front end")


@dataclass
class Outcome:
    images: int
    burst_seconds: float  # how long the uploads took to hand over
    stats: RenderStats
    peak_lag: int  # the most images ever waiting in the thumbnailer

    @property
    def render_seconds(self) -> float:
        return self.stats.last_at - self.stats.first_at

    @property
    def exit_status(self) -> int:
        return 0 if self.stats.rendered == self.images and self.stats.peak_at_once <= SLOTS else 1


async def drive(client, system, images: int = 600) -> Outcome:
    started = time.monotonic()
    for n in range(images):
        await client.emit(ImageUploaded(f"img{n:05d}", 1200 + n % 7 * 100, 800))
    burst = time.monotonic() - started
    peak = 0
    deadline = time.monotonic() + 60
    while (stats := await client.ask(GetRenderStats())).rendered < images and time.monotonic() < deadline:
        lag = sum(sum(s["lag"].values()) for s in (await asyncio.to_thread(system.stats, "thumbnailer")).values())
        peak = max(peak, lag)
        await asyncio.sleep(0.05)
    final_lag = sum(sum(s["lag"].values()) for s in system.stats("thumbnailer").values())
    out = Outcome(images, burst, stats, peak)
    capacity = SLOTS / RENDER_SECONDS
    print(f"{images} uploads handed over in {burst * 1000:.0f} ms: the uploader never waited for a render")
    print(f"the thumbnailer rendered them at its own pace: {out.render_seconds:.2f} s at "
          f"{stats.rendered / out.render_seconds:.0f}/s (its capacity: {capacity:.0f}/s), "
          f"never more than {stats.peak_at_once} at once ({SLOTS} slots)")
    print(f"the queue in between peaked at {peak} images waiting; {final_lag} wait now")
    return out
