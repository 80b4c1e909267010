"""The docs hold together: every file in docs/ is used, and every file the guarantees cite exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_file_in_docs_is_referenced() -> None:
    sources = [ROOT / "README.md", *ROOT.glob("choreo/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/**/*.py")]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources if p.name != "test_docs.py")
    unused = [p.name for p in sorted((ROOT / "docs").iterdir()) if f"docs/{p.name}" not in text]
    assert not unused, f"files in docs/ that nothing refers to: {unused}"


def test_every_file_the_guarantees_cite_exists() -> None:
    """A guarantee is only as good as the test it names: a renamed or deleted test file shows up here."""
    cited = {
        path
        for doc in ("README.md", "docs/guarantees.md")
        for path in re.findall(r"`((?:tests|bench|choreo)/[\w/]+\.py)`", (ROOT / doc).read_text(encoding="utf-8"))
    }
    assert len(cited) > 20
    missing = sorted(p for p in cited if not (ROOT / p).is_file())
    assert not missing, f"files the README or docs/guarantees.md cite that do not exist: {missing}"
