"""What this node incarnation is doing in the mesh: joining, joined, rejoined, leaving, left, refused.

One small object every part reads (the dispatcher asks whether the node has joined before it
takes partitions; gossip says whether it is leaving) and only :meth:`Lifecycle.on` changes,
through :data:`~choreo.states.NODE_TRANSITIONS`, so the README's diagram is the whole story::

    >>> life = Lifecycle()
    >>> life.on("joined")
    'joined'
    >>> life.on("leave"), life.leaving
    ('leaving', True)
"""

from __future__ import annotations

from ..states import NODE_TRANSITIONS, transition

__all__ = ["Lifecycle"]


class Lifecycle:
    """The node's own state (see :data:`~choreo.states.NODE_TRANSITIONS`)."""

    __slots__ = ("state", "since", "fatal")

    def __init__(self) -> None:
        self.state = "joining"
        self.since = 0.0  # when the current state began (the engine's clock)
        self.fatal: Exception | None = None  # why it can do nothing more: the mesh refused it, or it stopped

    def on(self, event: str, now: float | None = None) -> str:
        """Apply ``event``; returns the new state (IllegalTransition if the table has no such move)."""
        self.state = transition(NODE_TRANSITIONS, self.state, event)
        if now is not None:
            self.since = now
        return self.state

    @property
    def joined(self) -> bool:
        """Whether the node knows the mesh well enough to take partitions (and, while leaving, still does)."""
        return self.state in ("joined", "leaving")

    @property
    def joining(self) -> bool:
        """Between start (or a rejoin) and the moment every peer the seeds named has answered."""
        return self.state in ("joining", "rejoined")

    @property
    def leaving(self) -> bool:
        return self.state in ("leaving", "left")
