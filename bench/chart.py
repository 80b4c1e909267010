"""The scaling curves of bench/results.json as one PNG (``docs/bench-scaling.png``).

Drawn by ``python -m bench.report`` from the figures ``scale.<dimension>.<point>.*`` that
bench/test_scaling.py records; never edited by hand. Needs matplotlib (the ``bench`` extra);
without it the chart is skipped with a note.
"""

from __future__ import annotations

from pathlib import Path

CHART = Path(__file__).resolve().parent.parent / "docs" / "bench-scaling.png"

Figures = dict[str, object]


def series(figures: Figures, dimension: str, what: str) -> list[tuple[float, float]]:
    """``[(point, value)]`` of ``scale.<dimension>.<point>.<what>``, sorted by point."""
    out = []
    prefix = f"scale.{dimension}."
    for name, value in figures.items():
        if name.startswith(prefix) and name.endswith("." + what) and isinstance(value, (int, float)):
            point = name[len(prefix) : -len(what) - 1]
            if point.isdigit():
                out.append((float(point), float(value)))
    return sorted(out)


def _count(value: float) -> str:
    """Tick labels a person reads at a glance: 10, 1k, 100k, 1M (no powers of ten)."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:g}{suffix}"
    return f"{value:g}"


def _size(value: float) -> str:
    """16 B, 256 B, 4 KiB, 64 KiB."""
    for shift, unit in ((20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            return f"{value / (1 << shift):g} {unit}"
    return f"{value:g} B"


def _headroom(ax, top: float, factor: float = 1.18) -> None:  # type: ignore[no-untyped-def]
    """From zero to a little above the highest point: no series on the frame, room for the legend."""
    ax.set_ylim(0, top * factor if top > 0 else 1)


def draw(figures: Figures, path: Path = CHART) -> Path | None:
    """Write the chart; None (and nothing written) when there is no scaling figure or no matplotlib."""
    fig = figure(figures)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure(figures: Figures):  # type: ignore[no-untyped-def]
    """The chart as a matplotlib Figure (None without scaling figures or matplotlib).

    Six panels, each with its own legend: throughput by distinct keys (with the consumer's memory),
    by credit window, by payload size (beside raw PUSH/PULL of the same size), by consumer
    instances and by subscribing services (ticks where measured: whole numbers), and what each
    guarantee costs. Every axis starts at zero (or spans the data, on log scales) with room above
    the highest point, so no series is drawn on the frame.
    """
    if not any(k.startswith("scale.") for k in figures):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        return None

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9.5, "axes.titleweight": "bold"})
    fig, grid = plt.subplots(2, 3, figsize=(16, 9.5))
    axes = list(grid.flat)
    raw = figures.get("e2e.raw_pushpull_per_s")
    raw_k = raw / 1000 if isinstance(raw, (int, float)) else None
    count_labels = FuncFormatter(lambda v, _: _count(v))

    def points_on_x(ax, points: list[float], log: bool) -> None:  # type: ignore[no-untyped-def]
        if log:
            ax.set_xscale("log")
            ax.set_xlim(min(points) / 2, max(points) * 2)
        else:
            ax.set_xlim(min(points) - 0.5, max(points) + 0.5)
        ax.xaxis.set_major_locator(FixedLocator(points))  # ticks where measured: whole numbers only
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(count_labels)

    def panel(ax, dimension: str, title: str, xlabel: str, log_x: bool = True, raw_line: bool = True) -> float:  # type: ignore[no-untyped-def]
        pts = series(figures, dimension, "events_per_s")
        top = 0.0
        if pts:
            ys = [v / 1000 for _, v in pts]
            ax.plot([p for p, _ in pts], ys, "o-", color="tab:blue", label="choreo, events/s")
            points_on_x(ax, [p for p, _ in pts], log_x)
            top = max(ys)
        if raw_line and raw_k is not None:
            ax.axhline(raw_k, color="gray", linestyle=":", label="raw PUSH/PULL, 100 B (no guarantees)")
            top = max(top, raw_k)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("thousand events per second")
        ax.grid(True, alpha=0.3)
        return top

    # 1. distinct keys, with the consumer's memory on its own axis
    ax = axes[0]
    top = panel(ax, "keys", "Distinct keys", "distinct keys")
    _headroom(ax, top, 1.35)
    rss = series(figures, "keys", "consumer_rss_mb")
    handles, labels = ax.get_legend_handles_labels()
    if rss:
        twin = ax.twinx()
        line = twin.plot([p for p, _ in rss], [v for _, v in rss], "s--", color="tab:red", label="consumer memory, MiB (right)")
        twin.set_ylabel("consumer RSS, MiB", color="tab:red")
        twin.tick_params(axis="y", colors="tab:red")
        _headroom(twin, max(v for _, v in rss), 1.6)  # memory is flat: drawn mid-height, not on the frame
        handles, labels = handles + line, labels + [line[0].get_label()]
    ax.legend(handles, labels, loc="lower left")
    # 2. credit window
    top = panel(axes[1], "window", "Credit window", "envelopes in flight per channel")
    _headroom(axes[1], top, 1.35)
    axes[1].legend(loc="upper left")
    # 3. payload size, on log scales, beside raw PUSH/PULL of the same payload
    ax = axes[2]
    panel(ax, "payload", "Payload size", "encoded event, bytes", raw_line=False)
    base = series(figures, "payload", "raw_pushpull_per_s")
    if base:
        ax.plot([p for p, _ in base], [v / 1000 for _, v in base], "^:", color="gray", label="raw PUSH/PULL, same payload")
    ax.set_yscale("log")
    lows = [v / 1000 for _, v in series(figures, "payload", "events_per_s") + base]
    if lows:
        ax.set_ylim(min(lows) / 2, max(lows) * 3)
    ax.yaxis.set_major_formatter(count_labels)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _size(v)))
    ax.legend(loc="lower left")
    # 4. consumer instances
    top = panel(axes[3], "consumers", "Consumer instances (2 cores)", "instances of the consuming service", log_x=False)
    _headroom(axes[3], top)
    axes[3].legend(loc="lower left")
    # 5. subscribing services
    ax = axes[4]
    top = panel(ax, "fanout", "Subscribing services", "services subscribed to the event (one process each)", log_x=False)
    fan = series(figures, "fanout", "deliveries_per_s")
    if fan:
        ys = [v / 1000 for _, v in fan]
        ax.plot([p for p, _ in fan], ys, "s--", color="tab:orange", label="deliveries/s (events x services)")
        top = max(top, *ys)
    _headroom(ax, top, 1.45)
    ax.legend(loc="upper right")
    # 6. the cost of each guarantee: the end-to-end variants
    bars = [("raw\nPUSH/PULL", raw), ("choreo\nall on", figures.get("e2e.events_per_s"))]
    for variant, label in (("no_dedup", "dedup\noff"), ("no_order", "per-key\norder off"),
                           ("no_tracing", "tracing\noff"), ("no_guarantees", "all three\noff")):  # fmt: skip
        bars.append((label, figures.get(f"e2e.{variant}.events_per_s")))
    bars = [(label, v) for label, v in bars if isinstance(v, (int, float))]
    ax = axes[5]
    if bars:
        heights = [b[1] / 1000 for b in bars]
        colours = ["gray"] + ["tab:blue"] * (len(bars) - 1)
        drawn = ax.bar([b[0] for b in bars], heights, color=colours)
        ax.bar_label(drawn, labels=[f"{h:.0f}k" for h in heights], padding=2, fontsize=9.5)
        _headroom(ax, max(heights))
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="gray", label="raw PUSH/PULL (no guarantees)"),
                           Patch(color="tab:blue", label="choreo, acks always on")], loc="upper right")  # fmt: skip
    ax.set_title("What each guarantee costs")
    ax.set_ylabel("thousand events per second")
    ax.tick_params(axis="x", labelsize=9.5)
    ax.grid(True, axis="y", alpha=0.3)
    machine = f"{figures.get('machine.cpu', '?')} ({figures.get('machine.cores', '?')} cores), {figures.get('machine.date', '')}"
    fig.suptitle(
        "choreo end to end: keyed 100-byte events, 1,000 keys, acks + dedup + per-key order unless said; "
        f"every node its own process on one host\n{machine}; drawn by bench/chart.py from bench/results.json (make bench)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # redraw from the figures already measured: python -m bench.chart
    from bench.results import load

    print(draw(load()) or "no scaling figures in bench/results.json (or no matplotlib)")
