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


def draw(figures: Figures, path: Path = CHART) -> Path | None:
    """Write the chart; None (and nothing written) when there is no scaling figure or no matplotlib."""
    if not any(k.startswith("scale.") for k in figures):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    fig, grid = plt.subplots(2, 3, figsize=(16, 8.5))
    axes = list(grid.flat)
    raw = figures.get("e2e.raw_pushpull_per_s")
    raw_k = raw / 1000 if isinstance(raw, (int, float)) else None

    def panel(ax, dimension: str, title: str, xlabel: str, log_x: bool = True, raw_line: bool = True) -> None:
        pts = series(figures, dimension, "events_per_s")
        if pts:
            ax.plot([p for p, _ in pts], [v / 1000 for _, v in pts], "o-", label="choreo events/s")
        if raw_line and raw_k is not None:
            ax.axhline(raw_k, color="gray", linestyle=":", label="raw PUSH/PULL, 100 B (e2e run)")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("thousand events/s")
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)

    panel(axes[0], "keys", "distinct keys (RSS of the consumer in red)", "keys")
    axes[0].set_ylim(bottom=0)
    rss = series(figures, "keys", "consumer_rss_mb")
    if rss:
        twin = axes[0].twinx()
        twin.plot([p for p, _ in rss], [v for _, v in rss], "s--", color="tab:red", label="consumer RSS (MiB)")
        twin.set_ylabel("consumer RSS, MiB", color="tab:red")
        twin.set_ylim(bottom=0)
    panel(axes[1], "window", "credit window", "window (envelopes in flight per channel)")
    axes[1].set_ylim(bottom=0)
    panel(axes[2], "payload", "payload size, beside raw PUSH/PULL of it", "encoded event, bytes", raw_line=False)
    base = series(figures, "payload", "raw_pushpull_per_s")
    if base:
        axes[2].plot([p for p, _ in base], [v / 1000 for _, v in base], "^:", color="gray", label="raw PUSH/PULL")
    axes[2].set_yscale("log")
    panel(axes[3], "consumers", "consumer instances (2 cores: no room to scale out)", "instances", log_x=False)
    axes[3].set_ylim(bottom=0)
    panel(axes[4], "fanout", "subscribing services (one process each)", "services", log_x=False)
    fan = series(figures, "fanout", "deliveries_per_s")
    if fan:
        axes[4].plot([p for p, _ in fan], [v / 1000 for _, v in fan], "s--", label="deliveries/s (events x services)")
    axes[4].set_ylim(bottom=0)
    # the cost of each guarantee: the end-to-end variants
    bars = [("raw\nPUSH/PULL", raw), ("choreo\nall on", figures.get("e2e.events_per_s"))]
    for variant, label in (("no_dedup", "dedup\noff"), ("no_order", "per-key\norder off"),
                           ("no_tracing", "tracing\noff"), ("no_guarantees", "all three\noff")):
        bars.append((label, figures.get(f"e2e.{variant}.events_per_s")))
    bars = [(label, v) for label, v in bars if isinstance(v, (int, float))]
    ax = axes[5]
    if bars:
        ax.bar([b[0] for b in bars], [b[1] / 1000 for b in bars],
               color=["gray"] + ["tab:blue"] * (len(bars) - 1))
    ax.set_title("end to end, each guarantee off in turn (acks stay on)")
    ax.set_ylabel("thousand events/s")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[:5]:
        ax.legend(fontsize=7, loc="best")
    machine = f"{figures.get('machine.cpu', '?')} ({figures.get('machine.cores', '?')} cores), {figures.get('machine.date', '')}"
    fig.suptitle("choreo: how throughput grows (keyed 100-byte events, 1,000 keys, acks + dedup + per-key order "
                 f"unless said; every node its own process, one host) - {machine} - make bench", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
