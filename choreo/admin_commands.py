"""``choreo retire``: the operator's commands that change what a running mesh is.

Scaling a service to zero is only ever explicit: while a service is declared, messages for it
wait at their senders for an instance (bounded), whatever happened to its instances. An
operator who means to remove it for good retires it; every node learns it by gossip, forgets
the service, and drops what waited for it (counted as unrouted)::

    $ choreo retire reporting --peer tcp://10.0.0.5:7400
    retired reporting (dropped 12 messages waiting for it at orders#3fa2c1; the mesh learns it by gossip)
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run_retire"]


def register(subparsers: Any) -> None:
    retire = subparsers.add_parser(
        "retire",
        help="forget a service with no live instance, in the whole mesh (scale it to zero for good)",
        description="Retire SERVICE: every node forgets it, and what waited for its instances is dropped. "
        "Refused while an instance of it is live (stop them first). Until a service is retired, messages "
        "for it wait at their senders for an instance to come back.",
    )
    retire.add_argument("service", metavar="SERVICE", help="the service to retire")
    retire.add_argument("--peer", required=True, metavar="ENDPOINT", help="any node of the mesh, e.g. tcp://127.0.0.1:7400")
    retire.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node's answer (5)")
    retire.set_defaults(func=run_retire)


def run_retire(args: argparse.Namespace) -> int:
    from .client import rpc

    answer = rpc(args.peer, "retire", {"service": args.service}, timeout=args.timeout)
    note = "" if answer.get("known") else " (this node did not know it: nothing to forget here)"
    print(
        f"retired {answer['service']}{note} (dropped {answer['dropped']} messages waiting for it at "
        f"{answer['node']}; the mesh learns it by gossip)"
    )
    return 0
