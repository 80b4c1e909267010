"""No module reaches into another package's private modules or names (DESIGN.md, layout).

A private module (``_text.py``) or name (``_mesh_spec``) may be used inside its own package;
from anywhere else the public home is the one to import. The check reads the import statements
of every module in ``choreo/``; it does not import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "choreo"


def _package_of(path: Path) -> tuple[str, ...]:
    return ("choreo", *path.relative_to(PACKAGE).parent.parts)


def _resolve(path: Path, node: ast.ImportFrom) -> tuple[str, ...]:
    if node.level == 0:
        return tuple((node.module or "").split("."))
    base = _package_of(path)[: len(_package_of(path)) - (node.level - 1)]
    return base + (tuple(node.module.split(".")) if node.module else ())


def test_no_module_imports_a_private_module_or_name_of_another_package() -> None:
    reaches = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _package_of(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(path, node)
            if target[:1] != ("choreo",):
                continue
            # the package that holds the imported module (a private module's package owns it)
            private_at = next((i for i, part in enumerate(target) if part.startswith("_") and part != "__init__"), None)
            if private_at is not None and target[:private_at] != own:
                reaches.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {'.'.join(target)}")
            for alias in node.names:
                dunder = alias.name.startswith("__") and alias.name.endswith("__")
                if alias.name.startswith("_") and not dunder and target[:-1] != own and target != own:
                    reaches.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {'.'.join(target)}.{alias.name}")
    assert not reaches, "private names used outside their package:\n" + "\n".join(reaches)
