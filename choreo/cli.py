"""The ``choreo`` command: one argparse parser, subcommands contributed by their own modules.

How this works: every module named in :data:`COMMAND_MODULES` has a ``register(subparsers)``
function that adds its subcommands and sets each one's ``func`` (taking the parsed arguments,
returning the exit status). Adding a command is writing such a module and one line here.
Errors choreo raises on purpose (a target that cannot be read, Graphviz missing) print as one
line, ``choreo: error: ...``, with exit status 2, like argparse's own usage errors.

    $ choreo graph examples.shop --format svg -o shop.svg
    $ choreo lint examples.shop          # exit 1 when an error-level finding exists
    $ python -m choreo flows examples.shop
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ChoreoError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: Modules whose ``register(subparsers)`` adds subcommands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "choreo.analyzer.commands",
    "choreo.run_commands",
    "choreo.keys_commands",
    "choreo.up_commands",
    "choreo.observe.commands",
    "choreo.admin_commands",
)


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The ``choreo`` parser with the subcommands of ``modules``.

    >>> build_parser().parse_args(["flows", "examples.shop"]).command
    'flows'
    """
    parser = argparse.ArgumentParser(
        prog="choreo",
        description="choreo: a brokerless choreography runtime. Draw, check and run event-driven services.",
    )
    parser.add_argument("--version", action="version", version=f"choreo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``choreo`` command line; returns the exit status.

    >>> main(["lint", "--rules"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ChoreoError, OSError) as exc:  # raised on purpose, or a file that cannot be written
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        print(f"choreo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _broken_pipe() -> int:
    # The reader went away (choreo ... | head): stop quietly, and keep Python from complaining at exit.
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0
