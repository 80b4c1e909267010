"""Where the examples live: the working tree's ``examples/`` package, or the copy installed with choreo.

How this works: in a clone of the repository, ``examples`` is a package of the working directory
and is imported as such (``examples.shop``). The wheel ships the same tree as
``choreo.examples`` (setup.py maps it), so that after ``pip install choreo`` the commands of the
README work anywhere: ``choreo up examples/shop`` and ``choreo graph examples.shop`` fall back to
the installed copy when the working directory has no ``examples`` package. Nothing heavy is
imported here::

    example_module("examples.shop")   # 'examples.shop' in a clone, 'choreo.examples.shop' elsewhere
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["BUNDLED", "example_module", "example_names"]

#: The package the wheel installs the examples as.
BUNDLED = "choreo.examples"


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def example_module(name: str) -> str:
    """The module to import for ``name``: unchanged, unless it is under ``examples`` and only the
    installed copy exists, then the same module under :data:`BUNDLED`.

    >>> example_module("choreo.errors")
    'choreo.errors'
    """
    if name != "examples" and not name.startswith("examples."):
        return name
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the working directory's packages come first
    if _found("examples") or not _found(BUNDLED):
        return name
    return BUNDLED + name.removeprefix("examples")


def example_names() -> list[str]:
    """Every example (a package under ``examples`` whose ``__init__.py`` declares ``SYSTEM``), as a
    path: ``examples/shop``. Read from the files, not imported; the working tree's examples when
    there are, else the installed ones."""
    root = example_module("examples")
    spec = importlib.util.find_spec(root) if _found(root) else None
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for base in spec.submodule_search_locations:
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
            if "__init__.py" not in files or folder == base:
                continue
            try:
                with open(os.path.join(folder, "__init__.py"), encoding="utf-8") as f:
                    declares = "\nSYSTEM" in f.read()
            except OSError:
                continue
            if declares:
                out.append("examples/" + os.path.relpath(folder, base).replace(os.sep, "/"))
    return sorted(out)
