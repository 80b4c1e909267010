"""Membership news waiting to be piggybacked: SWIM's dissemination queue.

How this works. Every change a node learns (a member joined, is suspect, refuted, left, died; a
service was declared or retired) becomes a *rumor* here, under a key (one per member, one per
service), so that newer news of the same thing replaces the older. Every membership frame the
node sends (pings, pongs, indirect pings, news) carries the rumors sent the fewest times so far,
up to a byte budget, and a rumor is dropped once it went out ``mult * ceil(log10(n + 1))`` times
for a mesh of n members: enough for an epidemic to reach every node with high probability
(Demers et al.; memberlist's "retransmit multiplier"), and the cost per node of one change grows
with log n, not n. The queue is bounded: beyond ``limit`` rumors the most-sent ones go first.

>>> r = Rumors(mult=2)
>>> r.add(("m", 7), "seven is alive", 20)
>>> r.take(1000, members=10)
['seven is alive']
>>> r.take(1000, members=10), r.take(1000, members=10), r.take(1000, members=10)
(['seven is alive'], ['seven is alive'], ['seven is alive'])
>>> r.take(1000, members=10), len(r)
([], 0)
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

__all__ = ["Rumors"]


class _Rumor:
    __slots__ = ("key", "body", "size", "sent")

    def __init__(self, key: Hashable, body: Any, size: int) -> None:
        self.key = key
        self.body = body
        self.size = size
        self.sent = 0


class Rumors:
    """The dissemination queue of one node (see the module docstring)."""

    def __init__(self, mult: int = 4, limit: int = 4096) -> None:
        if mult < 1 or limit < 1:
            raise ValueError(f"mult and limit must be >= 1, got {mult}, {limit}")
        self.mult = mult
        self.limit = limit
        self._by_key: dict[Hashable, _Rumor] = {}
        self._by_sent: list[dict[Hashable, _Rumor]] = [{}]  # rumors by how often they went out

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, key: Hashable, body: Any, size: int) -> None:
        """Queue ``body`` (``size`` bytes on the wire), replacing older news under ``key``."""
        old = self._by_key.pop(key, None)
        if old is not None:
            del self._by_sent[old.sent][key]
        rumor = _Rumor(key, body, size)
        self._by_key[key] = rumor
        self._by_sent[0][key] = rumor
        while len(self._by_key) > self.limit:
            for bucket in reversed(self._by_sent):
                if bucket:
                    drop = next(iter(bucket))
                    del bucket[drop]
                    del self._by_key[drop]
                    break

    def drop(self, key: Hashable) -> None:
        """Forget the news under ``key`` (it no longer holds)."""
        old = self._by_key.pop(key, None)
        if old is not None:
            del self._by_sent[old.sent][key]

    def transmissions(self, members: int) -> int:
        """How many times each rumor goes out in a mesh of ``members`` nodes."""
        return self.mult * max(1, math.ceil(math.log10(members + 1)))

    def take(self, budget: int, members: int) -> list[Any]:
        """Rumors for one frame: the least sent first (newest first among equals), up to ``budget``
        bytes (one rumor always goes, however large); each counts as sent once more."""
        if not self._by_key:
            return []
        most = self.transmissions(members)
        chosen: list[_Rumor] = []
        used = 0
        for bucket in self._by_sent:
            for rumor in reversed(bucket.values()):
                if chosen and used + rumor.size > budget:
                    break
                chosen.append(rumor)
                used += rumor.size
            else:
                continue
            break
        by_sent = self._by_sent
        for rumor in chosen:
            del by_sent[rumor.sent][rumor.key]
            rumor.sent += 1
            if rumor.sent >= most:
                del self._by_key[rumor.key]
                continue
            if rumor.sent == len(by_sent):
                by_sent.append({})
            by_sent[rumor.sent][rumor.key] = rumor
        while len(by_sent) > 1 and not by_sent[-1]:
            by_sent.pop()
        return [rumor.body for rumor in chosen]
