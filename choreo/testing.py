"""Test your handlers against a hostile network, without sockets: the fake-link harness.

Nodes run the real engine; frames between them cross an in-memory link that drops,
duplicates, delays and reorders them, under a virtual clock, all from one seed, so a failing
run replays exactly::

    async def test_orders_survive_a_bad_network():
        h = Harness(seed=7, drop=0.1, duplicate=0.1, reorder=0.2)
        client = h.add(None)
        h.add(orders)
        h.add(orders)                       # two competing instances
        await h.start()
        await h.run(client.send(PlaceOrder(...)))   # drives the network until it returns

Handlers may be plain functions or ``async def``; an async handler that waits on real time
(``asyncio.sleep``) works but slows the test by that much. Every failure message of
:meth:`Harness.run` carries the seed.

Faults, besides the lossy link: :meth:`Harness.partition` and :meth:`Harness.heal` cut and
restore links; :meth:`Harness.crash` stops a node dead, :meth:`Harness.restart` brings it back
as a new incarnation at the same endpoint; :meth:`Harness.join` starts a new node mid-run and
:meth:`Harness.leave` stops one gracefully (drain, hand over, goodbye); :meth:`Harness.pause`
freezes a node (a long GC pause, a suspended VM: no ticks, its frames wait; :meth:`Harness.burst`
then hands it all of them in one read) and
:meth:`Harness.jump` moves one node's clock forward. :mod:`choreo.nemesis` draws seeded random
schedules of all of these.

Durable nodes: ``Harness(data_root=tmp_path)`` gives every node a data dir of its own there
(``add(..., durable=False)`` opts one out), as ``Node(data_dir=...)`` does; ``add(...,
store=MemoryStore())`` gives one node a store in memory instead (it models the OS and the disk:
:meth:`~choreo.runtime.store.MemoryStore.lose_power`). A crash is then a crash of the process:
what the node had committed survives, nothing else does, and :meth:`Harness.restart` opens the
same store again. Data dirs sync with ``fsync="off"`` by default: a crashed process loses the
same either way, and the tests run faster.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import core, introspect
from .config import NodeConfig
from .runtime.engine import Engine
from .runtime.store import MemoryStore, SqliteStore
from .service import Service

__all__ = ["Harness", "FakeLink", "FakeTransport", "NodeLoop"]

T = TypeVar("T")


class FakeLink:
    """The shared medium: frames wait in a heap ordered by their (virtual) arrival time."""

    def __init__(
        self, rng: random.Random, *, drop: float, duplicate: float, reorder: float, delay: float, jitter: float
    ) -> None:
        for name, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p}")
        self.rng = rng
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.delay, self.jitter = delay, jitter
        self.queue: list[tuple[float, int, str, bytes, str]] = []
        self._seq = itertools.count()
        self.cut: set[tuple[str, str]] = set()  # (from, to) pairs that lose everything
        self.sent = self.dropped = self.duplicated = 0

    def transmit(self, now: float, src: str, dst: str, frame: bytes) -> None:
        self.sent += 1
        if (src, dst) in self.cut or self.rng.random() < self.drop:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            late = self.rng.random() * self.jitter if self.rng.random() < self.reorder else 0.0
            heapq.heappush(self.queue, (now + self.delay + late, next(self._seq), dst, frame, src))

    def next_arrival(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class FakeTransport:
    """What one engine sees of the link (implements :class:`choreo.runtime.engine.Transport`)."""

    def __init__(self, harness: Harness, endpoint: str) -> None:
        self.harness = harness
        self.endpoint = endpoint
        self.closed = False  # its node crashed: whatever it still tries to send is lost

    def connect(self, endpoint: str) -> None:
        pass

    def disconnect(self, endpoint: str) -> None:
        pass

    def redial(self, endpoint: str) -> None:
        pass  # (no connection to go stale on the fake link)

    def send(self, endpoint: str, frame: bytes) -> None:
        if not self.closed:
            self.harness.link.transmit(self.harness.now, self.endpoint, endpoint, frame)

    def reply(self, identity: bytes, frame: bytes) -> None:
        self.send(identity.decode(), frame)


class NodeLoop:
    """One node's view of the event loop: what it schedules (a turn of its handlers, a flush)
    runs in order on the harness's loop, except while the node is paused: then it waits, and runs
    when the node resumes, before its frames and its tick, as what a process stopped with SIGSTOP
    had queued runs first when it continues."""

    def __init__(self, harness: Harness, endpoint: str, loop: asyncio.AbstractEventLoop) -> None:
        self.harness, self.endpoint, self.loop = harness, endpoint, loop
        self.queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._scheduled = False

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.queue.append((callback, args))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        """Run what was queued so far (what that queues runs on the next turn), unless paused."""
        self._scheduled = False
        harness = self.harness
        if harness.paused.get(self.endpoint, 0.0) > harness.now:
            harness.held.add(self.endpoint)  # (resumed by Harness.resume_held)
            return
        if self.endpoint in harness.down or harness.loops.get(self.endpoint) is not self:
            self.queue.clear()  # a crashed process runs nothing more
            return
        queue = self.queue
        for _ in range(len(queue)):
            callback, args = queue.popleft()
            try:
                callback(*args)
            except Exception as exc:  # (as the event loop does: reported, and the next runs)
                self.loop.call_exception_handler({"message": f"exception in {callback!r}", "exception": exc})
        if queue and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.run)


class Harness:
    """Several engines on one fake link under one virtual clock (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.02,
        config: NodeConfig | None = None,
        policy: Any = None,
        data_root: str | os.PathLike[str] | None = None,
        fsync: str = "off",
    ) -> None:
        """``policy`` (a :class:`~choreo.trust.Policy`): the link behaves as a mesh with keys,
        each node speaking as the key given to :meth:`add` (its frames' principal)."""
        self.seed = seed
        self.policy = policy
        self.keys: dict[str, str | None] = {}  # endpoint -> the key its frames authenticate as
        self.rng = random.Random(seed)
        self.link = FakeLink(self.rng, drop=drop, duplicate=duplicate, reorder=reorder, delay=delay, jitter=jitter)
        self.config = config or NodeConfig()
        self.now = 0.0
        self.engines: dict[str, Engine] = {}
        self.down: set[str] = set()
        self.offset: dict[str, float] = {}  # endpoint -> how far its clock is ahead (jump)
        self.paused: dict[str, float] = {}  # endpoint -> virtual time it resumes at
        self._names = itertools.count(1)
        self.data_root = data_root  # every node gets a data dir here (durable), unless it opts out
        self.fsync = fsync
        self.data_dirs: dict[str, str] = {}  # endpoint -> its data dir
        self.stores: dict[str, MemoryStore] = {}  # endpoint -> its store in memory
        self._setup: dict[str, tuple[Service | None, str | None, NodeConfig | None]] = {}
        self.history: list[Engine] = []  # every engine this harness made, restarted ones included
        self.declared_dead: set[str] = set()  # names of incarnations some node declared dead
        self.dead_at: dict[str, float] = {}  # ... and when the first node did (virtual time)
        # (node name, message id): handled by a durable node that crashed before committing it; that
        # handler may run again (the one at-least-once a durable node keeps, see the README)
        self.uncommitted: set[tuple[str, bytes]] = set()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self.loops: dict[str, NodeLoop] = {}  # endpoint -> its node's loop (see NodeLoop)
        self.held: set[str] = set()  # paused nodes whose loop holds callbacks until they resume

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def add(
        self, service: Service | None, name: str | None = None, config: NodeConfig | None = None,
        key: str | None = None, durable: bool | None = None, store: MemoryStore | None = None,
    ) -> Engine:
        """A new node on the link (not started: :meth:`start` starts them all). With a policy,
        ``key`` names the key it speaks as. Durable (a data dir of its own under ``data_root``)
        unless ``durable=False`` or the harness has no root, or on ``store``."""
        n = next(self._names)
        label = "".join(c if c.isalnum() or c in "-_.#" else "_" for c in name or (service.name if service else "client"))
        endpoint = f"inproc://fake/{label}-{n}"  # an address hellos accept (choreo.wire), never dialled
        self._setup[endpoint] = (service, name, config)
        self.keys[endpoint] = key
        if store is not None:
            self.stores[endpoint] = store
        elif durable is None:
            durable = self.data_root is not None
        if durable and store is None:
            if self.data_root is None:
                raise ValueError("durable=True needs Harness(data_root=...)")
            self.data_dirs[endpoint] = os.path.join(os.fspath(self.data_root), f"{label.replace('#', '_')}-{n}")
        if (durable or store is not None) and name is None:
            # a durable node's name decides its partitions (its rendezvous key): from the seed, not at random
            durable_name = f"{service.name if service else 'client'}#{self.rng.getrandbits(24):06x}"
            self._setup[endpoint] = (service, durable_name, config)
        return self._make(endpoint)

    def _make(self, endpoint: str) -> Engine:
        service, name, config = self._setup[endpoint]
        self.offset.setdefault(endpoint, 0.0)
        store: MemoryStore | SqliteStore | None = None
        if endpoint in self.stores:
            store = self.stores[endpoint].open(service=service.name if service else None, name=name, fsync=self.fsync)
        elif endpoint in self.data_dirs:
            store = SqliteStore.open(
                self.data_dirs[endpoint], service=service.name if service else None, name=name, fsync=self.fsync
            )
        engine = Engine(
            service,
            FakeTransport(self, endpoint),
            config=config or self.config,
            clock=lambda: self.now + self.offset[endpoint],
            wall=lambda: 1_700_000_000.0 + self.now + self.offset[endpoint],
            incarnation=self.rng.getrandbits(63) | 1,
            name=name,
            ids=core.IdSource(self.rng.randbytes(8)),
            incarnations=lambda: self.rng.getrandbits(63) | 1,
            policy=(lambda: self.policy) if self.policy is not None else None,
            store=store,
        )
        introspect.install(engine)  # the system queries a real node answers
        self.engines[endpoint] = engine
        self.history.append(engine)
        peer_gone = engine.peer_gone

        def noted(peer: Any) -> None:  # what the nemesis checkers need: who was taken for dead
            if peer.state == "dead":
                self.declared_dead.add(peer.node)
                self.dead_at.setdefault(peer.node, self.now)
            peer_gone(peer)

        engine.peer_gone = noted  # type: ignore[method-assign]
        return engine

    async def start(self, timeout: float = 30.0) -> None:
        """Start every engine with the first as seed and run until all know each other."""
        endpoints = list(self.engines)
        for endpoint, engine in self.engines.items():
            self._start(engine, [endpoints[0]] if endpoint != endpoints[0] else [])
        count = len(self.engines)

        def converged() -> bool:
            return all(sum(p.live for p in e.membership.peers.values()) == count for e in self.engines.values())

        await self.run_until(converged, timeout, "membership converged")

    def partition(self, side_a: list[Engine], side_b: list[Engine]) -> None:
        """Cut every link between the two sides, both ways (like a firewall rule)."""
        for a in side_a:
            for b in side_b:
                self.link.cut.add((a.transport.endpoint, b.transport.endpoint))
                self.link.cut.add((b.transport.endpoint, a.transport.endpoint))

    def heal(self) -> None:
        """Remove every cut made by :meth:`partition`."""
        self.link.cut.clear()

    def crash(self, engine: Engine) -> None:
        """The node stops at once: frames to and from it are lost from now on, and nothing it had
        received runs any more (a durable node's data dir keeps what it had committed, nothing
        more; :attr:`uncommitted` notes what it had handled and not committed)."""
        self.down.add(engine.transport.endpoint)
        engine.transport.closed = True  # type: ignore[attr-defined]
        for channel in engine.outbox.inbound.values():
            channel.closed = True  # what the event loop still holds for it is dropped, as in a dead process
        if engine.journal is not None and not engine.journal.is_closed:
            self.uncommitted.update((engine.name, msg_id) for msg_id in engine.journal.uncommitted())
            # handled, and not done yet (its outputs or its standby's copy not acknowledged): its id
            # is not in the journal either, unless it went there with its writes
            self.uncommitted.update((engine.name, msg_id) for msg_id, job in engine.dispatcher.in_progress.items()
                                    if job.started and not job.logged)
            engine.journal.close(commit=False)

    def restart(self, engine: Engine, seeds: list[str] | None = None) -> Engine:
        """A crashed (or running: then crashed first) node comes back at its endpoint, as a new
        incarnation with empty memory (a durable node: with its data dir), seeded by every other
        node unless ``seeds`` says otherwise."""
        endpoint = engine.transport.endpoint
        self.crash(engine)
        new = self._make(endpoint)
        self.down.discard(endpoint)
        self.paused.pop(endpoint, None)
        self._start(new, seeds if seeds is not None else [e for e in self.engines if e != endpoint and e not in self.down])
        return new

    def join(
        self, service: Service | None, name: str | None = None, config: NodeConfig | None = None,
        key: str | None = None, durable: bool | None = None, store: MemoryStore | None = None,
    ) -> Engine:
        """A new node starts mid-run, seeded by the first node that is up (see :meth:`add`)."""
        engine = self.add(service, name, config, key, durable, store)
        seeds = [e for e in self.engines if e != engine.transport.endpoint and e not in self.down][:1]
        self._start(engine, seeds)
        return engine

    def _start(self, engine: Engine, seeds: list[str]) -> None:
        endpoint = engine.transport.endpoint
        loop = self.loops[endpoint] = NodeLoop(self, endpoint, asyncio.get_running_loop())
        engine.start(seeds)
        # (what the engine schedules goes through its NodeLoop: see pause)
        engine.intake.loop = engine.returns.loop = loop  # type: ignore[assignment]
        engine.outbox._loop = loop  # type: ignore[assignment]

    def resume_held(self) -> None:
        """Run what paused nodes had scheduled, for those whose pause is over (before anything else
        reaches them: frames, ticks)."""
        for endpoint in [e for e in self.held if self.paused.get(e, 0.0) <= self.now]:
            self.held.discard(endpoint)
            self.loops[endpoint].run()

    async def leave(self, engine: Engine, timeout: float = 60.0) -> bool:
        """Stop a node gracefully, as SIGTERM does: drain, hand over, goodbye; then it is down.

        Returns whether it drained within ``timeout`` (virtual seconds); it leaves either way.
        """
        engine.begin_leave()
        quiet_since = [self.now]

        def quiet() -> bool:
            if not engine.drained:
                quiet_since[0] = self.now
                return False
            return self.now - quiet_since[0] >= 2 * engine.config.heartbeat

        try:
            await self.run_until(quiet, timeout, f"{engine.name} drained")
            drained = True
        except AssertionError:
            drained = False
        engine.finish_leave()
        await self.step(self.config.tick)
        if engine.journal is not None:
            engine.journal.close()
        self.crash(engine)
        return drained

    def pause(self, engine: Engine, seconds: float) -> None:
        """Freeze a node for ``seconds`` of virtual time: no ticks; frames to it wait (a GC pause);
        what its loop had scheduled and not yet run (a turn of handlers: see :class:`NodeLoop`)
        runs when it resumes, first."""
        endpoint = engine.transport.endpoint
        self.paused[endpoint] = max(self.paused.get(endpoint, 0.0), self.now + seconds)

    def burst(self, engine: Engine) -> int:
        """Hand a paused node every frame waiting for it in one read, with no turn of its loop
        between them (as a busy socket does), and end its pause; returns how many it got."""
        endpoint = engine.transport.endpoint
        until = self.paused.pop(endpoint, self.now)  # (frames that met the pause wait until its end)
        self.resume_held()

        def arrived(q: tuple[float, int, str, bytes, str]) -> bool:
            return q[2] == endpoint and (q[0] <= self.now or q[0] == until)

        waiting = sorted(q for q in self.link.queue if arrived(q))
        if not waiting:
            return 0
        self.link.queue = [q for q in self.link.queue if not arrived(q)]
        heapq.heapify(self.link.queue)
        for _, _, _, frame, src in waiting:
            engine.on_frame(frame, src.encode(), self.keys.get(src))
        engine.flush()
        return len(waiting)

    def jump(self, engine: Engine, seconds: float) -> None:
        """Move one node's clock ``seconds`` forward at once (its monotonic clock after a suspend)."""
        self.offset[engine.transport.endpoint] += seconds

    def inject(self, src: str, dst: Engine, frame: bytes, key: str | None = None) -> None:
        """Put a raw frame on the link, from ``src`` (an endpoint no node need have: a stranger's
        connection) to ``dst``, authenticated as ``key``: for tests of what a node refuses."""
        self.keys.setdefault(src, key)
        self.link.transmit(self.now, src, dst.transport.endpoint, frame)

    def up(self) -> list[Engine]:
        """The nodes that are running (not crashed, not left)."""
        return [e for endpoint, e in self.engines.items() if endpoint not in self.down]

    # -- running -------------------------------------------------------------------------------

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        """Wait ``seconds`` of virtual time (a workload's pacing): ``await harness.sleep(0.05)``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._names), fut))
        return fut

    def _wake_sleepers(self) -> None:
        sleepers = self._sleepers
        while sleepers and sleepers[0][0] <= self.now:
            fut = heapq.heappop(sleepers)[2]
            if not fut.done():
                fut.set_result(None)

    async def _settle(self) -> None:
        """Let the event loop run what is ready (flushes, handler tasks), several rounds."""
        for _ in range(5):
            await asyncio.sleep(0)

    async def step(self, tick: float) -> None:
        """Deliver what arrives up to the next tick, then tick every engine."""
        await self._settle()
        horizon = self.now + tick
        link = self.link
        paused = self.paused
        while link.queue and link.queue[0][0] <= horizon:
            at, seq, dst, frame, src = heapq.heappop(link.queue)
            self.now = max(self.now, at)
            if self.held:
                self.resume_held()
            engine = self.engines.get(dst)
            if engine is None or dst in self.down:
                continue
            if paused.get(dst, 0.0) > self.now:  # frozen: the frame waits in its socket buffer
                heapq.heappush(link.queue, (paused[dst], seq, dst, frame, src))
                continue
            engine.on_frame(frame, src.encode(), self.keys.get(src))
            engine.flush()
            await self._settle()
        self.now = horizon
        if self.held:
            self.resume_held()
        self._wake_sleepers()
        for endpoint, engine in list(self.engines.items()):
            if endpoint not in self.down and paused.get(endpoint, 0.0) <= self.now:
                engine.tick()
        await self._settle()

    async def run_until(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Advance virtual time until ``predicate()`` holds (AssertionError with the seed if not)."""
        deadline = self.now + timeout
        tick = self.config.tick
        while not predicate():
            if self.now >= deadline:
                raise AssertionError(f"{what} not reached within {timeout} virtual s (seed {self.seed})")
            await self.step(tick)

    async def run(self, awaitable: Awaitable[T], timeout: float = 60.0) -> T:
        """Drive the network until ``awaitable`` completes; returns its result."""
        task = asyncio.ensure_future(awaitable)
        try:
            await self.run_until(task.done, timeout, "operation finished")
        finally:
            if not task.done():
                task.cancel()
        return task.result()

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass."""
        end = self.now + seconds
        while self.now < end:
            await self.step(min(self.config.tick, end - self.now))

    def describe(self) -> str:
        link = self.link
        return f"seed {self.seed}: {link.sent} frames, {link.dropped} dropped, {link.duplicated} duplicated"


def gather_all(*aws: Awaitable[Any]) -> Awaitable[list[Any]]:
    """``asyncio.gather`` for :meth:`Harness.run` (several operations at once)."""
    return asyncio.gather(*aws)
