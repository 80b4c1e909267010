"""A mesh of membership alone: many gossip parts on a lossy fake link, under a virtual clock.

Each simulated node is the real :class:`~choreo.runtime.gossip.Gossip` with its
:class:`~choreo.runtime.membership.Membership` and :class:`~choreo.runtime.outbox.Outbox`, and
nothing else (no engine, no handlers, no sockets); frames cross an in-memory link that delays
and drops them from one seed, and a node is woken only when a frame reaches it or its next
deadline comes (:attr:`Gossip.next_due`), so a thousand nodes run in seconds::

    sim = MeshSim(seed=7, loss=0.01)
    sim.bootstrap(1000)                      # a converged mesh of 1,000 nodes
    newcomer = sim.join()
    periods = sim.until(lambda: sim.everyone_sees(newcomer, "alive"), 60)
    sim.crash(newcomer)
    periods = sim.until(lambda: sim.everyone_sees(newcomer, "dead"), 60)
    print(sim.traffic(periods))               # frames and bytes per node per period

What it counts: every frame and byte each node sends (by frame type), every suspicion a probe
raised (:attr:`MeshSim.suspicions`: a *false* one is of a node that was up) and every death
declared (:attr:`MeshSim.deaths`). ``tests/sim/test_mesh_scale.py`` and the ``scale.sim.*``
figures of ``make bench`` read them.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import wire
from .config import NodeConfig
from .errors import ProtocolError
from .runtime.gossip import Gossip
from .runtime.holds import Holds
from .runtime.lifecycle import Lifecycle
from .runtime.membership import Membership, Peer
from .runtime.outbox import Outbox
from .runtime.stats import Counters
from .spec import ServiceSpec

__all__ = ["MeshSim", "SimNode", "Traffic"]


@dataclass(frozen=True)
class Traffic:
    """What membership cost, per node and per protocol period, over a stretch of a run."""

    nodes: int
    periods: float
    frames: float  # frames sent per node per period
    bytes: float  # bytes sent per node per period (headers included)
    by_type: dict[str, float]  # frames per node per period, by frame type


class SimNode:
    """One node of the simulation: gossip, membership and outbox over the fake link (its own transport)."""

    def __init__(self, sim: MeshSim, name: str, service: ServiceSpec | None) -> None:
        self.sim = sim
        self.name = name
        self.endpoint = f"inproc://sim/{name}"
        self.service = service
        self.up = True
        self.frames_out: Counter[int] = Counter()
        self.bytes_by_type: Counter[int] = Counter()
        self.bytes_out = 0
        self.refused: Counter[str] = Counter()
        self.gone: list[Peer] = []
        self.joined_at: float | None = None
        self.rejoins = 0
        self.holding = self.copies = b""
        self.restored: list[tuple[int, int]] = []
        self.wake_at = float("inf")
        self.membership = Membership()
        self.life = Lifecycle()
        self.outbox = Outbox(self, sim.config, clock=sim.clock, holds=Holds(), counters=Counters())
        self.gossip = Gossip(self.membership, self.outbox, self.life, self, config=sim.config, clock=sim.clock)
        self.handlers = self.gossip.handlers()
        self.handlers[wire.HELLO] = lambda sender, data, trusted: self.gossip.on_hello(
            sender, wire.decode_control(wire.HELLO, data), trusted=trusted
        )
        self.handlers[wire.REFUSE] = lambda sender, data, trusted: self.gossip.on_refuse(
            sender, wire.decode_control(wire.REFUSE, data)
        )
        self.incarnation = 0

    def _me(self) -> Peer:
        c = self.sim.config
        return Peer(self.incarnation, self.endpoint, self.name, self.service, c.window, c.max_message_bytes,
                    self.sim.now)

    def start(self, seeds: list[str]) -> None:
        self.incarnation = self.sim.rng.getrandbits(63) | 1
        self.outbox.start(None, self.incarnation)
        self.gossip.start(self._me(), seeds)

    # -- the transport (what the outbox sends through) -------------------------------------------

    def send(self, endpoint: str, frame: bytes) -> None:
        if self.up:
            self.frames_out[frame[5]] += 1
            self.bytes_by_type[frame[5]] += len(frame)
            self.bytes_out += len(frame)
            self.sim.transmit(self, endpoint, frame)

    def redial(self, endpoint: str) -> None:
        pass  # (no connections in the simulation)

    def receive(self, frame: bytes) -> None:
        """What the engine does with a membership frame, and nothing else."""
        g = self.gossip
        try:
            frame_type, _, sender, receiver = wire.parse_header(frame)
            if receiver and receiver != g.incarnation:
                g.refuse_stale(sender, receiver)
                return
            known = self.membership.peers.get(sender)
            if known is not None and known.state == "dead" and frame_type != wire.REFUSE:
                g.tell_dead(known)
                return
            handle = self.handlers.get(frame_type)
            if handle is None:
                raise ProtocolError("malformed", f"unexpected {wire.FRAME_NAMES[frame_type]} frame")
            handle(sender, frame, True)  # (no keys in the simulation: every member's word counts)
        except ProtocolError as exc:
            self.count_refused(exc.reason, exc.detail)

    # -- the host (what gossip tells the node) ---------------------------------------------------

    def peer_joined(self, peer: Peer) -> None:
        pass

    def peer_gone(self, peer: Peer) -> None:
        self.gone.append(peer)
        if peer.state == "dead":
            self.sim.deaths.append((self.sim.now, self.name, peer.node))

    def on_joined(self) -> None:
        if self.joined_at is None:
            self.joined_at = self.sim.now

    def declared_dead(self, reason: str) -> None:
        """Come back as a new incarnation, as the engine does (what it sent is resent elsewhere)."""
        if self.life.state in ("refused", "left"):
            return
        self.rejoins += 1
        old = self.incarnation
        endpoints = self.membership.rejoin_endpoints(old)
        self.incarnation = self.sim.rng.getrandbits(63) | 1
        self.life.on("declared_dead", self.sim.now)
        self.outbox.evacuate_all(self.incarnation)
        self.membership.clear()
        self.gossip.rejoin(self._me(), endpoints)

    def service_retired(self, service: str) -> None:
        pass

    def count_refused(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1

    # -- reading ---------------------------------------------------------------------------------

    def state_of(self, other: SimNode) -> str | None:
        """What this node believes of ``other``'s current incarnation (None: it does not know it)."""
        peer = self.membership.peers.get(other.incarnation)
        return peer.state if peer is not None else None


