"""Where declarations come from: imported code, a JSON file, or a running mesh.

How this works: a *module or package name* is imported (a package with every submodule, except
``__main__``) and every :class:`~choreo.Service` found as a module attribute is collected, once
each, ordered by where it is declared. A *path to a .json file* is either the node-link JSON that
``choreo graph --format json`` writes or a bare SystemSpec (``SystemSpec.to_json()``). A *peer*
(``tcp://HOST:PORT``) is asked through :func:`choreo.client.fetch_system_spec`, imported only
then, so the analyzer never loads the runtime or the transport for the other two sources.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from types import ModuleType

from ..errors import ChoreoUsageError
from ..service import Service
from ..spec import SystemSpec, system_spec

__all__ = ["LoadError", "load_spec", "collect_services"]


class LoadError(ChoreoUsageError):
    """The target could not be read; the message says why and what to give instead."""


def load_spec(target: str | None = None, *, peer: str | None = None, timeout: float = 5.0) -> tuple[SystemSpec, str]:
    """The SystemSpec of a target, and a name to show for it.

    ``target`` is a module or package name, or a path to a ``.json`` file; ``peer`` reads a
    running mesh instead.

    >>> load_spec("choreo.errors")
    Traceback (most recent call last):
    choreo.analyzer._load.LoadError: no choreo.Service found in choreo.errors (looked at 1 module): ...
    >>> spec, name = load_spec("examples.shop")  # doctest: +SKIP
    >>> spec, name = load_spec("shop.json")  # doctest: +SKIP
    >>> spec, name = load_spec(peer="tcp://127.0.0.1:7400")  # doctest: +SKIP
    """
    if (target is None) == (peer is None):
        raise LoadError("give either a TARGET (module, package or .json file) or --peer tcp://HOST:PORT, not both")
    if target is None:
        return _from_peer(str(peer), timeout), str(peer)
    if target.endswith(".json") or os.path.isfile(target):
        return _from_file(target)
    return system_spec(collect_services(target)), target


def collect_services(module_name: str) -> list[Service]:
    """Every Service declared in a module, or in a package and all its submodules.

    >>> [s.name for s in collect_services("analyzer_systems.shop")]  # doctest: +SKIP
    ['orders', 'payments', 'shipping']
    """
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise LoadError(
            f"{module_name!r} looks like a file path: give a module or package name (examples.shop) that Python "
            "can import from the current directory, or a .json spec written by 'choreo graph ... --format json'"
        )
    root = _import(module_name, is_target=True)
    modules = [root]
    if hasattr(root, "__path__"):
        failed: list[str] = []
        for info in pkgutil.walk_packages(root.__path__, prefix=root.__name__ + ".", onerror=failed.append):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            modules.append(_import(info.name))
        if failed:
            _import(failed[0])  # raises with the reason
    found: dict[int, Service] = {}
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, Service):
                found.setdefault(id(value), value)
    if not found:
        looked = f"{len(modules)} module{'s' if len(modules) > 1 else ''}"
        raise LoadError(
            f"no choreo.Service found in {module_name} (looked at {looked}): declare each service as a "
            "module-level variable, e.g. orders = Service('orders')"
        )
    return sorted(found.values(), key=lambda s: (s.module, s.line, s.name))


def _import(name: str, is_target: bool = False) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if is_target and exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise LoadError(
                f"no module named {name!r}: run from the directory that contains it, or install its package "
                "(it must be importable: python -c 'import " + name + "')"
            ) from exc
        raise LoadError(f"could not import {name}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the user's module failed while importing: say which and why
        raise LoadError(f"could not import {name}: {type(exc).__name__}: {exc}") from exc


def _from_file(path: str) -> tuple[SystemSpec, str]:
    from ._graph import graph_to_spec
    from ._nodelink import from_node_link

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LoadError(f"{path} is not JSON: {exc}") from exc
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and "nodes" in data:
        g = from_node_link(data)
        return graph_to_spec(g), g.graph.get("name") or stem
    if isinstance(data, dict) and "services" in data:
        try:
            return SystemSpec.from_json(raw), stem
        except Exception as exc:  # msgspec.ValidationError: say where
            raise LoadError(f"{path} is not a valid SystemSpec: {exc}") from exc
    if isinstance(data, dict) and "asyncapi" in data:
        raise LoadError(
            f"{path} is an AsyncAPI document, which does not hold everything choreo declares; "
            "read the file written by 'choreo graph TARGET --format json' instead"
        )
    raise LoadError(f"{path} is neither a choreo graph (--format json) nor a SystemSpec")


def _from_peer(peer: str, timeout: float) -> SystemSpec:
    address = peer.partition("@")[2] if "@" in peer.split("://")[0] else peer  # KEY@tcp://... in a secure mesh
    if not address.startswith(("tcp://", "ipc://")):
        raise LoadError(f"--peer must look like tcp://HOST:PORT (KEY@tcp://HOST:PORT in a secure mesh), got {peer!r}")
    if not timeout > 0:
        raise LoadError(f"--timeout must be > 0 seconds, got {timeout}")
    try:
        client = importlib.import_module("choreo.client")
    except ModuleNotFoundError as exc:
        if exc.name != "choreo.client":
            raise LoadError(f"choreo.client could not be imported: {exc}") from exc
        client = None
    except ImportError as exc:
        raise LoadError(f"choreo.client could not be imported: {exc}") from exc
    fetch = getattr(client, "fetch_system_spec", None)
    if fetch is None:
        raise LoadError(
            "reading a running mesh needs choreo.client.fetch_system_spec, which this installation of choreo lacks; "
            "analyze the services' code instead (choreo graph MODULE), or a spec exported with --format json"
        )
    try:
        spec = fetch(peer, timeout)
    except Exception as exc:
        raise LoadError(f"could not read the declarations from {peer}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(spec, SystemSpec):
        raise LoadError(f"choreo.client.fetch_system_spec returned {type(spec).__name__}, expected a SystemSpec")
    return spec
