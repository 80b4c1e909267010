"""The README's performance tables never show a missed target as equal to it."""

from __future__ import annotations

from bench.report import Row, rows_table


def test_a_value_that_rounds_to_its_target_shows_the_digit_that_decides() -> None:
    higher = Row("e2e.curve.ratio_vs_plain", "", "x", 0.8, True, lambda f: "")
    lower = Row("latency.p99", "", "x", 1.5, False, lambda f: "")
    lines = rows_table({"e2e.curve.ratio_vs_plain": 0.797, "latency.p99": 1.5004}, [higher, lower])
    assert "| 0.797x | ≥ 0.80x | **missed** |" in lines[2]
    assert "| 1.5004x | ≤ 1.50x | **missed** |" in lines[3]
    assert higher.value_text(0.81) == "0.81x" and higher.value_text(0.8) == "0.80x"
    assert lower.value_text(1.49) == "1.49x"
