"""``choreo keys``: make the CURVE key pairs of a secure mesh, and list what each key may do.

    $ choreo keys new orders-1 --dir keys --serves orders
    $ choreo keys new mobile --dir keys --originates PlaceOrder
    $ choreo keys new ops --dir keys --admin '*'
    $ choreo keys list --dir keys

Each key is two files (:mod:`choreo.trust`): ``NAME.key``, the public certificate with the key's
rights in its metadata, which goes into the keys directory of every node; and
``NAME.key_secret``, which stays on the one host that runs as NAME. A node then runs with
``choreo run ... --keys DIR --key NAME``; the observing commands (``top``, ``trace``, ``dlq``,
``graph --peer``) take ``--keys DIR --as NAME``, or ``$CHOREO_KEYS`` and ``$CHOREO_KEY``.

This module also holds the ``--keys/--key`` options those commands share.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_client_key_options", "add_node_key_options", "node_security", "register", "use_client_keys"]

DEFAULT_DIR = "keys"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "keys",
        help="make CURVE key pairs for a secure mesh, list them",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="make a key pair NAME.key + NAME.key_secret, with its rights")
    new.add_argument("name", metavar="NAME",
                     help="the key's name: what nodes see as the sender (letters, digits, _ . -)")
    _dir_option(new)
    new.add_argument("--serves", nargs="+", default=[], metavar="SERVICE",
                     help="services this key may run instances of (claim their partitions); '*': any")
    new.add_argument("--originates", nargs="+", default=[], metavar="TYPE",
                     help="message types it may send or emit from outside a handler (entry points); '*': any")
    new.add_argument("--admin", nargs="+", default=[], metavar="METHOD",
                     help="system queries it may call: stats spans trace peers spec dlq.list dlq.show dlq.replay ...; "
                          "'dlq.*' for a family, '*' for all")
    new.set_defaults(func=_new)
    listing = actions.add_parser("list", help="the keys a directory trusts, and what each may do")
    _dir_option(listing)
    listing.set_defaults(func=_list)


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help=f"the keys directory (default: $CHOREO_KEYS, else ./{DEFAULT_DIR})")


def _directory(args: argparse.Namespace) -> str:
    return args.dir or os.environ.get("CHOREO_KEYS") or DEFAULT_DIR


def _new(args: argparse.Namespace) -> int:
    from .trust import create_key

    directory = _directory(args)
    cert = create_key(directory, args.name, serves=args.serves, originates=args.originates, admin=args.admin)
    public = os.path.join(directory, f"{args.name}.key")
    print(f"{public}         public: copy it into the keys directory of every node of the mesh")
    print(f"{cert.path}  secret: keep it on the host that runs as {args.name} (mode 0600)")
    print(f"{args.name} may: {cert.permissions}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .trust import SECRET_SUFFIX, read_key_directory

    directory = _directory(args)
    certs = read_key_directory(directory)
    if not certs:
        print(f"{directory}: no keys (make one with 'choreo keys new NAME --dir {directory}')")
        return 0
    width = max(len(n) for n in certs)
    for name, cert in certs.items():
        secret = " (secret here)" if os.path.exists(os.path.join(directory, name + SECRET_SUFFIX)) else ""
        print(f"{name:<{width}}  {cert.public_key.decode()}  {cert.permissions}{secret}")
    return 0


# ---------------------------------------------------------------------------------------- shared options


def add_node_key_options(parser: argparse.ArgumentParser) -> None:
    """``--keys DIR --key NAME --insecure`` for commands that run a node."""
    parser.add_argument("--keys", default=None, metavar="DIR",
                        help="keys directory: CURVE on every socket, only these keys admitted (choreo keys new)")
    parser.add_argument("--key", default=None, metavar="NAME", help="the key this node runs as (DIR/NAME.key_secret)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without keys (anyone who reaches it can join)")


def node_security(args: argparse.Namespace) -> Any:
    """The :class:`~choreo.trust.Security` of ``--keys/--key``, or None; ChoreoUsageError if only one is given."""
    from .errors import ChoreoUsageError
    from .trust import Security

    if (args.keys is None) != (args.key is None):
        raise ChoreoUsageError("give both --keys DIR and --key NAME (the directory and this node's key in it)")
    return Security.load(args.keys, args.key) if args.keys is not None else None


def add_client_key_options(parser: argparse.ArgumentParser) -> None:
    """``--keys DIR --as NAME`` for commands that ask a running mesh (``--peer KEY@tcp://...``).

    (``--as``, not ``--key``: ``choreo traces --key`` filters flows by their ordering key.)
    """
    parser.add_argument("--keys", default=None, metavar="DIR",
                        help="for a secure mesh: the keys directory (default: $CHOREO_KEYS)")
    parser.add_argument("--as", dest="as_key", default=None, metavar="NAME",
                        help="for a secure mesh: the key to ask as, one with admin rights (default: $CHOREO_KEY)")


def use_client_keys(args: argparse.Namespace) -> None:
    """Make ``--keys/--as`` (each defaulting to its environment variable) the key pair of this process's clients."""
    keys, key = getattr(args, "keys", None), getattr(args, "as_key", None)
    if keys is None and key is None:
        return  # the client reads $CHOREO_KEYS / $CHOREO_KEY itself when a secure node is asked
    from .client import KEY_ENV, KEYS_ENV, set_security
    from .errors import ChoreoUsageError
    from .trust import Security

    keys, key = keys or os.environ.get(KEYS_ENV), key or os.environ.get(KEY_ENV)
    if keys is None or key is None:
        raise ChoreoUsageError(f"give both --keys DIR and --as NAME (or ${KEYS_ENV} and ${KEY_ENV})")
    set_security(Security.load(keys, key))
