"""The child side of :class:`choreo.launch.NodeProcess`: read the node's definition, run it.

Reads a cloudpickled dict from stdin (written by the parent that spawned us), starts the node,
prints ``choreo-ready <endpoint> <name>`` on stdout (then `` metrics=<url>`` when it serves
Prometheus metrics), and serves until SIGTERM/SIGINT (drain) or
SIGKILL. Exit status: 0 after a clean stop, 2 if the mesh refused the node.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys

import cloudpickle

from .config import NodeConfig
from .errors import ChoreoError, ChoreoUsageError
from .launch import READY_PREFIX
from .node import Node
from .service import Service
from .transport import raise_fd_limit
from .trust import Security


def load_service(target: str) -> Service:
    """``module:attribute`` (or ``module`` holding exactly one Service) -> the Service."""
    module_name, _, attr = target.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChoreoUsageError(f"cannot import {module_name!r} (from {os.getcwd()}): {exc}") from None
    if attr:
        if not hasattr(module, attr):
            names = ", ".join(f"{module_name}:{k}" for k, v in vars(module).items() if isinstance(v, Service)) or "none"
            raise ChoreoUsageError(f"{target}: {module_name} has no attribute {attr!r} (services there: {names})")
        obj = getattr(module, attr)
        if not isinstance(obj, Service):
            raise ChoreoUsageError(f"{target}: {attr} is not a choreo.Service (got {type(obj).__name__})")
        return obj
    services = [v for v in vars(module).values() if isinstance(v, Service)]
    if len(services) != 1:
        names = ", ".join(s.name for s in services) or "none"
        raise ChoreoUsageError(f"{target}: name the service as MODULE:ATTRIBUTE (services found: {names})")
    return services[0]


async def run(
    service: Service | None,
    bind: str,
    peers: list[str],
    config: NodeConfig,
    name: str | None,
    advertise: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    watch_parent: bool = False,
    security: Security | None = None,
    insecure: bool = False,
    data_dir: str | None = None,
    fsync: str = "batch",
    fsync_interval: float = 0.1,
) -> int:
    # the parent as it is now, before the ready line: once the parent has read that line it may
    # die at any moment, and asking afterwards would name init, which never goes away
    parent = os.getppid()
    raise_fd_limit()  # a process of its own: each peer and each inbound connection costs descriptors
    node = Node(
        service,
        bind=bind,
        peers=peers,
        config=config,
        name=name,
        advertise=advertise,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        security=security,
        insecure=insecure,
        data_dir=data_dir,
        fsync=fsync,
        fsync_interval=fsync_interval,
    )
    try:
        await node.start()
    except ChoreoUsageError as exc:  # a data dir that cannot be used: say why, in one line
        print(f"choreo: {exc}", file=sys.stderr)
        return 2
    metrics = f" metrics={node.metrics_url}" if node.metrics_url else ""
    sys.stdout.write(f"{READY_PREFIX}{node.endpoint} {node.name}{metrics}\n")
    sys.stdout.flush()
    if watch_parent:
        _stop_when_orphaned(node, parent)
    try:
        await node.serve()
    except ChoreoError as exc:
        print(f"choreo: {exc}", file=sys.stderr)
        return 2
    return 0


def _stop_when_orphaned(node: Node, parent: int) -> None:
    """A node started by a program stops (draining) when that program dies, even by SIGKILL."""
    loop = asyncio.get_running_loop()

    def check() -> None:
        if os.getppid() != parent:
            logging.getLogger("choreo.node").warning("%s: the process that started it is gone: stopping", node.name)
            asyncio.ensure_future(node.stop())
        else:
            loop.call_later(0.5, check)

    loop.call_later(0.5, check)


def main() -> int:
    spec = cloudpickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=spec.get("log_level", "WARNING"), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = spec["service"]
    if isinstance(service, str):
        service = load_service(service)
    return asyncio.run(
        run(
            service,
            spec["bind"],
            spec["peers"],
            NodeConfig(**spec["config"]),
            spec["name"],
            metrics_port=spec.get("metrics_port"),
            metrics_host=spec.get("metrics_host", "127.0.0.1"),
            watch_parent=True,
            security=spec.get("security"),
            insecure=spec.get("insecure", False),
            data_dir=spec.get("data_dir"),
            fsync=spec.get("fsync", "batch"),
            fsync_interval=spec.get("fsync_interval", 0.1),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
