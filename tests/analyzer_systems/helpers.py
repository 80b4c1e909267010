"""Helpers shared by the analyzer tests."""

from __future__ import annotations

import importlib
import linecache

from choreo import Service
from choreo.analyzer import Analysis, Finding, Location, analyze
from choreo.spec import system_spec


def analysis_of(*services: Service, name: str = "test") -> Analysis:
    """Analyze services declared in a test."""
    return analyze(system_spec(services), name=name)


def findings(analysis: Analysis, code: str) -> list[Finding]:
    return [f for f in analysis.findings if f.code == code]


def only(analysis: Analysis, code: str) -> Finding:
    """The one finding of a rule; fails naming every finding when there is not exactly one."""
    found = findings(analysis, code)
    assert len(found) == 1, f"expected one {code} finding, got {[(f.code, f.message) for f in analysis.findings]}"
    return found[0]


def source_line(location: Location) -> str:
    """The source text at a finding's module:line (so a test checks it points at the declaration)."""
    module = importlib.import_module(location.module)
    text = linecache.getline(module.__file__ or "", location.line).strip()
    assert text, f"{location} points at no source line"
    return text


def location(finding: Finding, what: str) -> Location:
    for loc in finding.locations:
        if loc.what == what:
            return loc
    raise AssertionError(f"{finding.code} has no location for {what!r}: {[str(loc) for loc in finding.locations]}")
