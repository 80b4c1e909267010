"""Who is in the mesh, and one system query asked of many nodes at once.

How this works: the seed answers ``peers`` with every node it knows and their state (gossip
makes that the whole mesh); the live ones (alive, suspect, leaving) are asked in parallel,
each on its own connection from a small thread pool (the client is synchronous), so one slow
or dead node costs one timeout, not one per node. Answers and failures come back together::

    nodes = discover("tcp://127.0.0.1:7000")
    for node, answer in gather(nodes, "stats"):
        print(node.name, answer if not isinstance(answer, Exception) else f"failed: {answer}")

A command that asks again and again (``choreo top``, the live map) passes the endpoints that did
not answer last time as ``quick``: they are asked with a deadline of ``QUICK_TIMEOUT`` (a member
the mesh has not declared dead yet, or a client that cannot be dialled back, would otherwise
hold every refresh for the whole timeout); one that answers is asked normally again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..client import fetch_system_spec, rpc
from ..endpoints import check_endpoint
from ..errors import ChoreoUsageError
from ..spec import SystemSpec

__all__ = ["MeshNode", "discover", "gather", "check_peer", "mesh_spec", "QUICK_TIMEOUT"]

LIVE_STATES = ("alive", "suspect", "leaving")
QUICK_TIMEOUT = 0.5  # seconds given to a node that did not answer the last time (see gather)


@dataclass(frozen=True)
class MeshNode:
    """One node of the mesh as the seed sees it."""

    name: str
    endpoint: str
    service: str | None  # None: a client (emits and sends, handles nothing)
    state: str


def check_peer(peer: str, timeout: float) -> None:
    try:
        check_endpoint(peer, "--peer")
    except ValueError as exc:
        raise ChoreoUsageError(str(exc)) from None
    if not timeout > 0:
        raise ChoreoUsageError(f"--timeout must be > 0 seconds, got {timeout}")


def discover(seed: str, timeout: float = 5.0) -> list[MeshNode]:
    """The live nodes the seed knows (the seed included), one per endpoint, ordered by service and name."""
    check_peer(seed, timeout)
    peers = rpc(seed, "peers", timeout=timeout)
    by_endpoint: dict[str, MeshNode] = {}
    for p in peers:
        if p.get("state") not in LIVE_STATES:
            continue
        by_endpoint[p["endpoint"]] = MeshNode(p["node"], p["endpoint"], p.get("service"), p["state"])
    return sorted(by_endpoint.values(), key=lambda n: (n.service is None, n.service or "", n.name))


def _ask(endpoint: str, method: str, args: dict[str, Any] | None, timeout: float) -> Any:
    try:
        return rpc(endpoint, method, args, timeout=timeout)
    except Exception as exc:  # a node that died meanwhile or answered with an error: reported, not fatal
        return exc


def gather(
    nodes: Iterable[MeshNode], method: str, args: dict[str, Any] | None = None, timeout: float = 5.0,
    quick: Collection[str] = (),
) -> list[tuple[MeshNode, Any]]:
    """Ask every node ``method`` in parallel; each answer is the result or the exception it raised.
    Endpoints in ``quick`` (silent the last time) get ``QUICK_TIMEOUT`` at most."""
    nodes = list(nodes)
    if not nodes:
        return []
    short = min(timeout, QUICK_TIMEOUT)
    with ThreadPoolExecutor(max_workers=min(16, len(nodes)), thread_name_prefix="choreo-ask") as pool:
        futures = [pool.submit(_ask, n.endpoint, method, args, short if n.endpoint in quick else timeout)
                   for n in nodes]
        return [(n, f.result()) for n, f in zip(nodes, futures)]


def mesh_spec(peer: str, timeout: float = 5.0) -> SystemSpec | None:
    """The mesh's declarations (every service it knows), or None when the peer cannot give them.

    Used to tell which handler caused a step; everything that uses it works without it.
    """
    try:
        return fetch_system_spec(peer, timeout)
    except Exception:  # unreachable, or a node too old to answer: callers do without
        return None
