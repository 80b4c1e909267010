"""The node: one service instance as a process (or as a task in a notebook or a test).

A :class:`Node` puts an :class:`~choreo.runtime.engine.Engine` on ZeroMQ and the asyncio loop::

    async with Node(orders, bind="tcp://127.0.0.1:7001", peers=["tcp://127.0.0.1:7000"]) as node:
        await node.wait_for({"payments": 1})
        result = await node.send(PlaceOrder(cart_id="c-1"))
        await node.serve()          # until SIGTERM / SIGINT, then drain and leave

A node without a service is a *client*: it joins the mesh to emit, send and ask, and handles
nothing. ``stop()`` drains: it tells the mesh it is leaving (no new work is routed to it),
finishes and acknowledges what it holds, waits until what it sent is acknowledged, says goodbye.

Security: ``security=Security.load("keys", "orders-1")`` (:mod:`choreo.trust`) puts CURVE on
every socket and admits only the keys of that directory; a node without keys refuses to bind a
non-loopback address unless ``insecure=True``. In a secure mesh, peers are ``KEY@tcp://HOST:PORT``.

Durability: ``data_dir=`` makes a node durable. Its outbox, the dedup ids and cached results of
what it handled, its dead letters and its identity live in a store there (SQLite, WAL mode), and a
node restarted on the same dir keeps its name and partitions, sends again what was not
acknowledged and answers duplicates of what it had handled::

    node = Node(orders, data_dir="/var/lib/choreo/orders-1")          # fsync="batch" by default
    await node.emit(OrderPlaced(order_id="o-1"))                     # returns once on disk

``fsync="batch"`` puts every commit on disk before the acknowledgements it covers leave and
before ``emit`` returns: one commit and one fsync per turn of the event loop, shared by
everything that turn handled and emitted (group commit). ``"interval"`` syncs every
``fsync_interval`` seconds instead (a crash of the process loses nothing committed, a power
failure up to an interval); ``"off"`` leaves it to the OS.

Observability: every node answers the system queries of ``choreo trace``/``top``/``dlq``
(:mod:`choreo.introspect`); ``metrics_port=`` also serves Prometheus metrics over HTTP
(:mod:`choreo.metrics`, 127.0.0.1 unless ``metrics_host`` says otherwise; no port without it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from . import introspect
from .config import NodeConfig, timeout_seconds
from .errors import NodeStopped, Undeliverable
from .messages import Message
from .metrics import MetricsServer
from .runtime.engine import Engine
from .runtime.stats import NodeStats, PeerStats
from .runtime.store import FSYNC_POLICIES, SqliteStore
from .service import Service
from .transport import ZmqTransport, check_addresses
from .trust import Security

__all__ = ["Node", "NodeConfig", "NodeStats", "PeerStats"]

log = logging.getLogger("choreo.node")


class Node:
    """A service instance (or a client) on the mesh. See the module docstring."""

    def __init__(
        self,
        service: Service | None = None,
        *,
        bind: str = "tcp://127.0.0.1:0",
        peers: Iterable[str] = (),
        config: NodeConfig | None = None,
        name: str | None = None,
        advertise: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        security: Security | None = None,
        insecure: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "batch",
        fsync_interval: float = 0.1,
    ) -> None:
        if metrics_port is not None and (not isinstance(metrics_port, int) or not 0 <= metrics_port <= 65535):
            raise ValueError(f"metrics_port must be None (no metrics) or a port in 0..65535, got {metrics_port!r}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))}, got {fsync!r}")
        if not (isinstance(fsync_interval, (int, float)) and fsync_interval > 0):
            raise ValueError(f"fsync_interval must be > 0 seconds, got {fsync_interval!r}")
        self.data_dir = data_dir  # None: memory mode (nothing survives the process)
        self.fsync = fsync
        self.fsync_interval = float(fsync_interval)
        self.service = service
        self.bind = bind
        self.peers = list(peers)
        # CURVE with these keys (choreo.trust); without keys only loopback, unless insecure
        check_addresses(bind, self.peers, security, insecure)
        self.security = security
        self.config = config or NodeConfig()
        self._name = name
        self._advertise = advertise
        self.engine: Engine | None = None
        self._emit_fast: Callable[[Message], bytes | None] = _no_fast_path  # the engine's, once it runs
        self.transport: ZmqTransport | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_at = 0.0  # when the scheduled tick runs (the loop's clock)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it started on (kept: asking costs a syscall)
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._fatal_waiters: list[asyncio.Future[None]] = []  # serve(): woken when the mesh refuses us
        self._stopped: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._closed = False  # stopped or killed: every verb raises NodeStopped
        self._hurry = False  # a second SIGTERM/SIGINT while draining: leave without finishing
        self._stop_task: asyncio.Future[None] | None = None  # the stop a signal started
        self.metrics_port = metrics_port  # None: no HTTP port at all; 0: a free one
        self.metrics_host = metrics_host
        self.metrics: MetricsServer | None = None
        self._store_closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> Node:
        """Bind, join the mesh through the seed peers, start ticking. Returns self."""
        if self.engine is not None:
            raise RuntimeError("node already started")
        loop = self._loop = asyncio.get_running_loop()
        store = None  # a data dir that cannot be used is refused before anything binds
        if self.data_dir is not None:
            store = SqliteStore.open(
                self.data_dir, service=self.service.name if self.service is not None else None, name=self._name,
                fsync=self.fsync, interval=self.fsync_interval,
            )
        hwm = self.config.window + 1000
        try:
            self.transport = ZmqTransport(
                self.bind,
                hwm=hwm,
                max_bytes=self.config.max_frame_bytes,  # the engine refuses anything larger anyway
                advertise=self._advertise,
                security=self.security,
                max_parked_bytes=2 * self.config.window_bytes,
                max_peers=self.config.max_connections,
                seeds=self.peers,
            )
        except BaseException:
            if store is not None:
                store.close()
            raise
        security = self.security
        self.engine = Engine(
            self.service, self.transport, config=self.config, name=self._name, store=store,
            policy=(lambda: security.policy) if security is not None else None,
        )
        self._use_emit_table(self.engine)
        self.transport.on_refused = self.engine.count_refused
        self.transport.start(loop, self.engine.on_frame, self._after_reading)
        self.engine.start(self.peers)
        introspect.install(self.engine)  # the system queries of choreo trace / dlq
        if self.metrics_port is not None:
            try:
                engine = self.engine
                self.metrics = await MetricsServer.start(
                    lambda: introspect.node_stats(engine).to_dict(), self.metrics_host, self.metrics_port,
                    tracer=engine.tracer,
                )
            except OSError:
                self.transport.close()
                if self.engine.journal is not None:
                    self.engine.journal.close()
                raise
        self._stopped = asyncio.Event()
        self._schedule_tick(self.config.tick)
        log.info("%s listening on %s", self.engine.name, self.transport.endpoint)
        for fn in self.service.background if self.service is not None else ():
            self._tasks.append(loop.create_task(self._background(fn), name=f"{self.name}:{fn.__name__}"))
        return self

    async def _background(self, fn: Callable[[Node], Awaitable[None]]) -> None:
        try:
            await fn(self)
        except asyncio.CancelledError:
            raise
        except Exception:  # the service's own task failed: say so, keep serving
            log.exception("%s: background task %s failed", self.name, getattr(fn, "__qualname__", fn))

    def _tick(self) -> None:
        """The engine's timers, then the conditions callers wait for; then sleep until the engine
        has work again (a tick away while it is busy or callers wait, else its next deadline: an
        idle node wakes a few times a second, to probe a member and answer probes)."""
        self._tick_handle = None
        engine, transport = self.engine, self.transport
        if engine is None or transport is None or transport.closed:
            return
        try:
            engine.tick()
            transport.retry_parked()
            transport.sweep()
        except Exception:  # a bug must not silently stop the node's clock
            log.exception("%s: error in tick", engine.name)
        self._check_conditions()
        delay = self.config.tick
        if not self._looks_every_tick():
            delay = max(delay, engine.next_tick() - engine.clock())
        self._schedule_tick(delay)

    def _looks_every_tick(self) -> bool:
        """Callers wait on a condition, or frames wait to be sent: the node looks every ``tick``,
        whatever the engine's deadlines."""
        transport = self.transport
        return bool(self._conditions) or transport is None or transport.parked

    def _schedule_tick(self, delay: float) -> None:
        loop = self._loop or asyncio.get_running_loop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._tick_at = loop.time() + delay
        self._tick_handle = loop.call_later(delay, self._tick)

    def _expect_work(self, within: float | None = None) -> None:
        """Something may have given the engine work (frames read, a request, events, a commit, a
        condition waited for): tick within ``within`` seconds (``tick`` by default) from now,
        unless a tick is due sooner. That tick asks the engine when it next has work, and sleeps
        until then: asking here instead would cost every read of a busy node a look at every
        channel."""
        loop = self._loop
        if loop is None or self._tick_handle is None or self.engine is None:
            return
        if within is None:
            within = self.config.tick
        if self._tick_at - loop.time() > within:
            self._schedule_tick(within)

    def _after_reading(self) -> None:
        """(the transport's idle callback) Frames were read: send what they caused, tick soon (they
        may have brought work), and tell whoever waits on serve() if the mesh refused us."""
        engine = self.engine
        if engine is None:
            return
        engine.flush()
        if engine.lifecycle.fatal is not None:  # (engine.fatal, without the property: every read asks)
            self._check_conditions()
        # work to look at, or callers waiting on a condition: a tick away; what is only in flight
        # (an ack, an answer, a retransmission) has deadlines that tick computes
        self._expect_work(None if engine.busy or self._looks_every_tick() else engine.in_flight_tick)

    def _check_conditions(self) -> None:
        engine = self.engine
        if engine is None:
            return
        if engine.fatal is not None and self._fatal_waiters:
            for fut in self._fatal_waiters:
                if not fut.done():
                    fut.set_exception(engine.fatal)
            self._fatal_waiters.clear()
        if self._conditions:
            still = []
            for predicate, fut in self._conditions:
                if fut.done():
                    continue
                if engine.fatal is not None:
                    fut.set_exception(engine.fatal)
                elif predicate():
                    fut.set_result(None)
                else:
                    still.append((predicate, fut))
            self._conditions = still

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait (checked every tick) until ``predicate()`` holds; TimeoutError naming ``what``."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._conditions.append((predicate, fut))
        self._expect_work()
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self.name}: {what} not reached within {timeout:.1f} s") from None

    async def wait_for(self, services: Mapping[str, int] | Iterable[str], timeout: float = 10.0) -> None:
        """Wait until this node has joined the mesh and the mesh has these services (with at
        least N instances each, for a mapping): what it sends next is routed to them::

            await node.wait_for({"billing": 2})
            node.try_emit(OrderPlaced(order_id="o-1"))   # never NotJoined here
        """
        wanted = dict(services) if isinstance(services, Mapping) else {s: 1 for s in services}
        engine = self._engine()
        timeout = timeout_seconds(timeout, "wait_for")

        def ready() -> bool:
            # a seed's hello names its service before its table arrives, and a node routes
            # nothing until it has the table (joined): both, or try_emit would still refuse
            return engine.calls.routing and all(len(engine.membership.instances(s)) >= n for s, n in wanted.items())

        try:
            await self.until(ready, timeout, f"services {wanted}")
        except TimeoutError:
            have = {s: len(engine.membership.instances(s)) for s in wanted}
            status = engine.gossip.joining.status()
            raise TimeoutError(
                f"{self.name}: waited {timeout:.1f} s for services {wanted}, the mesh has {have}"
                + (f"; not joined: {status}" if status.startswith("refused") else introspect.join_hint(engine, self.peers))
            ) from None

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Leave the mesh; with ``drain`` (the default) finish and acknowledge everything first."""
        if self.engine is None or self._closed:
            return  # (not started, or already stopped or killed: nothing left to drain)
        if self._stopping:  # another caller drains it: return once it has left, as that one does
            assert self._stopped is not None
            await self._stopped.wait()
            return
        timeout = self.config.drain_timeout if timeout is None else timeout_seconds(timeout, "stop")
        self._stopping = True
        engine = self.engine
        for task in self._tasks:  # the service's own producers stop first
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if drain:
            log.info("%s: draining (up to %.1f s): no new work comes here; finishing what it holds", self.name, timeout)
            engine.begin_leave()
            # quiet for two heartbeats: peers have heard we leave and sent nothing new meanwhile
            quiet_since: list[float] = [engine.clock()]

            def quiet() -> bool:
                if self._hurry:
                    return True
                if not engine.drained:
                    quiet_since[0] = engine.clock()
                    return False
                return engine.clock() - quiet_since[0] >= 2 * self.config.heartbeat

            try:
                await self.until(quiet, timeout, "drained")
            except TimeoutError:
                left = introspect.undrained(engine, timeout)  # None: all acknowledged, only the quiet period cut
                if left:
                    log.warning("%s", left)
            except Exception as exc:  # the mesh refused us meanwhile: leave anyway
                log.warning("%s: %s", self.name, exc)
        engine.finish_leave()  # a goodbye either way: peers need not wait for their failure detector
        self._close(commit=True)
        log.info("%s: left the mesh", self.name)

    def kill(self) -> None:
        """Stop at once, like a crash: no drain, no goodbye, nothing more committed (for tests of
        failure handling; a durable node's data dir keeps what it had committed)."""
        self._close()

    def _use_emit_table(self, engine: Engine) -> None:
        """Take the engine's compiled emit table (none on a durable node: its emits are checked
        against its disk first). The application's most frequent call then costs no Python frame:
        this node's ``try_emit`` is the table's, which writes through the event type's lane and
        calls the general path only when the lane cannot take the event."""
        self._emit_fast = engine.emit_fast or _no_fast_path
        if engine.emit_fast is not None:
            table = engine.router.emit_table
            table.fallback = self._try_emit_general
            self.try_emit = table.try_emit  # type: ignore[method-assign]

    def _close(self, commit: bool = False) -> None:
        if self._closed:
            return  # (kill() after stop(), say: the first close did everything)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.transport is not None:
            self.transport.close()
        if self.metrics is not None:
            self.metrics.close()
        journal = self.engine.journal if self.engine is not None else None
        if journal is not None and not self._store_closed:
            self._store_closed = True
            try:
                journal.close(commit=commit)
            except Exception as exc:  # a commit that fails now: what it held is not committed
                log.warning("%s: closing the data dir: %s", self.name, exc)
        stopped: Exception | None = None
        if self.engine is not None:  # every verb raises from now on; every caller waiting is told now
            self.engine.close(NodeStopped(f"{self.name} has stopped: it emits, sends and asks nothing more"))
            stopped = self.engine.fatal
        for _, fut in self._conditions:  # (flush, wait_for, sync: nothing will tick to settle them)
            if not fut.done():
                if stopped is not None:
                    fut.set_exception(stopped)
                else:
                    fut.cancel()
        self._conditions.clear()
        for fut in self._fatal_waiters:
            if not fut.done():
                fut.cancel()
        self._fatal_waiters.clear()
        if self._stopped is not None:
            self._stopped.set()

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Run until SIGTERM/SIGINT (then drain and leave; a second signal cuts the drain short) or until
        stopped; raises if the mesh refused us."""
        if self.engine is None:
            await self.start()
        loop = asyncio.get_running_loop()
        assert self._stopped is not None
        installed = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread
                    pass
        try:
            fatal: asyncio.Future[None] = loop.create_future()
            self._fatal_waiters.append(fatal)
            self._check_conditions()
            stopped = asyncio.ensure_future(self._stopped.wait())
            done, _ = await asyncio.wait({fatal, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if fatal in done and not fatal.cancelled() and fatal.exception() is not None:
                self._close()
                raise fatal.exception()  # type: ignore[misc]
            stopped.cancel()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        """SIGTERM/SIGINT: drain and leave. A second one while draining cuts the drain short: the
        node says goodbye at once (a durable one commits what it handled first), and what it had
        not finished is its peers' to redo, as after a crash."""
        if not self._stopping:
            self._stop_task = asyncio.ensure_future(self.stop())  # (kept: the loop holds tasks weakly)
        elif not self._hurry and not self._closed:
            self._hurry = True
            log.warning("%s: a second signal: leaving now, without finishing the drain", self.name)
            self._check_conditions()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop(drain=exc[0] is None)

    # -- the application's API -------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("node not started: use 'async with Node(...)' or 'await node.start()'")
        fatal = self.engine.lifecycle.fatal  # (engine.fatal, without the property: every verb asks)
        if fatal is not None:
            raise fatal
        return self.engine

    async def emit(
        self, event: Message, *, timeout: float | None = None, traceparent: str | None = None, confirm: bool = False
    ) -> bytes:
        """Publish an event; returns its message id (the flow's trace id when it starts one).

        Waits up to ``timeout`` (``emit_timeout``) for the node to have joined the mesh
        (:class:`~choreo.NotJoined`), then for credit (:class:`~choreo.Backpressure`). A consuming
        service with no live instance right now does not lose it: it waits here (up to a window's
        worth per service) until one is back. With ``confirm=True`` it returns only once every
        consuming service acknowledged it, like Kafka's send future::

            msg_id = await node.emit(OrderPlaced(order_id="o-1"), confirm=True)
        """
        if timeout is not None:
            timeout = timeout_seconds(timeout, "emit")
        if traceparent is None and not confirm:
            msg_id = self._emit_fast(event)  # credit available: no waiting, no coroutine below
            if msg_id is not None:
                return msg_id  # type: ignore[no-any-return]
        engine = self._engine()  # (not started, stopped or refused: it raises why)
        if traceparent is None and not confirm:
            journal = engine.journal
            if journal is None:
                msg_id = engine.emit_now(event)  # credit available: no waiting, no coroutine below
                if msg_id is not None:
                    return msg_id
            elif journal.failing is None:
                msg_id = engine.emit_now(event)
                if msg_id is not None:
                    self._expect_work()  # its commit has a deadline: tick by it
                    await journal.durable(self.config.emit_timeout if timeout is None else timeout)
                    return msg_id
        self._expect_work()  # what it waits for has deadlines: tick by them
        return await engine.emit(event, timeout=timeout, traceparent=traceparent, confirm=confirm)

    async def emit_many(self, events: Iterable[Message], *, timeout: float | None = None) -> list[bytes]:
        """Publish several events, in order; returns their message ids (one crossing into the
        compiled core per run of one type, instead of one per event)::

            ids = await node.emit_many([OrderPlaced(order_id=o) for o in batch])

        Types may be mixed: each event goes to its own type's subscribers, by its own key, and
        its id is its idempotency id when its type declares one. Every event is checked before
        any goes (``ValidationError``, ``UndeclaredMessage``: nothing was sent). When credit runs
        out part-way, the events that went stay on their way and the rest wait for credit, in
        order, up to ``timeout`` in all (``emit_timeout``); then :class:`~choreo.Backpressure` is
        raised, its ``emitted`` holding the ids of the events that went.
        """
        engine = self._engine()
        if timeout is not None:
            timeout = timeout_seconds(timeout, "emit_many")
        self._expect_work()  # what it waits for has deadlines: tick by them
        return await engine.emit_many(events, timeout=timeout)

    def try_emit(self, event: Message, *, traceparent: str | None = None) -> bytes:
        """Publish an event now, or raise :class:`~choreo.Backpressure` at once.

        On a durable node it returns before the event is on disk (it is in the next commit,
        within a tick): ``await node.sync()`` waits for that. While the data dir's disk is full
        it raises :class:`~choreo.errors.StoreFull` (a ``Backpressure``) at once.
        """
        if traceparent is None:
            msg_id = self._emit_fast(event)  # the compiled lane of its type, in one call: its id, or None
            if msg_id is not None:
                return msg_id  # type: ignore[no-any-return]
        return self._try_emit_general(event, traceparent)

    def _try_emit_general(self, event: Message, traceparent: str | None) -> bytes:
        """try_emit when the compiled lane did not take the event (or a traceparent came with it)."""
        engine = self._engine()  # (not started, stopped or refused: it raises why)
        if engine.journal is not None:
            engine.journal.check()
        if traceparent is None:
            msg_id = engine.emit_now(event)
            if msg_id is not None:
                return msg_id
        return engine.try_emit(event, traceparent=traceparent)

    async def sync(self, timeout: float = 10.0) -> None:
        """Wait until everything this node emitted so far is committed to its data dir (after
        ``try_emit``, say); a no-op without one. Under ``fsync="batch"`` committed is on disk::

            for order in batch:
                node.try_emit(OrderPlaced(order_id=order))
            await node.sync()                    # one commit for the whole batch
        """
        engine = self._engine()
        timeout = timeout_seconds(timeout, "sync")
        if engine.journal is not None:
            await engine.journal.durable(timeout)

    def send(
        self, command: Message, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Send a command to its owning service; await it for the handler's result.

        A message of another kind, or a node not started, is refused at the call (it returns the
        request itself, one coroutine fewer to resume when the answer comes)::

            total = await node.send(PlaceOrder(cart_id="c-1"))
        """
        engine = self._engine()
        if timeout is not None:
            timeout = timeout_seconds(timeout, "send")
        self._expect_work(min(engine.in_flight_tick, self.config.request_timeout if timeout is None else timeout))
        return engine.send(command, timeout=timeout, traceparent=traceparent)

    def ask(
        self, query: Message, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Coroutine[Any, Any, Any]:
        """Ask a query; await it for the answer (refused at the call as :meth:`send`)."""
        engine = self._engine()
        if timeout is not None:
            timeout = timeout_seconds(timeout, "ask")
        self._expect_work(min(engine.in_flight_tick, self.config.request_timeout if timeout is None else timeout))
        return engine.ask(query, timeout=timeout, traceparent=traceparent)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything this node sent is acknowledged by every consuming service.

        It covers what waits for a consumer's instance to come back, too, and what a receiver
        acknowledged early (to free a stalled channel) until it is done there. It never returns for a
        message that reached no one: if some message since the last flush had no declared
        consumer, it raises :class:`~choreo.Undeliverable` naming the types (once everything
        else is acknowledged).
        """
        engine = self._engine()
        timeout = timeout_seconds(timeout, "flush")
        try:
            await self.until(lambda: engine.acknowledged, timeout, "all sent messages acknowledged")
        except TimeoutError:  # say who has not acknowledged what, and whether they are heard from
            raise TimeoutError(introspect.unacknowledged(engine, timeout)) from None
        undelivered = engine.take_undelivered()
        if undelivered:
            what = ", ".join(f"{n} {t}" for t, n in sorted(undelivered.items()))
            raise Undeliverable(f"{what}: no service in the mesh declares that it consumes them, so nobody got them")

    # -- inspection ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.engine.name if self.engine else (self._name or "node")

    @property
    def endpoint(self) -> str:
        if self.transport is None:
            raise RuntimeError("node not started")
        return self.transport.endpoint

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:PORT/metrics`` when started with ``metrics_port``, else None."""
        return self.metrics.url if self.metrics is not None else None

    def stats(self) -> NodeStats:
        """Counters and gauges, as one frozen record (received, processed, in flight, lag, refused...).

        >>> stats = node.stats()                                   # doctest: +SKIP
        >>> stats.processed, stats.in_flight, stats.refused.get("malformed", 0)  # doctest: +SKIP
        (1042, 0, 0)
        """
        return introspect.node_stats(self._engine())

    def dead_letters(self) -> list[dict[str, Any]]:
        """The dead letters kept on this node (a summary of each)."""
        return [letter.summary() for letter in self._engine().dispatcher.dead_letters]

    def replay(self, letter_id: int) -> dict[str, Any]:
        """Run a dead letter's handler again, once."""
        return self._engine().dispatcher.replay(letter_id).summary()


def _no_fast_path(event: Message) -> None:
    return None  # (before start, and on a durable node: the general path says why not)
