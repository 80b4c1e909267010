"""Joining the mesh: the seeds asked, the answers waited for, and when this node has joined.

How this works. A node starts knowing only its seeds. It says HELLO to each, asking for the whole
table (``sync``); a seed answers with its own hello and a full SYNC (so does any node that greets
it before it has one: its seeds may all be dead, see :attr:`Joining.wants_table`). The newcomer
then greets the instances of its own service (their hellos say which partitions they hold: a
newcomer waits for a handover only from an instance that holds the partition). It has *joined* once it has a full
table, every endpoint it expects an answer from has answered or stayed silent for
``join_wait``, and every live instance of its service has said which partitions it holds (one
that stays silent is asked again every ``join_wait`` until it answers or the mesh finds it
gone); until then it routes nothing. A seed that does not answer is reported by name
within ``SEED_REPORT_AFTER`` seconds, and asked again every period.

:class:`Joining` keeps that state for :class:`~choreo.runtime.gossip.Gossip`, which feeds it the
frames; the node's own lifecycle changes only through :class:`~choreo.runtime.lifecycle.Lifecycle`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ..config import NodeConfig
from .contacts import Contacts
from .lifecycle import Lifecycle
from .membership import Membership, Peer

__all__ = ["Joining", "SEED_REPORT_AFTER"]

log = logging.getLogger("choreo.node")
SEED_REPORT_AFTER = 2.0  # seconds without an answer before a seed is reported as unreachable
SEED_REPORT_EVERY = 30.0  # and again this often while it stays silent


class JoinHost(Protocol):
    def on_joined(self) -> None: ...


class Joining:
    """The seeds and the answers one node waits for before it has joined (see the module docstring)."""

    def __init__(
        self,
        contacts: Contacts,
        membership: Membership,
        lifecycle: Lifecycle,
        host: JoinHost,
        *,
        config: NodeConfig,
        clock: Callable[[], float],
    ) -> None:
        self.contacts = contacts
        self.membership = membership
        self.life = lifecycle
        self.host = host
        self.clock = clock
        self.seeds: list[str] = []  # seeds that have not answered yet
        self.initial_seeds: list[str] = []  # what we go back to when we find ourselves alone
        self.join_wait = max(2 * config.heartbeat, 1.0)  # how long a silent endpoint holds up joining
        self.seed_asked: dict[str, float] = {}  # seed -> when we first said hello to it
        self.seed_reported: dict[str, float] = {}
        self.expected: dict[str, float] = {}  # while joining: endpoint -> when we asked it (no answer yet)
        self.synced = False  # while joining: we have a whole table
        self.refusals: list[str] = []  # conflicts reported by nodes whose word does not stop this one
        self.refused_by = ""  # the endpoint that last told us we were declared dead
        self.untold_reported: set[int] = set()  # instances logged as holding up our join

    def begin(self, seeds: list[str], now: float) -> None:
        """Start (again) with ``seeds`` to ask; without any, this node is the mesh and has joined."""
        self.seeds = seeds
        self.synced = False
        self.seed_asked = {s: now for s in seeds}
        self.expected = dict(self.seed_asked)
        if not seeds:
            self.synced = True
            self.joined(now)  # the first node: the mesh is what it knows

    @property
    def wants_table(self) -> bool:
        """Joining without a whole table yet: any node that greets us is asked for one, as good a
        seed as ours, which may all be dead (every member died, and this node took itself for cut
        off: it rejoined through the dead; chaos seeds 750 and 752)."""
        return self.life.joining and not self.synced

    def ask(self, endpoints: Iterable[str]) -> None:
        for endpoint in endpoints:
            self.contacts.say_hello(endpoint, reply=True, sync=True)

    def joined(self, now: float) -> None:
        if self.life.joining:
            self.expected.clear()
            self.life.on("joined", now)
            self.membership.touch()  # plans made before joining routed nothing: callers plan again
            self.host.on_joined()

    def check(self, now: float) -> None:
        """Join once we have a whole table, every endpoint we wait for answered or stayed silent for
        ``join_wait``, and every live instance of our service said which partitions it holds."""
        if not self.life.joining or not self.synced:
            return
        wait = self.join_wait
        if any(now - asked < wait for asked in self.expected.values()):
            return
        untold = self.untold()
        if not untold:
            self.joined(now)
            return
        # Joined without its word, we would take at once the partitions it holds and we gain: they
        # would start here without their state, and its hand-over, when it came, would not replace
        # what we wrote since (durable seed 25239: a newcomer's hello lost in a cut that healed a
        # moment later). So we ask again, and wait until it answers or the mesh finds it gone.
        for peer in untold:
            self.expected[peer.endpoint] = now
            self.contacts.say_hello(peer.endpoint, reply=True)
            if peer.incarnation not in self.untold_reported:
                self.untold_reported.add(peer.incarnation)
                log.warning("%s: %s has not said which partitions it holds: joining waits for it (asking again "
                            "every %.1f s until it answers or the mesh finds it gone)", self.contacts.name, peer.node, wait)

    def untold(self) -> list[Peer]:
        """The live instances of our service that have not said which partitions they hold (one
        known only from a client's introduction holds none: no work goes to it)."""
        return [peer for peer in self.contacts.own_service() if not peer.told and peer.vouched]

    def due(self) -> float:
        """When :meth:`check` may join at the latest (inf: not waiting for anyone)."""
        if self.life.joining and self.synced and self.expected:
            return min(self.expected.values()) + self.join_wait
        return float("inf")

    def status(self) -> str:
        """Why this node has not joined yet, naming the seeds that do not answer."""
        if not self.life.joining:
            return ""
        now = self.clock()
        silent = [f"{s} ({now - self.seed_asked.get(s, now):.1f} s)" for s in self.seeds]
        if self.refusals and not self.synced:
            return "refused: " + self.refusals[-1]
        if silent and not self.synced:
            return "no answer from its seeds " + ", ".join(silent) + " (it keeps asking; is a node running there?)"
        untold = ", ".join(peer.node for peer in self.untold())
        return "waiting for the instances of its service to say which partitions they hold" + (
            f" (not yet: {untold})" if untold else "")

    def ask_seeds(self, now: float) -> None:
        """Each period: a seed that has not answered yet (its hello or ours was lost, or it starts later): again."""
        contacts = self.contacts
        live = {p.endpoint for p in self.membership.live_peers()}
        if self.synced:
            self.seeds = [s for s in self.seeds if s not in live]
        for seed in self.seeds:
            if self.life.joining or now - contacts.hello_sent.get(seed, -1e9) >= contacts.knock_every:
                contacts.say_hello(seed, reply=True, sync=not self.synced)
        if self.life.joining:
            self._report_silent_seeds(now)

    def _report_silent_seeds(self, now: float) -> None:
        for seed in self.seeds:
            asked = self.seed_asked.setdefault(seed, now)
            if now - asked < SEED_REPORT_AFTER or now - self.seed_reported.get(seed, -1e9) < SEED_REPORT_EVERY:
                continue
            self.seed_reported[seed] = now
            me = self.contacts.me
            log.warning("%s: seed %s does not answer (%.1f s without a hello back): is a node running there, and "
                        "can it reach this node at %s? Still asking.", self.contacts.name, seed, now - asked,
                        me.endpoint if me else "?")

    def full_table(self, peer: Peer, now: float) -> None:
        """``peer`` sent us its whole table while we join: wait for our service's instances next."""
        self.expected.pop(peer.endpoint, None)
        self.seeds = [s for s in self.seeds if s != peer.endpoint]
        for other in self.contacts.own_service():  # which partitions they hold: we may wait for their handovers
            self.expected.setdefault(other.endpoint, now)
            self.contacts.greet_later(other.endpoint)
        self.check(now)

    def answered(self, endpoint: str, now: float) -> None:
        """A hello from ``endpoint``: one answer fewer to wait for."""
        if self.life.joining:
            self.expected.pop(endpoint, None)
            self.check(now)
