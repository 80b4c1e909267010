"""The layers the README draws hold in the code: no upward import, no cycle, no private reach.

Every module of the package is placed in one layer (a new module must be placed here, or the
test says so). A module may import its own layer and those below, never above; that counts
imports made only for type checking and imports inside functions too, because a reader follows
them all. On top of the layers:

* no part of ``choreo.runtime`` imports the engine (the engine wires the parts, not the reverse);
* the analyzer reads declarations only: layers 1 and 2, and a live mesh through ``choreo.client``
  (its command-line glue, ``analyzer.commands``, is a program of layer 6 like the others);
* a private module (``_name``) is imported only from inside its own package, and no module
  imports another's private names;
* the import graph has no cycle;
* no module is longer than ``MAX_MODULE_LINES`` and no class than ``MAX_CLASS_LINES`` (issue 15:
  one job per part; the compiled core's pure twin, ``_pycore.py``, is the one exception).

The checkers are plain functions, so a test can run them on a copy of the package with a
violation injected and see it caught.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "choreo"

LAYERS: dict[int, tuple[str, ...]] = {
    1: (
        "errors", "messages", "tracing", "states", "config", "core", "_pycore", "_core", "terminal", "endpoints",
        "bundled", "trust", "statetypes",
    ),
    2: ("service", "spec", "wire"),
    3: ("runtime", "runtime.*"),
    4: ("transport", "_zmqio", "node", "metrics", "latency", "introspect", "otel", "client"),
    5: ("launch", "_worker", "testing", "nemesis", "meshsim", "up"),
    6: (
        "cli", "run_commands", "up_commands", "admin_commands", "keys_commands", "demo", "analyzer", "analyzer.*",
        "observe",
        "observe.*", "__main__",
    ),
}
ANALYZER_MAY_IMPORT = ("client",)  # beyond layers 1 and 2
MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 600
SIZE_EXEMPT = ("_pycore",)  # the compiled core's pure-Python twin: one reference model, kept whole


def layer_of(module: str) -> int | None:
    """The layer of ``choreo.<module>`` (None: not placed)."""
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or (name.endswith(".*") and module.startswith(name[:-1])):
                return layer
    return None


def modules(root: Path) -> dict[str, Path]:
    """Module name (relative to the package, '' for the package itself) -> file.

    A compiled module counts by its type stub (``_core.pyi``).
    """
    out = {}
    for path in sorted([*root.rglob("*.py"), *(p for p in root.rglob("*.pyi") if not p.with_suffix(".py").exists())]):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "choreo" or alias.name.startswith("choreo."):
                    found.append((alias.name[len("choreo.") :] if alias.name != "choreo" else "", [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "choreo" or node.module.startswith("choreo.")):
                target = node.module[len("choreo.") :] if node.module != "choreo" else ""
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in known]
            if submodules:  # `from . import core`: the submodule itself is imported
                found.extend((m, [], node.lineno) for m in submodules)
                names = [n for n in names if f"{target}.{n}".lstrip(".") not in known]
                if not names:
                    continue
            found.append((target, names, node.lineno))
    return found


def check(root: Path) -> list[str]:
    """Every violation of the rules above in the package at ``root``, one line each."""
    mods = modules(root)
    known = set(mods)
    problems = []
    graph = nx.DiGraph()
    for name, path in mods.items():
        where = f"choreo{'.' + name if name else ''} ({path.relative_to(root.parent)})"
        mine = layer_of(name) if name else 7  # the package itself: the public facade, on top
        if path.suffix == ".pyi":
            graph.add_node(name)
            continue  # a compiled module's stub: it imports nothing of choreo's
        if mine is None:
            problems.append(f"{where} is in no layer: place it in tests/unit/test_layers.py LAYERS")
            continue
        graph.add_node(name)
        for target, names, line in _imports(name, path, known):
            if target == "" and set(names) <= {"__version__"}:
                continue  # the version constant, from the facade
            theirs = layer_of(target) if target else 7
            graph.add_edge(name, target)
            at = f"{where}:{line} imports choreo{'.' + target if target else ''}"
            if theirs is not None and theirs > mine:
                problems.append(f"{at}: layer {mine} may not import layer {theirs}")
            if name.startswith("runtime.") and target == "runtime.engine" and name != "runtime.engine":
                problems.append(f"{at}: a runtime part may not import the engine (it gets a callable or a Protocol)")
            analysis = (name == "analyzer" or name.startswith("analyzer.")) and name != "analyzer.commands"
            if analysis and not target.startswith("analyzer"):
                if theirs is not None and theirs > 2 and target not in ANALYZER_MAY_IMPORT:
                    problems.append(f"{at}: the analyzer reads declarations only (layers 1-2 and choreo.client)")
            private = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            if private:
                owner = target.rsplit(".", 1)[0] if "." in target else ""
                if not (name == owner or name.startswith(owner + ".") if owner else True):
                    problems.append(f"{at}: a private module, imported from outside its package {owner or 'choreo'}")
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    problems.append(f"{at}: reaches the private name {n}")
    for cycle in nx.simple_cycles(graph):
        if len(cycle) > 1:
            problems.append("import cycle: " + " -> ".join(f"choreo.{m}" for m in [*cycle, cycle[0]]))
    return problems


def check_sizes(root: Path) -> list[str]:
    """Every module over ``MAX_MODULE_LINES`` lines and class over ``MAX_CLASS_LINES``, one line each."""
    problems = []
    for name, path in modules(root).items():
        if path.suffix == ".pyi" or name in SIZE_EXEMPT:
            continue
        text = path.read_text()
        where = path.relative_to(root.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{where} has {lines} lines, more than {MAX_MODULE_LINES}: cut it along its seams")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    problems.append(f"{where}:{node.lineno} class {node.name} has {size} lines, more than "
                                    f"{MAX_CLASS_LINES}: give a part of its job to a class of its own")
    return problems


def test_the_package_keeps_its_layers() -> None:
    problems = check(PACKAGE)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "injected", "expected"),
    [
        ("runtime/holds.py", "from ..node import Node\n", "layer 3 may not import layer 4"),
        ("runtime/gossip.py", "from .engine import Engine\n", "may not import the engine"),
        ("analyzer/_graph.py", "from ..runtime import membership\n", "the analyzer reads declarations only"),
        ("demo.py", "from .analyzer._text import render_text\n", "a private module"),
        ("spec.py", "from .service import Service\n", "import cycle"),
        ("errors.py", "from .messages import _build_options\n", "reaches the private name _build_options"),
        ("newpart.py", "", "is in no layer"),
    ],
)
def test_the_checker_catches_an_injected_violation(tmp_path: Path, module: str, injected: str, expected: str) -> None:
    copy = tmp_path / "choreo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = copy / module
    text = target.read_text() if target.exists() else ""
    head, sep, rest = text.partition("from __future__ import annotations\n")
    target.write_text(head + sep + injected + rest if sep else injected + text)
    problems = check(copy)
    assert any(expected in p for p in problems), problems


def test_no_module_or_class_outgrows_its_job() -> None:
    problems = check_sizes(PACKAGE)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "injected", "expected"),
    [
        ("runtime/holds.py", "\n" * MAX_MODULE_LINES, "choreo/runtime/holds.py has"),
        ("runtime/lifecycle.py", "\n\nclass Big:\n" + "    x = 0\n" * MAX_CLASS_LINES, "class Big has 601 lines"),
        ("_pycore.py", "\n" * MAX_MODULE_LINES, None),  # the twin is exempt
    ],
)
def test_the_size_check_catches_an_injected_violation(
    tmp_path: Path, module: str, injected: str, expected: str | None
) -> None:
    copy = tmp_path / "choreo"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    target = copy / module
    target.write_text(target.read_text() + injected)
    problems = check_sizes(copy)
    if expected is None:
        assert not problems, problems
    else:
        assert any(expected in p for p in problems), problems
