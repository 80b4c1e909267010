"""docs/bench-scaling.png reads at a glance: a legend per panel, whole-number ticks, nothing on the frame.

The chart is drawn from bench/results.json (the figures of the last ``make bench``); the test
draws it the same way and looks at the panels, not at pixels.
"""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the 'bench' extra)")

from bench.chart import _count, _size, figure  # noqa: E402
from bench.results import load  # noqa: E402


def test_every_panel_has_a_legend_and_no_series_on_its_frame() -> None:
    import matplotlib.pyplot as plt

    fig = figure(load())
    assert fig is not None, "bench/results.json holds the scaling figures"
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 6
        for ax in panels:
            assert ax.get_legend() is not None, f"panel {ax.get_title()!r} has no legend"
        for ax in fig.axes:  # the memory axis too
            low, high = ax.get_ylim()
            room = 0.95 if ax.get_yscale() == "linear" else 1.0
            for line in ax.get_lines():
                ys = list(line.get_ydata())
                assert low <= min(ys) and max(ys) < high * room, f"{ax.get_title()}: {line.get_label()} on the frame"
        by_title = {ax.get_title(): ax for ax in panels}
        for title in ("Consumer instances (2 cores)", "Subscribing services"):
            ticks = by_title[title].get_xticks()
            assert all(float(t).is_integer() for t in ticks), f"{title}: ticks {ticks}"
    finally:
        plt.close(fig)


def test_tick_labels() -> None:
    assert [_count(v) for v in (10, 1000, 100_000, 1_000_000)] == ["10", "1k", "100k", "1M"]
    assert [_size(v) for v in (16, 256, 4096, 65536)] == ["16 B", "256 B", "4 KiB", "64 KiB"]
