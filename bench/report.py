"""Turn bench/results.json into the README's performance table (``python -m bench.report``).

The table goes between the markers ``<!-- bench:start -->`` and ``<!-- bench:end -->`` of
README.md; nothing else in the file is touched. Without the markers the table is printed with a
note on where to put them. Never edit the table by hand: run ``make bench``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.results import RESULTS, load

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
REPRODUCE = "make bench"

Figures = dict[str, object]


def num(figures: Figures, name: str) -> float | None:
    value = figures.get(name)
    return float(value) if isinstance(value, (int, float)) else None


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return f"{text}{unit}"


@dataclass(frozen=True)
class Row:
    figure: str
    what: str
    unit: str
    target: float | None
    higher_is_better: bool
    baseline: Callable[[Figures], str]

    def target_text(self) -> str:
        if self.target is None:
            return "(reported)"
        return f"{'≥' if self.higher_is_better else '≤'} {fmt(self.target, self.unit)}"

    def verdict(self, value: float | None) -> str:
        if value is None or self.target is None:
            return ""
        ok = value >= self.target if self.higher_is_better else value <= self.target
        return "met" if ok else "**missed**"


def _speedup_baseline(op: str) -> Callable[[Figures], str]:
    def text(f: Figures) -> str:
        return (f"pure twin {fmt(num(f, f'core.{op}.pure_ns_per_event'), ' ns')} vs compiled "
                f"{fmt(num(f, f'core.{op}.compiled_ns_per_event'), ' ns')} per event")

    return text


def _sizes(f: Figures, what: str) -> str:
    parts = [fmt(num(f, f"core.{what}.ns_per_op.{s}"), "") for s in ("1k", "10k", "100k", "1m")]
    return "ns per op at 1k / 10k / 100k / 1m: " + " / ".join(parts)


ROWS = [
    Row("core.dedup.speedup_vs_pure", "dedup check-and-insert (insert_envelopes of a 256-envelope batch, "
        "100k live ids)", "x", 5.0, True, _speedup_baseline("dedup")),
    Row("core.window.speedup_vs_pure", "window send + ack (256 appends, flush, on_ack_frame)", "x", 5.0, True,
        _speedup_baseline("window")),
    Row("core.reorder.speedup_vs_pure", "reorder accept + release (feed a 256-envelope batch, complete, "
        "ack_frame)", "x", 5.0, True, _speedup_baseline("reorder")),
    Row("core.per_event.ratio_vs_raw_sendrecv", "core's whole per-event cost (sender + receiver) over one raw "
        "pyzmq send + recv", "", 0.3, False,
        lambda f: (f"raw PUSH/PULL tcp send + recv of 100 B {fmt(num(f, 'raw.sendrecv_ns'), ' ns')} vs core "
                   f"{fmt(num(f, 'core.per_event_ns'), ' ns')} per event")),
    Row("core.dedup.bytes_per_entry", "dedup memory with 1,000,000 live 16-byte ids", " B", 100.0, False,
        lambda f: f"{fmt(num(f, 'core.dedup.memory_mb.1m'), ' MiB')} for the million"),
    Row("core.dedup.flatness", "dedup cost per op, max / min over 1k .. 1m live ids", "", 2.0, False,
        lambda f: _sizes(f, "dedup")),
    Row("core.window.flatness", "window cost per event, max / min over 1k .. 1m in flight", "", 2.0, False,
        lambda f: _sizes(f, "window")),
]


def table(figures: Figures) -> str:
    lines = [
        "| figure | value | target | | baseline, same run | what |",
        "|---|---:|---|---|---|---|",
    ]
    for row in ROWS:
        value = num(figures, row.figure)
        lines.append(f"| `{row.figure}` | {fmt(value, row.unit)} | {row.target_text()} | {row.verdict(value)} | "
                     f"{row.baseline(figures)} | {row.what} |")
    cpu, cores, py, pyzmq, libzmq, date = (str(figures.get(f"machine.{k}", "?"))
                                           for k in ("cpu", "cores", "python", "pyzmq", "libzmq", "date"))
    lines += [
        "",
        f"Measured on {cpu} ({cores} cores), CPython {py}, pyzmq {pyzmq} / libzmq {libzmq}, {date}. "
        "Events in batches of 256, as the runtime feeds the core; each figure is the best round of its "
        "benchmark (the machine is shared; the medians and spreads are in the pytest-benchmark table "
        "printed by the run). Reproduce with `" + REPRODUCE + "`: it rewrites this table from "
        "`bench/results.json`, so do not edit it by hand.",
    ]
    return "\n".join(lines)


def splice(readme: str, body: str) -> str | None:
    """``readme`` with ``body`` between the markers, or None when the markers are missing or out of order."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return readme[: start + len(START)] + "\n" + body + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    figures = load(RESULTS)
    if not figures:
        print(f"no figures in {RESULTS}: run 'make bench' first", file=sys.stderr)
        return 1
    body = table(figures)
    try:
        readme = README.read_text()
    except OSError:
        readme = ""
    new = splice(readme, body)
    if new is None:
        print(body)
        print(f"\n{README} has no '{START}' ... '{END}' markers: put the two lines, in that order, where the "
              "performance table belongs (under a '## Performance' heading), then run 'python -m bench.report' "
              "again. README.md was not changed.", file=sys.stderr)
        return 0
    if new != readme:
        README.write_text(new)
    print(f"performance table written to {README} from {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
