"""The examples in the runtime's docstrings (and the modules below it) run and show what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "choreo.config",
    "choreo.states",
    "choreo.service",
    "choreo.runtime.lifecycle",
    "choreo.runtime.membership",
    "choreo.runtime.probes",
    "choreo.runtime.rumors",
    "choreo.runtime.ownership",
    "choreo.runtime.outbox",
    "choreo.runtime.routing",
    "choreo.runtime.calls",
    "choreo.runtime.queries",
    "choreo.runtime.deadletters",
    "choreo.runtime.store",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (see above)"
