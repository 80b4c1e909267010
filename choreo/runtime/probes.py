"""SWIM's failure detector for one node: whom to probe, and when an unanswered probe means suspicion.

How this works (Das, Gupta, Motivala: SWIM, 2002; as Serf/memberlist and Consul run it). Once per
protocol period (``NodeConfig.heartbeat``) a node probes *one* member, taking them in a shuffled
round-robin order, so that every member is probed at least once per round whatever the mesh's
size, and the cost per node stays one ping and one pong per period. The probe is a PING; no PONG
within half of ``suspect_after`` sends PING_REQs to ``indirect_probes`` other members, who ping
the target for us and pass its pong on (a lossy link between two nodes is not a dead node),
and the PING goes again; still nothing at ``suspect_after``: the target becomes *suspect*. A suspicion runs for
``dead_after``; only the member itself can end it early, by refuting it with a newer version of
its record (it hears the suspicion by gossip); otherwise it is declared dead.

Two looks beyond SWIM's, for a mesh of TCP connections. A node that has heard from none of its
two or more members for a whole ``suspect_after`` is the likelier one cut off (Lifeguard's
local health, as memberlist has it): its suspicions that run out then wait, until some member
speaks or its vigil rejoins (:mod:`~choreo.runtime.vigil`); and a probe that gets no answer of
its target's own means our connection to it may be stuck: gossip dials it afresh
(:meth:`~choreo.runtime.contacts.Contacts.redial`).

This class holds the timers and the order and answers questions; :class:`~choreo.runtime.gossip.Gossip`
sends the frames and changes membership (sans-IO, time passed in)::

    >>> import random
    >>> probes = Probes(suspect_after=1.0, dead_after=5.0, rng=random.Random(1))
    >>> seq = probes.start(7, now=0.0)
    >>> probes.overdue(0.6)      # no pong after suspect_after / 2: ask others to ping 7
    ([7], [])
    >>> probes.overdue(1.0)      # none after suspect_after: 7 is suspect
    ([], [7])
"""

from __future__ import annotations

import random
from collections.abc import Iterable

__all__ = ["Probes"]


class _Probe:
    __slots__ = ("target", "indirect_at", "until", "indirect")

    def __init__(self, target: int, indirect_at: float, until: float) -> None:
        self.target = target
        self.indirect_at = indirect_at
        self.until = until
        self.indirect = False


