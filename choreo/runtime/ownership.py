"""Which partitions of its service a node handles, and how a partition changes hands.

Every node computes the owner of each partition of its service by rendezvous over the
service's routable instances, so all nodes with the same view agree. When the view changes
(an instance joins, leaves, or dies), each partition of this node moves through
:data:`~choreo.states.PARTITION_TRANSITIONS`:

* a partition it **loses** while alive becomes ``draining``: messages already in a handler or
  waiting behind their key finish here; new arrivals wait here, unacknowledged. When nothing
  of the partition is left in progress, a ``HANDOVER`` stream carrying the partition's dedup
  ids (cached command results, state) goes to the new owner over this node's own acknowledged
  channel, and once the new owner has it the partition is ``handed_over``: what waited is
  *forwarded* there on the same channel (each original is acknowledged only once its forward
  is). Forwarded earlier, they would sit unacknowledged at the new owner until the hand-over,
  and a window of them would keep the hand-over itself from leaving;
* a partition it **gains** from a live previous owner is ``awaiting``: arrivals are buffered,
  in order, until the handover comes (or the previous owner dies, or a timeout passes), so
  the new owner never runs a key's message before the old owner has finished the earlier ones;
* a partition it gains from nobody (first instance) or from a dead owner is ``owned`` at once,
  unless another instance keeps a standby copy of it (``replicas=1``): then it is ``awaiting``
  that copy, which its keeper hands over as a drain would (see :mod:`~choreo.runtime.replicas`).

Who the previous owner *is* comes from what the instances say they hold: every node advertises
the partitions it owns or drains (a bitmap, :meth:`Ownership.holding`) in its hellos and
heartbeats. A node that guessed from views instead would wait for a handover from an
instance that never took the partition (two instances that started a moment apart).

Two copies of one partition can meet: two durable instances restart together, each with the
partition in its store (one had owned it last; the other drained it to nobody long before, as
the service's last instance). Each partition has an **epoch**, raised whenever a node starts
owning it (to at least its wall-clock milliseconds, and above the epoch it inherited), kept in
the store and carried by hand-overs and standby copies; nodes advertise the epochs of the
copies they read back (:meth:`Ownership.restored_epochs`), and the newer copy wins.

Producers do their part (see :mod:`choreo.runtime.holds`): after a move they hold back new messages of
the partition until everything they had sent the old owner is done.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import core
from ..states import PARTITION_TRANSITIONS, transition

__all__ = ["Ownership"]

log = logging.getLogger("choreo.node")

ROUTED_HERE = ("owned",)


class Ownership:
    """The partition states of one node's service (see the module docstring).

    >>> o = Ownership(partitions=4, me=7)
    >>> o.update([7], live=lambda inc: True, now=0.0)     # alone: everything is ours at once
    [0, 1, 2, 3]
    >>> o.state
    ['owned', 'owned', 'owned', 'owned']
    """

    def __init__(
        self, partitions: int, me: int, wall: Callable[[], float] = lambda: 0.0,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.partitions = partitions
        self.gate = bytearray(partitions)  # 1 where arrivals are handled here right now
        # a durable node's partitions whose state it read back from its store, until its first
        # views say what becomes of them: they count as held (a newcomer waits for them)
        self.restored: set[int] = set()
        self.stale: list[int] = []  # restored partitions another instance holds now: forget ours
        # partition -> the epoch of the copy this node has (0: none, or a store that predates
        # epochs); survives a re-incarnation, as the copies do (see the module docstring)
        self.epochs = [0] * partitions
        self.wall = wall
        self.on_epoch = on_epoch  # a durable node's journal keeps the epochs
        self.reset(me)

    def reset(self, me: int) -> None:
        """Own nothing, as a new incarnation ``me`` (the gate object stays: readers keep it)."""
        self.me = me
        partitions = self.partitions
        self.state = ["unowned"] * partitions
        self.gate[:] = bytes(partitions)
        self.awaiting: dict[int, tuple[float, int]] = {}  # partition -> (since, previous owner)
        self.draining: dict[int, int] = {}  # partition -> new owner
        self.buffered: dict[int, deque[tuple[Any, Any, int]]] = {}  # partition -> (channel, envelope, arrival number)
        # partition -> forwards of ours out on a view that may be stale: closed to new arrivals
        # even once ours, until those forwards are done or back (see Moves.forward_done)
        self.paused: dict[int, int] = {}
        self.view: list[int] | None = None
        self.keys: list[bytes] | None = None  # the view's rendezvous keys (None: their incarnations)
        self.owners: list[int | None] = [None] * partitions
        self.standbys: list[int | None] = [None] * partitions  # who would own each partition next
        self.moves = 0
        # handovers that arrived before our own view said we gain the partition (views converge
        # at different moments on different nodes): partition -> when it arrived
        self.early: dict[int, float] = {}

    def _move(self, p: int, event: str) -> None:
        old = self.state[p]
        self.state[p] = new = transition(PARTITION_TRANSITIONS, old, event)
        if log.isEnabledFor(logging.DEBUG):  # every move of every partition: what a fault schedule's trace needs
            owner = self.owners[p]
            log.debug("%016x: partition %d %s -> %s (%s; its owner in this view %s)", self.me, p, old, new, event,
                      f"{owner:016x}" if owner is not None else "none")
        self.regate(p)
        if new == "owned" and old != "draining":  # a new owner: a newer epoch
            self.set_epoch(p, max(int(self.wall() * 1000), self.epochs[p] + 1))

    def set_epoch(self, p: int, epoch: int) -> None:
        """The copy of ``p`` here is of ``epoch`` now (0: there is none)."""
        self.epochs[p] = epoch
        if self.on_epoch is not None:
            self.on_epoch(p, epoch)

    def restored_epochs(self) -> list[tuple[int, int]]:
        """The partitions read back (from a store, or a standby copy whose owner is gone) that
        the views have yet to settle, with the epochs of their copies: what this node advertises
        so that of two copies the newer wins."""
        return sorted((p, self.epochs[p]) for p in self.restored)

    def update(
        self,
        view: list[int],
        live: Callable[[int], bool],
        now: float,
        holder: Callable[[int], int | None] = lambda p: None,
        keys: list[bytes] | None = None,
        keeper: Callable[[int], int | None] = lambda p: None,
        returns: Callable[[int], bool] = lambda incarnation: False,
    ) -> list[int]:
        """A new view of the routable instances (this node's own included when it is routable).

        ``keys`` are their rendezvous keys, in the same order (default: their incarnations; a
        durable instance's key comes from its name, see :func:`~choreo.runtime.membership.durable_key`).

        ``holder(p)`` is the instance that says it holds partition ``p`` (owns or drains it), if
        any, whose copy counts over ours (see :meth:`restored_epochs`; it is asked while ours
        still counts as restored): a partition this node gains from a live holder waits for its handover. Without
        one, the owner under this node's own previous view is taken as the holder; on the first
        view there is none, so instances that start together split the partitions at once.
        ``keeper(p)`` is the live instance whose standby copy of ``p`` counts, if any: a partition
        gained with no live holder waits for that copy (its owner is gone), unless this node has
        the partition's data itself (:attr:`restored`). ``returns(owner)``: that gone owner is
        worth waiting for (a durable instance taken for dead: its store has the partition, and
        its next life owns it again); the partition waits for it, as for a handover.

        Returns the partitions whose buffered arrivals must be looked at again (they became
        owned, or were lost to another owner).
        """
        first = self.view is None
        old_owners = [None] * self.partitions if first else _owners(self.partitions, self.view or [], self.keys)
        self.view = list(view)
        self.keys = list(keys) if keys is not None else None
        new_owners = _owners(self.partitions, view, self.keys)
        self.owners = new_owners
        self.standbys = _standbys(self.partitions, view, new_owners, self.keys)
        changed = []
        restored = self.restored
        for p in range(self.partitions):
            new_owner, state = new_owners[p], self.state[p]
            if restored and p in restored and new_owner != self.me and new_owner is not None:
                # what the store (or a standby copy) gave back goes to the partition's owner now, as
                # a drain would, unless another instance holds the partition (it has it newer)
                held_by = holder(p)  # (while ours counts as read back: see holder)
                restored.discard(p)
                if held_by is None and state in ("unowned", "handed_over"):
                    self._move(p, "assigned")
                    self._move(p, "rebalance")
                    self.draining[p] = new_owner
                    self.moves += 1
                else:
                    self.stale.append(p)
                continue
            if new_owner == self.me:
                here = p in restored
                old_owner = holder(p) if state in ("unowned", "handed_over") else None
                restored.discard(p)
                if state in ("unowned", "handed_over"):
                    if old_owner is None:
                        old_owner = old_owners[p]
                    early = self.early.pop(p, None)
                    if early is not None and now - early < self.early_ttl:
                        self._move(p, "assigned")  # its previous owner already handed it over
                        changed.append(p)
                    elif old_owner is not None and old_owner != self.me and live(old_owner):
                        self._move(p, "gained")
                        self.awaiting[p] = (now, old_owner)
                    elif not here and (copy := keeper(p)) is not None:
                        self._move(p, "gained")  # its owner is gone, its standby copy is not
                        self.awaiting[p] = (now, copy)
                    elif not here and old_owner is not None and old_owner != self.me and returns(old_owner):
                        self._move(p, "gained")  # its owner is gone, its store is not: it comes back
                        self.awaiting[p] = (now, old_owner)
                    else:
                        self._move(p, "assigned")
                        changed.append(p)
                    self.moves += 1
                elif state == "draining":
                    self._move(p, "assigned")
                    del self.draining[p]
            elif state == "owned":
                self._move(p, "rebalance")
                self.draining[p] = new_owner if new_owner is not None else 0
                self.moves += 1
            elif state == "draining":
                self.draining[p] = new_owner if new_owner is not None else 0
            elif state == "awaiting":
                self._move(p, "lost")
                del self.awaiting[p]
                changed.append(p)
        return changed

    early_ttl = 30.0

    def handed_over(self, p: int, now: float) -> bool:
        """The previous owner finished draining ``p``; False if we were not waiting for it (yet)."""
        if self.state[p] != "awaiting":
            if self.state[p] in ("unowned", "handed_over"):
                self.early[p] = now
            return False
        self._move(p, "handed_over")
        del self.awaiting[p]
        return True

    def previous_gone(
        self, incarnation: int, keeper: Callable[[int], int | None] = lambda p: None,
        returns: Callable[[int], bool] = lambda incarnation: False,
    ) -> list[int]:
        """A previous owner died: stop waiting for its handovers (wait for ``keeper(p)``'s standby
        copy instead, where there is one; or, if it ``returns`` (see :meth:`update`), for its next
        life, until the handover timeout). Returns the partitions that are owned now."""
        gone = []
        for p, (since, prev) in list(self.awaiting.items()):
            if prev != incarnation:
                continue
            copy = keeper(p)
            if copy is not None and copy != incarnation:
                self.awaiting[p] = (since, copy)
                continue
            if returns(incarnation):
                continue
            self._move(p, "previous_gone")
            del self.awaiting[p]
            gone.append(p)
        return gone

    def expire(
        self, now: float, timeout: float, still_held: Callable[[int, int], bool] | None = None
    ) -> list[int]:
        """Stop waiting for handovers older than ``timeout`` (liveness over perfect order).

        ``still_held(p, previous)``: keep waiting for a partition whose state is still held by a
        live instance (a service with state never starts a partition without it); it is looked
        at again after another ``timeout``.
        """
        late = [p for p, (since, _) in self.awaiting.items() if now - since >= timeout]
        if still_held is not None:
            kept = [p for p in late if still_held(p, self.awaiting[p][1])]
            for p in kept:
                self.awaiting[p] = (now, self.awaiting[p][1])
            late = [p for p in late if p not in kept]
        for p in late:
            self._move(p, "timeout")
            del self.awaiting[p]
        return late

    def holding(self) -> bytes:
        """The partitions this node owns or drains, as a bitmap (bit ``p % 8`` of byte ``p // 8``)."""
        bits = bytearray((self.partitions + 7) // 8)
        for p, state in enumerate(self.state):
            if state in ("owned", "draining") or p in self.restored:
                bits[p >> 3] |= 1 << (p & 7)
        return bytes(bits)

    def pause(self, p: int) -> None:
        """One more forward of ``p`` is out: closed to new arrivals."""
        self.paused[p] = self.paused.get(p, 0) + 1
        self.gate[p] = False

    def resume(self, p: int) -> None:
        """One forward of ``p`` is done: open again once none is out."""
        left = self.paused.pop(p, 1) - 1
        if left > 0:
            self.paused[p] = left
        else:
            self.regate(p)

    def regate(self, p: int) -> None:
        """Arrivals for ``p`` run at once only while it is ours, no forward of it is out, and
        nothing waits in its queue: what waits runs first (its releaser calls this once it took
        the queue; found open, a new arrival ran ahead of it: nemesis seed 31674, 100 s)."""
        self.gate[p] = self.state[p] in ROUTED_HERE and p not in self.paused and not self.buffered.get(p)

    def drained(self, p: int) -> None:
        self._move(p, "drained")
        del self.draining[p]

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.state:
            out[s] = out.get(s, 0) + 1
        return out


def _standbys(
    partitions: int, view: list[int], owners: list[int | None], keys: list[bytes] | None = None
) -> list[int | None]:
    """The instance that owns each partition if its owner goes (rendezvous without the owner)."""
    if len(view) < 2:
        return [None] * partitions
    if keys is None:
        keys = [inc.to_bytes(8, "little") for inc in view]
    out: list[int | None] = []
    for p, owner in enumerate(owners):
        others = [i for i, inc in enumerate(view) if inc != owner]
        out.append(view[others[core.rendezvous_owner(p, [keys[i] for i in others])]])
    return out


def _owners(partitions: int, view: list[int], keys: list[bytes] | None = None) -> list[int | None]:
    if not view:
        return [None] * partitions
    if keys is None:
        keys = [inc.to_bytes(8, "little") for inc in view]
    return [view[i] for i in core.assign_partitions(partitions, keys)]
