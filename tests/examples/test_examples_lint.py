"""Every example is a clean choreography: ``choreo lint`` finds nothing (not even a warning), and
``choreo graph --format asyncapi`` writes a document valid against the AsyncAPI 3.0.0 schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from choreo.cli import main

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "tests" / "schemas" / "asyncapi" / "asyncapi-3.0.0.json"
PATTERNS = ["async_request_reply", "claim_check", "cqrs", "event_carried_state", "event_notification",
            "event_sourcing", "load_leveling", "stream_processing"]
EXAMPLES = ["examples.products", "examples.shop", "examples.surge", *(f"examples.patterns.{p}" for p in PATTERNS)]


def declared_examples() -> list[str]:
    """Every package under examples/ whose __init__ declares a SYSTEM (what choreo up runs)."""
    return sorted(
        ".".join(("examples", *p.parent.relative_to(REPO / "examples").parts))
        for p in (REPO / "examples").rglob("__init__.py")
        if any(line.startswith("SYSTEM") for line in p.read_text().splitlines())
    )


def test_the_list_is_every_example() -> None:
    assert declared_examples() == sorted(EXAMPLES)
    for p in PATTERNS:
        readme = (REPO / "examples" / "patterns" / p / "README.md").read_text()
        assert f"choreo up examples/patterns/{p}" in readme and "**Problem.**" in readme and "**Solution.**" in readme


@pytest.mark.parametrize("example", EXAMPLES)
def test_lint_is_clean_and_asyncapi_valid(example, capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["lint", "--fail-on", "warning", example]) == 0, capsys.readouterr().out
    assert "no findings" in capsys.readouterr().out
    assert main(["graph", example, "--format", "asyncapi"]) == 0
    doc = json.loads(capsys.readouterr().out)
    errors = list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(doc))
    assert not errors, [e.message[:200] for e in errors[:5]]
    assert doc["asyncapi"] == "3.0.0" and doc["channels"] and doc["operations"]
