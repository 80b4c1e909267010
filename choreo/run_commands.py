"""``choreo run``: one service instance as a process, in the foreground.

    $ choreo run examples.shop.orders:orders --bind tcp://127.0.0.1:7001 --peer tcp://127.0.0.1:7000
    $ choreo run examples.shop.orders:orders --bind tcp://10.0.0.5:7001 --keys keys --key orders-1 \\
          --peer api-1@tcp://10.0.0.4:7000      # a secure mesh: CURVE, only the keys of keys/ admitted
    $ choreo run examples.shop.orders:orders --data-dir /var/lib/choreo/orders-1 --peer tcp://127.0.0.1:7000
                                                # durable: restarted on that dir, it loses and repeats nothing

Prints ``choreo-ready <endpoint> <name>`` once bound and started (and `` metrics=<url>`` with
``--metrics-port``), serves until SIGTERM or
SIGINT, then drains (finishes and acknowledges what it holds) and leaves the mesh (a second
signal while it drains: it leaves at once). Exit
status: 0 after a clean stop, 2 when the mesh refused the node (for instance a second owner of
a command type) or the command line is wrong (binding a non-loopback address without keys and
without ``--insecure``, say), or the data dir cannot be used (in use by another node, another
node's, damaged, written by a newer choreo: one line says which, and nothing in it is changed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from .keys_commands import add_node_key_options, node_security

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run one service instance (MODULE:SERVICE) as a node",
        description="Run one service instance as a node, in the foreground: it prints 'choreo-ready ENDPOINT NAME' "
        "once it serves, and on SIGTERM or Ctrl-C it drains (finishes and acknowledges what it holds), hands its "
        "partitions over and leaves the mesh; a second signal while it drains leaves at once (what it had not finished "
        "goes to the other instances, as after a crash). Exit status: 0 after a stop, 2 when the mesh refused the node.",
    )
    p.add_argument("target", metavar="MODULE:SERVICE", help="where the Service object lives, e.g. examples.shop.orders:orders")
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:0", metavar="tcp://HOST:PORT",
        help="endpoint to listen on (default: a free port on 127.0.0.1); tcp://0.0.0.0:PORT listens on every "
        "interface and advertises the one that routes to the peers (a non-loopback address needs keys, or --insecure)",
    )  # fmt: skip
    p.add_argument(
        "--advertise", default=None, metavar="tcp://HOST:PORT",
        help="endpoint the peers should dial, when it differs from --bind (behind NAT, or to choose the interface)",
    )  # fmt: skip
    p.add_argument(
        "--peer", action="append", default=[], metavar="ENDPOINT",
        help="a node of the mesh to join (repeatable); in a secure mesh KEY@tcp://HOST:PORT",
    )  # fmt: skip
    p.add_argument("--name", default=None, help="instance name shown in stats and traces (default: service#random)")
    p.add_argument("--window", type=int, default=None, help="credit per channel: envelopes in flight to one receiver")
    p.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="make the node durable: its outbox, dedup ids, results, dead letters and name live in DIR (created if "
        "missing); restarted on the same DIR it resends what was not acknowledged and handles nothing twice",
    )  # fmt: skip
    p.add_argument(
        "--fsync", default="batch", choices=["batch", "interval", "off"],
        help="with --data-dir: batch (default) puts each commit on disk before its acks leave and before emit returns; "
        "interval syncs every --fsync-interval seconds (a power failure loses up to that); off leaves it to the OS",
    )  # fmt: skip
    p.add_argument(
        "--fsync-interval", type=float, default=0.1, metavar="SECONDS",
        help="with --fsync interval: seconds between syncs (default 0.1)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port; default: no port is opened)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="address of the metrics port (default: 127.0.0.1)"
    )
    add_node_key_options(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ._worker import load_service, run
    from .endpoints import check_endpoint
    from .config import NodeConfig
    from .errors import ChoreoUsageError

    try:
        check_endpoint(args.bind, "--bind", bind=True)
        for peer in args.peer:
            check_endpoint(peer, "--peer")
        if args.advertise is not None:
            check_endpoint(args.advertise, "--advertise")
    except ValueError as exc:
        raise ChoreoUsageError(str(exc)) from None
    if args.window is not None and args.window < 1:
        raise ChoreoUsageError(f"--window must be >= 1, got {args.window}")
    if not args.fsync_interval > 0:
        raise ChoreoUsageError(f"--fsync-interval must be > 0 seconds, got {args.fsync_interval}")
    if args.data_dir is None and (args.fsync != "batch" or args.fsync_interval != 0.1):
        raise ChoreoUsageError("--fsync and --fsync-interval apply to a durable node: add --data-dir DIR")

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = load_service(args.target)
    security = node_security(args)
    config = NodeConfig() if args.window is None else NodeConfig(window=args.window)
    return asyncio.run(
        run(
            service,
            args.bind,
            args.peer,
            config,
            args.name,
            advertise=args.advertise,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            security=security,
            insecure=args.insecure,
            data_dir=args.data_dir,
            fsync=args.fsync,
            fsync_interval=args.fsync_interval,
        )
    )
