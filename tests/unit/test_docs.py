"""Every file in docs/ is used: referenced from the README or from code (nothing stale lies there)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_file_in_docs_is_referenced() -> None:
    sources = [ROOT / "README.md", *ROOT.glob("choreo/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/**/*.py")]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources if p.name != "test_docs.py")
    unused = [p.name for p in sorted((ROOT / "docs").iterdir()) if f"docs/{p.name}" not in text]
    assert not unused, f"files in docs/ that nothing refers to: {unused}"
