"""An idle service for the mesh benchmarks (bench/test_mesh.py): it handles one event type and never
gets any, so a node running it costs only what membership and the node's own upkeep cost."""

from __future__ import annotations

from choreo import Event, Service

__all__ = ["Nothing", "idle"]


class Nothing(Event):
    """Never sent."""

    n: int


idle = Service("idle")


@idle.on(Nothing)
def on_nothing(event: Nothing) -> None:  # pragma: no cover - nothing ever comes
    pass
