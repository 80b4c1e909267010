"""Queue-based load leveling: a burst of uploads, each needing a thumbnail."""

from __future__ import annotations

import msgspec

from choreo import Event, Query


class ImageUploaded(Event, key="image_id"):
    image_id: str
    width: int
    height: int


class RenderStats(msgspec.Struct, frozen=True):
    rendered: int
    peak_at_once: int  # the most renders that ever ran at the same time
    first_at: float  # wall-clock time of the first and the last render
    last_at: float


class GetRenderStats(Query, returns=RenderStats):
    pass