class Probes:
    """Probe order, probes in flight, relayed probes and suspicions of one node (see the module docstring)."""

    def __init__(self, *, suspect_after: float, dead_after: float, rng: random.Random) -> None:
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.rng = rng
        self._order: list[int] = []  # this round's targets, in probe order
        self._at = 0
        self._seq = rng.randrange(1 << 31)
        self._probes: dict[int, _Probe] = {}  # seq -> probe of ours in flight
        self._probing: dict[int, int] = {}  # target -> seq
        self._relays: dict[int, tuple[int, int, float]] = {}  # our seq -> (requester, its seq, until)
        self.suspicions: dict[int, float] = {}  # incarnation -> when it is declared dead

    # -- whom ----------------------------------------------------------------------------------

    def next_target(self, members: Iterable[int], alive: set[int] | dict[int, object]) -> int | None:
        """The next member to probe (None: nobody else is live). ``members`` are the live members
        other than this node (read when a round starts); ``alive`` tells who still is."""
        for _ in range(2):
            while self._at < len(self._order):
                target = self._order[self._at]
                self._at += 1
                if target in alive and target not in self._probing:
                    return target
            self._order = list(members)
            self.rng.shuffle(self._order)
            self._at = 0
        return None

    def added(self, incarnation: int) -> None:
        """A new member: it takes a random place among those still to probe this round."""
        self._order.insert(self.rng.randint(self._at, len(self._order)), incarnation)

    # -- probes --------------------------------------------------------------------------------

    def start(self, target: int, now: float) -> int:
        """A probe of ``target`` leaves now; returns its sequence number (the PING's and PONG's)."""
        seq = self._next_seq()
        self._probes[seq] = _Probe(target, now + self.suspect_after / 2, now + self.suspect_after)
        self._probing[target] = seq
        return seq

    def answered(self, seq: int) -> int | None:
        """A pong for ``seq`` came (from its target or through another node): the target, or None."""
        probe = self._probes.pop(seq, None)
        if probe is None:
            return None
        self._probing.pop(probe.target, None)
        return probe.target

    def overdue(self, now: float) -> tuple[list[int], list[int]]:
        """(targets to probe indirectly now, targets whose probes failed: suspect them)."""
        indirect: list[int] = []
        failed: list[int] = []
        for seq, probe in list(self._probes.items()):
            if now >= probe.until:
                del self._probes[seq]
                self._probing.pop(probe.target, None)
                failed.append(probe.target)
            elif not probe.indirect and now >= probe.indirect_at:
                probe.indirect = True
                indirect.append(probe.target)
        return indirect, failed

    def seq_of(self, target: int) -> int | None:
        """The sequence number of our probe of ``target`` in flight, if any."""
        return self._probing.get(target)

    def forget(self, incarnation: int) -> None:
        """``incarnation`` is gone: no probe of it, no suspicion."""
        seq = self._probing.pop(incarnation, None)
        if seq is not None:
            self._probes.pop(seq, None)
        self.suspicions.pop(incarnation, None)

    # -- relaying another node's probe (its PING_REQ) -------------------------------------------

    def relay(self, requester: int, seq: int, now: float) -> int:
        """We ping a target for ``requester`` (its probe ``seq``); returns our ping's sequence number."""
        ours = self._next_seq()
        self._relays[ours] = (requester, seq, now + self.suspect_after)
        return ours

    def relayed(self, seq: int) -> tuple[int, int] | None:
        """A pong for a ping we sent for someone: (the requester, its sequence number), or None."""
        relay = self._relays.pop(seq, None)
        return relay[:2] if relay is not None else None

    # -- suspicions ----------------------------------------------------------------------------

    def suspect(self, incarnation: int, now: float) -> None:
        """Start timing a suspicion of ``incarnation`` (an earlier one keeps its deadline)."""
        self.suspicions.setdefault(incarnation, now + self.dead_after)

    def cleared(self, incarnation: int) -> None:
        """The suspicion of ``incarnation`` was refuted (or it is gone)."""
        self.suspicions.pop(incarnation, None)

    def expired(self, now: float, heard_at: float | None = None) -> list[int]:
        """Suspicions that ran out: these members are dead.

        ``heard_at``: when this node last heard from any of its members, if it has two or more.
        Heard from none of them for ``suspect_after``, it is the likelier one cut off: taking
        them for dead, it would take over their partitions and run what it holds while the rest
        of the mesh runs it too. Then none is dead yet: their suspicions run on until the node's
        vigil would have rejoined it (``heard_at + suspect_after + dead_after``); by then it has
        rejoined, or a member has spoken and they end as usual. (A suspicion that began just
        before the cut used to run out 0.1 s before the vigil rejoined the node: the chaos test on
        hosts, an event run again after a newer one of its key ran on the other side.)

        >>> probes = Probes(suspect_after=1.0, dead_after=5.0, rng=random.Random(1))
        >>> probes.suspect(7, now=0.0)
        >>> probes.expired(5.0, heard_at=3.0)  # nobody for 2 s: this node is the likelier cut off
        []
        >>> probes.expired(9.0, heard_at=8.5)  # (held until 3 + 1 + 5) a member spoke since: 7 is dead
        [7]
        """
        out = [inc for inc, until in self.suspicions.items() if now >= until]
        if heard_at is not None and now - heard_at >= self.suspect_after:
            for inc in out:
                self.suspicions[inc] = heard_at + self.suspect_after + self.dead_after
            return []
        for inc in out:
            del self.suspicions[inc]
        return out

    # -- time ----------------------------------------------------------------------------------

    def due(self) -> float:
        """The earliest deadline of a probe in flight, relayed ping or suspicion (inf: none)."""
        due = float("inf")
        for probe in self._probes.values():
            due = min(due, probe.until if probe.indirect else probe.indirect_at)
        for until in self.suspicions.values():
            due = min(due, until)
        return due

    def forgive(self, gap: float, now: float) -> None:
        """This node was frozen for ``gap`` seconds: its own silence must not count against anyone."""
        for probe in self._probes.values():
            probe.indirect_at += gap
            probe.until += gap
        for inc in self.suspicions:
            self.suspicions[inc] += gap
        self._relays = {s: (r, q, until + gap) for s, (r, q, until) in self._relays.items()}

    def sweep(self, now: float) -> None:
        """Forget relayed pings whose requester gave up on them."""
        if self._relays:
            self._relays = {s: relay for s, relay in self._relays.items() if relay[2] > now}

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq
