"""Shared test configuration."""

from __future__ import annotations

import os

import pytest

from tests.integration.wheel_build import BUILD, is_simulation, is_wheel_test, session_build


@pytest.fixture(scope="session")
def expect_compiled_core() -> bool:
    """True unless CHOREO_PURE=1 asked for the pure-Python core on purpose."""
    return os.environ.get("CHOREO_PURE") != "1"


# -- the wheel's build, in the background while the simulations run (tests/integration/wheel_build.py)

_BUILD_AT = pytest.StashKey[str]()  # the node id of the test that starts the build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``test_wheel.py`` right after the last simulation, when both are selected (the first
    simulation starts the wheel's build: see :func:`pytest_runtest_setup`)."""
    wheel = [item for item in items if is_wheel_test(item)]
    rest = [item for item in items if not is_wheel_test(item)]
    simulations = [i for i, item in enumerate(rest) if is_simulation(item)]
    if wheel and simulations:
        after = simulations[-1] + 1
        items[:] = [*rest[:after], *wheel, *rest[after:]]
        config.stash[_BUILD_AT] = rest[simulations[0]].nodeid


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The first simulation starts the wheel's build (``test_wheel.py`` waits for it)."""
    if item.config.stash.get(_BUILD_AT, None) == item.nodeid:
        session_build(item.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A build still running (the session stopped early) is stopped; what it made is removed."""
    build = session.config.stash.get(BUILD, None)
    if build is not None:
        build.close()
