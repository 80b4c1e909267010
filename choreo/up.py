"""Running a whole system: every service of an example as its own process, a driver, a clean stop.

An *example* is a package whose ``__init__.py`` says what to run::

    SYSTEM = {"api": 2, "orders": 2, "payments": 1}   # service -> instances; the first is the seed
    CLIENT = "mobile"                 # optional: the service the driver's node runs as
    CLIENT_CONFIG = NodeConfig(window=200)   # optional: that node's NodeConfig
    ENV = {"SHOP_DELAY": "0"}         # optional: extra environment for every service process

    async def drive(client, system, **options):   # optional: plays the scenario, prints its outcome
        await client.send(PlaceOrder(...))
        return 0                      # the exit status: an int, or an object with .exit_status

A service is named by its ``Service.name`` (looked up in the package and its submodules) or as
``"module:attribute"``. ``CLIENT`` declares what the driver originates (``Service("mobile",
sends=[PlaceOrder])``): the driver's node runs *as* that service, so the runtime checks it
sends only what it declares and the flow graph shows where those messages come from.

:class:`System` starts it all (``with System(load_example("examples.shop")) as system``): the
seed first, then the other instances in parallel, and waits until the mesh is *complete*:
every node sees every other alive (asked of each node, not assumed). The driver gets a client
:class:`~choreo.node.Node` that has joined that mesh, and the ``system`` itself, to add, stop,
restart or kill instances in the middle of a scenario (``await system.add("consumer")``) and
to read every node's stats. Every process gets ``CHOREO_DATA_DIR``: a directory of its own run
for files (an event log, a blob store). Leaving the ``with`` block stops every process
(SIGTERM: drain, then leave; SIGKILL for any that does not exit in time), whatever happened.
``choreo up`` (:mod:`choreo.up_commands`) is the command line on top of this module.

``System(..., secure=True)`` runs it as a secure mesh (:mod:`choreo.trust`): a temporary keys
directory, removed at the end, gets one key per instance (``orders-1`` serves orders and may
originate what the service's own tasks declare), ``driver`` for the driver's and the tests'
client nodes (it serves ``CLIENT`` and originates the system's entry points: every type some
service handles and no handler produces, plus what ``CLIENT`` declares), and ``ops``, with every
admin right, for the system queries this module asks (``system.rpc``, ``stats``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import pkgutil
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundled import BUNDLED, example_module, example_names
from .client import rpc
from .config import NodeConfig
from .trust import Permissions, Security, create_key
from .errors import ChoreoError, ChoreoUsageError
from .launch import NodeProcess, stop_all
from .node import Node
from .service import Service

__all__ = ["DATA_DIR_ENV", "Example", "Instance", "System", "exit_status", "load_example", "resolve_target"]

#: The environment variable that tells every process of a system where its run's files go.
DATA_DIR_ENV = "CHOREO_DATA_DIR"


# ================================================================================ the example


@dataclass
class Example:
    """What an example package declares (see the module docstring)."""

    module: str
    doc: str
    services: list[tuple[str, str, int]]  # (service name, "module:attribute", instances), seed first
    drive: Callable[..., Any] | None = None
    client: str | None = None  # "module:attribute" of the driver's service
    client_config: NodeConfig | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.module.removeprefix(BUNDLED + ".").removeprefix("examples.")

    def count(self) -> dict[str, int]:
        return {name: n for name, _, n in self.services}


def resolve_target(target: str) -> str:
    """``examples/shop``, ``./examples/shop/`` or ``examples.shop`` -> ``examples.shop``.

    A path is turned into a dotted name by walking up through the directories that hold an
    ``__init__.py``; the first one that does not is put on ``sys.path`` (like ``python -m``).
    ``examples/NAME`` that does not exist here names the example installed with choreo
    (:mod:`choreo.bundled`), so the README's commands work after ``pip install``.

    >>> resolve_target("examples.shop")
    'examples.shop'
    """
    path = Path(target)
    if "/" not in target and "\\" not in target and not path.is_dir():
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return example_module(target)
    if not path.exists():
        dotted = target.replace("\\", "/").removeprefix("./").strip("/").replace("/", ".")
        module = example_module(dotted)
        if module != dotted and _importable(module):
            return module
        raise ChoreoUsageError(f"{target}: no such directory{_known_examples()}")
    path = path.resolve()
    if not (path / "__init__.py").is_file():
        raise ChoreoUsageError(
            f"{target}: not a package directory (no __init__.py): give an example like examples/shop{_known_examples()}"
        )
    parts = [path.name]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.append(root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return ".".join(reversed(parts))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _known_examples() -> str:
    names = example_names()
    return f"; the examples are: {', '.join(names)}" if names else ""


def load_example(target: str) -> Example:
    """Import an example package and read its ``SYSTEM``, ``CLIENT``, ``CLIENT_CONFIG``, ``ENV``, ``drive``."""
    module_name = resolve_target(target)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChoreoUsageError(f"cannot import {module_name!r} (from {os.getcwd()}): {exc}{_known_examples()}") from None
    system = getattr(module, "SYSTEM", None)
    if not isinstance(system, Mapping) or not system:
        raise ChoreoUsageError(
            f"{module_name} declares no SYSTEM: add SYSTEM = {{'service': instances, ...}} to its __init__.py"
        )
    found = _services_in(module)
    services = []
    for name, count in system.items():
        if not isinstance(count, int) or count < 1:
            raise ChoreoUsageError(f"{module_name}.SYSTEM[{name!r}] must be a positive number of instances, got {count!r}")
        target_ref, service = _find_service(module_name, name, found)
        services.append((service.name, target_ref, count))
    client = getattr(module, "CLIENT", None)
    client_ref = _find_service(module_name, client, found)[0] if client is not None else None
    config = getattr(module, "CLIENT_CONFIG", None)
    if config is not None and not isinstance(config, NodeConfig):
        raise ChoreoUsageError(f"{module_name}.CLIENT_CONFIG must be a choreo.NodeConfig, got {type(config).__name__}")
    drive = getattr(module, "drive", None)
    if drive is not None and not inspect.iscoroutinefunction(drive):
        raise ChoreoUsageError(f"{module_name}.drive must be an 'async def drive(client, system, **options)'")
    env = {str(k): str(v) for k, v in dict(getattr(module, "ENV", {}) or {}).items()}
    doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return Example(module_name, doc, services, drive, client_ref, config, env)


def _services_in(package: Any) -> dict[str, tuple[str, Service]]:
    """Every Service in a package and its submodules: name -> ("module:attribute", service)."""
    modules = [package]
    if hasattr(package, "__path__"):
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                modules.append(importlib.import_module(info.name))
    found: dict[str, tuple[str, Service]] = {}
    for module in modules:
        for attr, value in vars(module).items():
            if isinstance(value, Service) and value.name not in found:
                found[value.name] = (f"{module.__name__}:{attr}", value)
    return found


def _find_service(example: str, name: Any, found: dict[str, tuple[str, Service]]) -> tuple[str, Service]:
    if isinstance(name, Service):
        name = name.name
    if not isinstance(name, str):
        raise ChoreoUsageError(f"{example}: name services by their name or 'module:attribute', got {name!r}")
    if ":" in name:
        from ._worker import load_service

        return name, load_service(name)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ChoreoUsageError(f"{example}: no service named {name!r} in the package (services found: {known})")
    return found[name]


# ================================================================================ the running system


@dataclass
class Instance:
    """One service process of a running system."""

    service: str
    name: str  # "orders#2"
    proc: NodeProcess
    expected_exit: bool = False  # stopped or killed on purpose (not a failure)

    @property
    def endpoint(self) -> str:
        assert self.proc.endpoint is not None
        return self.proc.endpoint

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.alive()

    @property
    def returncode(self) -> int | None:
        return None if self.proc.proc is None else self.proc.proc.poll()


class System:
    """An example's services running as processes (see the module docstring).

    ``log`` receives one line per thing that happens (started, ready, mesh complete, stopped).
    """

    def __init__(
        self,
        example: Example,
        *,
        data_dir: str | Path | None = None,
        port: int | None = None,
        log_level: str = "WARNING",
        log: Callable[[str], None] | None = None,
        ready_timeout: float = 30.0,
        secure: bool = False,
    ) -> None:
        self.example = example
        self._own_data_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix=f"choreo-{example.name.replace('.', '-')}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_level = log_level
        self.log = log or (lambda line: None)
        self.ready_timeout = ready_timeout
        self.instances: list[Instance] = []
        self.clients: list[Node] = []
        self._numbers: dict[str, int] = {}
        self._targets = {name: ref for name, ref, _ in example.services}
        self.started_at = time.monotonic()
        self.keys_dir: Path | None = None
        self._originates: dict[str, list[str]] = {}
        self.security: Security | None = None  # the "ops" key: what this object asks the nodes with
        self.client_security: Security | None = None  # the "driver" key: client nodes of this process
        if secure:
            self._make_keys()

    # -- keys (secure=True) ------------------------------------------------------------------------

    def _make_keys(self) -> None:
        from ._worker import load_service

        self.keys_dir = Path(tempfile.mkdtemp(prefix="choreo-keys-"))
        handled: set[str] = set()
        produced: set[str] = set()
        for name, ref, _ in self.example.services:
            spec = load_service(ref).spec()
            handled.update(h.message for h in spec.handlers)
            produced.update(t for h in spec.handlers for t in (*h.emits, *h.sends))
            self._originates[name] = [*spec.emits, *spec.sends]  # what its own tasks send
        entry = handled - produced
        serves: list[str] = []
        if self.example.client is not None:
            client = load_service(self.example.client).spec()
            serves = [client.name]
            entry |= {*client.emits, *client.sends}
        create_key(self.keys_dir, "ops", admin=["*"])
        create_key(self.keys_dir, "driver", serves=serves, originates=sorted(entry))
        self.security = Security.load(self.keys_dir, "ops")
        self.client_security = Security.load(self.keys_dir, "driver")

    def _instance_security(self, service: str, name: str) -> Security | None:
        if self.keys_dir is None:
            return None
        key = name.replace("#", "-")
        create_key(self.keys_dir, key, serves=[service], originates=self._originates.get(service, []))
        return Security.load(self.keys_dir, key)

    def rpc(self, endpoint: str, method: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """A system query to one node of this system (with the ``ops`` key when it is secure)."""
        return rpc(endpoint, method, args, timeout, security=self.security)

    # -- whole-system lifecycle ----------------------------------------------------------------

    @property
    def seed(self) -> str:
        """The endpoint new nodes join through: the first live instance, else a client node of ours."""
        for endpoint in self._expected():
            return endpoint
        raise ChoreoError("no live node left to join the mesh through")

    def start(self, timeout: float = 30.0) -> System:
        """Start every instance (the seed first, the rest in parallel) and wait until the mesh is complete."""
        self.started_at = time.monotonic()
        try:
            plan = [name for name, _, n in self.example.services for _ in range(n)]
            bind = f"tcp://127.0.0.1:{self.port}" if self.port else "tcp://127.0.0.1:0"
            self._spawn(plan[0], bind=bind, peers=[])
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(plan) - 1))) as pool:
                for f in [pool.submit(self._spawn, name) for name in plan[1:]]:
                    f.result()
            self.wait_complete(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """Stop every process: SIGTERM (drain and leave) all at once, SIGKILL what outlives ``timeout``.

        Returns each instance's exit status. Safe to call twice, and after a failure.
        """
        stop_all([inst.proc for inst in self.instances], timeout)
        statuses = {inst.name: inst.returncode for inst in self.instances}
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.keys_dir is not None:
            shutil.rmtree(self.keys_dir, ignore_errors=True)
        return statuses

    def kill_all(self) -> None:
        """SIGKILL every process now (a second Ctrl-C)."""
        for inst in self.instances:
            inst.expected_exit = True
            inst.proc.kill()

    def __enter__(self) -> System:
        if not self.instances:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.cleanup_logs(keep=exc[0] is not None)

    def cleanup_logs(self, keep: bool = False) -> None:
        """Remove the processes' stderr files (``keep`` them when something went wrong)."""
        if keep:
            return
        for inst in self.instances:
            if inst.proc.stderr_path and not inst.alive():
                try:
                    os.unlink(inst.proc.stderr_path)
                except OSError:
                    pass

    # -- instances -----------------------------------------------------------------------------

    def _spawn(self, service: str, *, bind: str = "tcp://127.0.0.1:0", peers: Iterable[str] | None = None) -> Instance:
        if service not in self._targets:
            raise ChoreoUsageError(f"{self.example.module} has no service {service!r}; it runs {', '.join(self._targets)}")
        number = self._numbers[service] = self._numbers.get(service, 0) + 1
        name = f"{service}#{number}"
        env = {**self.example.env, DATA_DIR_ENV: str(self.data_dir)}
        proc = NodeProcess(
            self._targets[service],
            bind=bind,
            peers=[self.seed] if peers is None else list(peers),
            name=name,
            env=env,
            log_level=self.log_level,
            start=False,
            security=self._instance_security(service, name),
        )
        inst = Instance(service, name, proc)
        self.instances.append(inst)  # before it starts: reaped even if starting fails half-way
        proc.start(self.ready_timeout)
        self.log(f"{name:<18} pid {proc.pid:<7} {proc.endpoint}  ready")
        return inst

    def running(self, service: str | None = None) -> list[Instance]:
        """The instances that are up (of one service, or all), in the order of ``SYSTEM``."""
        order = list(self._targets)
        up = [
            i
            for i in self.instances
            if i.proc.endpoint is not None and i.alive() and not i.expected_exit and (service is None or i.service == service)
        ]
        return sorted(up, key=lambda i: (order.index(i.service), int(i.name.rsplit("#", 1)[1])))

    def failed(self) -> list[Instance]:
        """Instances that exited without being asked to."""
        return [i for i in self.instances if not i.expected_exit and i.proc.proc is not None and not i.alive()]

    def endpoints(self, service: str | None = None) -> list[str]:
        return [i.endpoint for i in self.running(service)]

    async def add(self, service: str, timeout: float = 30.0) -> Instance:
        """Start one more instance of ``service`` and wait until the mesh has it."""
        inst = await asyncio.to_thread(self._spawn, service)
        await self.until_complete(timeout)
        return inst

    async def stop_instance(self, inst: Instance, timeout: float = 15.0) -> int | None:
        """Stop one instance gracefully (SIGTERM: it drains and leaves); returns its exit status."""
        inst.expected_exit = True
        status = await asyncio.to_thread(inst.proc.stop, timeout)
        self.log(f"{inst.name:<18} pid {inst.pid:<7} stopped (exit {status})")
        return status

    async def kill(self, inst: Instance) -> None:
        """Kill one instance (SIGKILL, like a crash: no drain, no goodbye)."""
        inst.expected_exit = True
        await asyncio.to_thread(inst.proc.kill)
        self.log(f"{inst.name:<18} pid {inst.pid:<7} killed")

    async def restart(self, inst: Instance, timeout: float = 30.0) -> Instance:
        """Stop an instance gracefully, then start a new instance of its service in its place."""
        await self.stop_instance(inst)
        return await self.add(inst.service, timeout)

    # -- the mesh ------------------------------------------------------------------------------

    def _expected(self) -> list[str]:
        return [*self.endpoints(), *(c.endpoint for c in self.clients if c.engine is not None)]

    def missing(self) -> dict[str, list[str]]:
        """For every node that does not yet see the whole mesh alive (and know what each node
        declares): the endpoints it lacks."""
        expected = self._expected()
        out: dict[str, list[str]] = {}
        for endpoint in expected:
            try:
                peers = self.rpc(endpoint, "peers", timeout=1.0)
            except ChoreoError:
                out[endpoint] = ["(no answer)"]
                continue
            # alive, and its declarations known (a service's messages route to it only then)
            alive = {p["endpoint"] for p in peers if p["state"] == "alive" and p.get("declared", True)}
            lacking = [e for e in expected if e not in alive]
            if lacking:
                out[endpoint] = lacking
        return out

    def wait_complete(self, timeout: float = 30.0) -> None:
        """Block until every node sees every other alive; TimeoutError saying who misses whom."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_failed()
            missing = self.missing()
            if not missing:
                counts = ", ".join(f"{s} {len(self.running(s))}" for s in self._targets if self.running(s))
                self.log(f"mesh complete: {len(self._expected())} nodes ({counts}) "
                         f"{time.monotonic() - self.started_at:.1f} s after start")
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mesh not complete within {timeout:.0f} s: {self._describe(missing)}")
            time.sleep(0.05)

    async def until_complete(self, timeout: float = 30.0) -> None:
        """The same, from a coroutine (the driver's)."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_failed()
            missing = await asyncio.to_thread(self.missing)
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mesh not complete within {timeout:.0f} s: {self._describe(missing)}")
            await asyncio.sleep(0.05)

    def _describe(self, missing: dict[str, list[str]]) -> str:
        names = {i.endpoint: i.name for i in self.instances if i.proc.endpoint}
        names.update({c.endpoint: c.name for c in self.clients if c.engine is not None})
        return "; ".join(
            f"{names.get(e, e)} does not see {', '.join(names.get(x, x) for x in lacking)}" for e, lacking in missing.items()
        )

    def _raise_failed(self) -> None:
        failed = self.failed()
        if failed:
            inst = failed[0]
            raise ChoreoError(f"{inst.name} (pid {inst.pid}) exited with status {inst.returncode}: {inst.proc.stderr()[-1500:]}")

    @asynccontextmanager
    async def client(
        self, service: Service | str | None = None, *, config: NodeConfig | None = None, timeout: float = 30.0
    ) -> AsyncIterator[Node]:
        """A node in this process that joins the mesh (as ``service``, or as a plain client) until the block ends."""
        if isinstance(service, str):
            from ._worker import load_service

            service = load_service(service)
        security = self.client_security
        if security is not None and service is not None and security.policy.may_serve("driver", service.name):
            # a service of the driver's own (its staff tools, say): a key that serves just that one
            assert self.keys_dir is not None
            spec = service.spec()
            key = f"driver-{service.name}"
            if not (self.keys_dir / f"{key}.key").exists():
                create_key(self.keys_dir, key, serves=[service.name], originates=[*spec.emits, *spec.sends])
            security = Security.load(self.keys_dir, key)
        node = Node(service, peers=[self.seed], config=config, security=security)
        await node.start()
        self.clients.append(node)
        try:
            await self.until_complete(timeout)
            yield node
        except BaseException:  # failed or cancelled (Ctrl-C, a service died): leave soon, but say goodbye
            self.clients.remove(node)
            await asyncio.shield(node.stop(timeout=0.5))
            raise
        self.clients.remove(node)
        await node.stop(timeout=10)  # drain: everything it sent is acknowledged, then goodbye

    # -- metrics -------------------------------------------------------------------------------

    def stats(self, service: str | None = None, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
        """Every running instance's stats (``rpc(endpoint, "stats")``), by instance name."""
        out = {}
        for inst in self.running(service):
            try:
                out[inst.name] = self.rpc(inst.endpoint, "stats", timeout=timeout)
            except ChoreoError:
                continue  # it went away between the two lines
        return out

    def total(self, counter: str, service: str | None = None) -> int:
        """A counter summed over the running instances (of one service)."""
        return sum(int(s.get(counter, 0)) for s in self.stats(service).values())

    # -- the driver ----------------------------------------------------------------------------

    async def drive(self, **options: Any) -> Any:
        """Run the example's driver with a client node on the mesh; returns what the driver returns."""
        if self.example.drive is None:
            raise ChoreoUsageError(f"{self.example.module} has no drive() to run")
        async with self.client(self.example.client, config=self.example.client_config) as client:
            return await self.example.drive(client, self, **options)


def exit_status(result: Any) -> int:
    """A driver's result as an exit status: an int is one; an object may carry ``exit_status``; else 0.

    >>> exit_status(None), exit_status(3)
    (0, 3)
    """
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    status = getattr(result, "exit_status", 0)
    return status if isinstance(status, int) else 0
