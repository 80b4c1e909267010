"""The examples in the analyzer's docstrings run and show what they claim."""

from __future__ import annotations

import doctest
import importlib
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/, so analyzer_systems imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = [
    "choreo.analyzer._graph",
    "choreo.analyzer._flows",
    "choreo.analyzer._lints",
    "choreo.analyzer._analysis",
    "choreo.analyzer._text",
    "choreo.analyzer._dot",
    "choreo.analyzer._mermaid",
    "choreo.analyzer._nodelink",
    "choreo.analyzer._asyncapi",
    "choreo.analyzer._html",
    "choreo.analyzer._render",
    "choreo.analyzer._formats",
    "choreo.analyzer._load",
    "choreo.analyzer._observed",
    "choreo.analyzer.commands",
    "choreo.cli",
    "choreo.terminal",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (see above)"


def test_every_analyzer_module_is_listed() -> None:
    here = Path(importlib.import_module("choreo.analyzer").__file__ or "").parent
    found = {f"choreo.analyzer.{p.stem}" for p in here.glob("*.py") if p.stem != "__init__"}
    assert found == {m for m in MODULES if m.startswith("choreo.analyzer.")}


def test_the_public_api_is_pinned() -> None:
    import choreo.analyzer as analyzer

    assert sorted(analyzer.__all__) == sorted(analyzer._LAZY)
    for name in analyzer.__all__:
        assert getattr(analyzer, name) is not None
