"""Is this node's incarnation still alive in the mesh's eyes? The look it takes before it acts.

The mesh takes a member for dead after ``suspect_after + dead_after`` without a sign of life
from it (see :mod:`~choreo.runtime.gossip`), and resends what that member had not acknowledged
to the partitions' next owners. The member itself may not know: it was frozen (a SIGSTOP, a
suspended VM, a handler that blocked the loop) or cut off from everyone. Whatever it still held
then, its senders are giving to someone else; run here as well, it would run twice, after the new
owner had gone on with its keys. So before the node acts (reads a frame, starts a handler, ticks)
it looks:

* **frozen**: no look at its clock for that long (a tick is never that late otherwise);
* **cut off**: no sign of life from any of two or more members for that long. Each side of a cut
  then takes the other for dead; the side that hears from nobody is the likelier to be cut off,
  and taking the others for dead it would take over their partitions and run what it holds while
  they run it too. (Alone with one other member, the two cases look the same from both ends: each
  goes on, as before.)

Either way the node rejoins as a new incarnation first (the engine's ``declared_dead``): every
channel it received on is closed, so it runs none of what it held. A shorter gap is only
forgiven: its peers' silence meanwhile was its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import NodeConfig
from .gossip import Gossip
from .membership import Membership

__all__ = ["Vigil"]


class Vigil:
    """The node's look at its own life (see the module docstring)."""

    def __init__(
        self, config: NodeConfig, membership: Membership, gossip: Gossip, *,
        rejoin: Callable[[str], None], incarnation: Callable[[], int],
    ) -> None:
        """``rejoin(reason)`` makes the node a new incarnation; ``incarnation()`` is its current one."""
        self.membership = membership
        self.gossip = gossip
        self.rejoin = rejoin
        self.incarnation = incarnation
        self.last: float | None = None  # when the node last looked (a tick, a frame, a turn of handlers)
        self.idle_until = 0.0  # the node sleeps on purpose until then (no tick is late before it)
        self.suspect_after = config.suspect_after
        self.limit = config.suspect_after + config.dead_after - config.heartbeat  # long enough to be taken for dead
        self.unremarkable = min(config.suspect_after / 2, self.limit)  # a shorter gap needs no look

    def check(self, now: float) -> None:
        """Look at the gap since the node last looked, and at the members' silence (every tick)."""
        last = self.last
        self.last = now
        if last is None:
            return
        gap = now - last
        if gap >= self.limit:
            self.rejoin(f"this node was frozen for {gap:.1f} s, long enough for the mesh to declare it dead")
            return
        if now - max(last, self.idle_until) > self.suspect_after / 2:
            self.gossip.forgive(gap, now)
        membership = self.membership
        heard = membership.heard_at
        if heard is not None and now - heard >= self.limit and membership.live_count > 2:
            self.rejoin(f"heard from none of its {membership.live_count - 1} members for {now - heard:.1f} s, "
                        "long enough for them to declare it dead")

    def awake(self, now: float) -> bool:
        """The node acts at ``now``: False when it had to rejoin first (what it held is void)."""
        last = self.last
        if last is not None and now - last < self.unremarkable:
            self.last = now  # (the common case, cheap: a read asks for every frame)
            return True
        incarnation = self.incarnation()
        self.check(now)
        return self.incarnation() == incarnation

    @property
    def until(self) -> float:
        """No handler starts from this reading of the clock on before :meth:`awake` looked (a
        process stopped in a batch must not run the rest of it as if nothing had happened)."""
        last = self.last
        return math.inf if last is None else last + self.unremarkable