class MeshSim:
    """Nodes, the link between them and the virtual clock (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        loss: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.0005,
        config: NodeConfig | None = None,
    ) -> None:
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be a probability in [0, 1), got {loss}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.jitter = jitter
        self.config = config or NodeConfig()
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.cut: set[tuple[str, str]] = set()  # (from, to) endpoints that lose everything
        self.suspicions: list[tuple[float, str, str]] = []  # (when, who suspected, whom): raised by a probe
        self.deaths: list[tuple[float, str, str]] = []  # (when, who declared, whom)
        self._queue: list[tuple[float, int, int, SimNode, bytes]] = []
        self._seq = itertools.count()
        self._names = itertools.count(1)
        self.sent = self.dropped = 0

    def clock(self) -> float:
        return self.now

    # -- building the mesh -------------------------------------------------------------------------

    def _new(self, service: ServiceSpec | None, name: str | None) -> SimNode:
        node = SimNode(self, name or f"n{next(self._names)}", service)
        self.nodes[node.endpoint] = node
        self._watch(node)
        return node

    def _watch(self, node: SimNode) -> None:
        sims = self
        membership = node.membership
        suspect = membership.suspect

        def noted(incarnation: int) -> Peer | None:  # a probe failed: the suspicions the checker counts
            peer = suspect(incarnation)
            if peer is not None:
                sims.suspicions.append((sims.now, node.name, peer.node))
            return peer

        membership.suspect = noted  # type: ignore[method-assign]

    def bootstrap(self, n: int, services: list[ServiceSpec | None] | None = None) -> list[SimNode]:
        """``n`` nodes that already know each other (all alive), as after a long quiet run."""
        services = services or [None]
        nodes = [self._new(services[i % len(services)], None) for i in range(n)]
        for node in nodes:
            node.start([])
        for node in nodes:
            for other in nodes:
                if other is not node:
                    node.membership.upsert(other._me())
            node.gossip.settled(self.now + self.rng.random() * self.config.heartbeat)
        for node in nodes:
            self._schedule(node)
        return nodes

    def join(
        self, service: ServiceSpec | None = None, name: str | None = None, seeds: list[SimNode] | None = None
    ) -> SimNode:
        """A new node starts now, seeded by ``seeds`` (default: one random node that is up)."""
        up = self.up()
        seeds = seeds if seeds is not None else ([self.rng.choice(up)] if up else [])
        node = self._new(service, name)
        node.start([s.endpoint for s in seeds])
        self._schedule(node)
        return node

    def crash(self, node: SimNode) -> None:
        """The node stops at once: what it sends and what is sent to it is lost from now on."""
        node.up = False

    def leave(self, node: SimNode) -> None:
        """A graceful stop (nothing to drain here): it says it leaves, says goodbye, and stops."""
        node.gossip.begin_leave()
        node.gossip.finish_leave()
        node.up = False

    def partition(self, side_a: list[SimNode], side_b: list[SimNode]) -> None:
        """Cut every link between the two sides, both ways."""
        for a in side_a:
            for b in side_b:
                self.cut.add((a.endpoint, b.endpoint))
                self.cut.add((b.endpoint, a.endpoint))

    def heal(self) -> None:
        self.cut.clear()

    def up(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up]

    # -- running -----------------------------------------------------------------------------------

    def transmit(self, src: SimNode, endpoint: str, frame: bytes) -> None:
        self.sent += 1
        dst = self.nodes.get(endpoint)
        if dst is None or (src.endpoint, endpoint) in self.cut or (self.loss and self.rng.random() < self.loss):
            self.dropped += 1
            return
        at = self.now + self.delay + (self.rng.random() * self.jitter if self.jitter else 0.0)
        heapq.heappush(self._queue, (at, next(self._seq), 0, dst, frame))

    def _schedule(self, node: SimNode) -> None:
        due = max(node.gossip.next_due, self.now)
        if due < node.wake_at:
            node.wake_at = due
            heapq.heappush(self._queue, (due, next(self._seq), 1, node, b""))

    def step(self) -> bool:
        """Deliver the next frame or wake the next node; False when nothing is left to do."""
        while self._queue:
            at, _, kind, node, frame = heapq.heappop(self._queue)
            if kind == 1 and at != node.wake_at:
                continue  # a wake-up that an earlier one replaced
            self.now = max(self.now, at)
            if not node.up:
                continue
            if kind == 0:
                node.receive(frame)
            else:
                node.wake_at = float("inf")
                node.gossip.tick(self.now)
            self._schedule(node)
            return True
        return False

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass."""
        end = self.now + seconds
        while self._queue and self._queue[0][0] <= end:
            self.step()
        self.now = max(self.now, end)

    def until(self, predicate: Callable[[], bool], periods: float, what: str = "condition") -> float:
        """Run until ``predicate()`` holds, checked every tenth of a period; returns the protocol
        periods it took (AssertionError, with the seed, after ``periods``)."""
        start = self.now
        period = self.config.heartbeat
        while not predicate():
            if self.now - start >= periods * period:
                raise AssertionError(f"{what} not reached within {periods} periods (seed {self.seed})")
            self.run(period / 10)
        return (self.now - start) / period

    def churn(self, service: ServiceSpec | None = None, limit: float = 200) -> dict[str, float]:
        """A join, then a crash (of the newcomer), then a graceful leave (of another node): how many
        periods until every node up sees each (``crash_spread``: from the first node that declared
        the crash dead until every node knows); AssertionError after ``limit`` periods."""
        out: dict[str, float] = {}
        newcomer = self.join(service)
        out["join"] = self.until(lambda: newcomer.life.joined and self.everyone_sees(newcomer, "alive"), limit,
                                 "everyone sees the newcomer")
        self.crash(newcomer)
        out["crash"] = self.until(lambda: self.everyone_sees(newcomer, "dead"), limit, "everyone sees the crash")
        first = min(t for t, _, whom in self.deaths if whom == newcomer.name)
        out["crash_spread"] = (self.now - first) / self.config.heartbeat
        leaver = self.rng.choice(self.up())
        self.leave(leaver)
        out["leave"] = self.until(lambda: self.everyone_sees(leaver, "left"), limit, "everyone sees the leave")
        return out

    # -- reading -----------------------------------------------------------------------------------

    def everyone_sees(self, node: SimNode, *states: str) -> bool:
        """Whether every other node that is up believes ``node`` is in one of ``states``."""
        return all(other.state_of(node) in states for other in self.up() if other is not node)

    def mark(self) -> tuple[float, int, int, Counter[int]]:
        """Where the counters stand now (give it to :meth:`traffic` later)."""
        frames: Counter[int] = Counter()
        for node in self.nodes.values():
            frames.update(node.frames_out)
        return self.now, sum(n.bytes_out for n in self.nodes.values()), len(self.up()), frames

    def traffic(self, since: tuple[float, int, int, Counter[int]]) -> Traffic:
        """Frames and bytes sent per node (of those up) per period, since :meth:`mark`."""
        t0, bytes0, _, frames0 = since
        now, bytes1, nodes, frames1 = self.mark()
        periods = max((now - t0) / self.config.heartbeat, 1e-9)
        frames = frames1 - frames0
        per = nodes * periods
        return Traffic(
            nodes=nodes,
            periods=periods,
            frames=sum(frames.values()) / per,
            bytes=(bytes1 - bytes0) / per,
            by_type={wire.FRAME_NAMES[t]: c / per for t, c in sorted(frames.items())},
        )
