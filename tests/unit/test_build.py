"""The compiled core is what runs, unless the pure twin was asked for on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import choreo.core
import choreo.transport


def test_compiled_core_is_in_use_unless_pure_was_requested(expect_compiled_core: bool) -> None:
    expected = "compiled" if expect_compiled_core else "pure"
    assert choreo.core.IMPLEMENTATION == expected, (
        f"expected the {expected} core, got {choreo.core.IMPLEMENTATION}: is choreo._core built? run 'make test'"
    )


def test_the_transport_reads_through_the_compiled_module_unless_pure_was_requested(expect_compiled_core: bool) -> None:
    expected = "compiled" if expect_compiled_core else "pyzmq"
    assert choreo.transport.IO_IMPLEMENTATION == expected, (
        f"expected the {expected} reads, got {choreo.transport.IO_IMPLEMENTATION}: is choreo._zmqio built?"
    )


def test_pure_core_is_selected_by_environment() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import choreo.core; print(choreo.core.IMPLEMENTATION)"],
        env={**os.environ, "CHOREO_PURE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "pure"


def test_missing_compiled_core_fails_with_the_build_command() -> None:
    # Hide choreo._core behind an import hook and check the message tells how to build it.
    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "choreo._core":
                    raise ImportError("hidden by the test")
        sys.meta_path.insert(0, Hide())
        try:
            import choreo.core
        except ImportError as exc:
            print(exc)
        else:
            print("imported", choreo.core.IMPLEMENTATION)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "CHOREO_PURE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "choreo._core is not built" in out.stdout
    assert "pip install -e ." in out.stdout and "CHOREO_PURE=1" in out.stdout
