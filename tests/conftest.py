"""Shared test configuration."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def expect_compiled_core() -> bool:
    """True unless CHOREO_PURE=1 asked for the pure-Python core on purpose."""
    return os.environ.get("CHOREO_PURE") != "1"
