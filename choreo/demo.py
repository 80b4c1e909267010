"""``make demo``: the shop, every service its own process, watched live, then explained.

    python -m choreo.demo                        # 600 checkouts at 60 a second: about 20 s in all
    python -m choreo.demo --orders 100 --rate 0  # as fast as the phones go
    python -m choreo.demo --no-live              # no live view: just the story afterwards

How this works, in order:

1. :class:`choreo.up.System` starts ``examples/shop``: seven service processes (api x2, orders,
   inventory, payments, shipping, notifications), and waits until every node sees every other.
2. The shop's own driver (``examples.shop.drive``: phones checking out over a flaky connection,
   retrying under new request ids, sometimes tapping twice; seeded) runs with a client node of
   this process. Meanwhile a live view asks every node for its ``stats`` (as ``choreo top``
   does) and shows the progress, checkouts per second, and per service: messages in and done
   per second, in flight, lag, duplicates dropped. On a terminal it is redrawn in place (plain
   ANSI); otherwise (CI, a pipe) it is one line every few seconds.
3. Then the story: the driver's verdict (every order placed once?), the flow graph (the
   analyzer's text tree, as ``choreo graph examples.shop``), how many of the phones' retries
   were deduplicated, and the trace of one retried checkout across the mesh (as ``choreo
   trace``), where the retry's CreateOrder shows as deduplicated.
4. Every process is stopped: SIGTERM (each drains, then leaves), SIGKILL for any that lingers.

Ctrl-C (or SIGTERM) at any point stops every process the demo started; a second one kills
them at once. Exit status: 0; 1 when the shop ended inconsistent or a service died; 130 after
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import io
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from .terminal import Style, plural, style_for

__all__ = ["Live", "main"]

REPO = Path(__file__).resolve().parent.parent
SHOP = REPO / "examples" / "shop"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


# ================================================================================ the live view


class Live:
    """Progress and per-service rates while the driver runs: a frame redrawn in place on a
    terminal, a line every ``interval`` seconds otherwise.

    ``progress(done, total)`` is the driver's callback; :meth:`run` samples the mesh and draws
    until cancelled; :meth:`finish` draws the last frame.
    """

    def __init__(self, system: Any, services: list[tuple[str, int]], total: int, *, out: IO[str], tty: bool,
                 style: Style, interval: float) -> None:  # fmt: skip
        self.system = system
        self.services = services  # (service, instances), in the example's order
        self.total = total
        self.done = 0
        self.out = out
        self.tty = tty
        self.style = style
        self.interval = interval
        self.started = time.monotonic()
        self._drawn = 0  # lines of the last frame (to draw over it)
        self._previous: Any = None  # the last sample (rates are differences of counters)
        self._first: Any = None  # the first one (the last frame shows averages over the run)
        self._marks: list[tuple[float, int]] = []  # (time, checkouts done) at each frame
        self._completed: float | None = None  # when the last checkout was done
        if tty:
            self._write(HIDE_CURSOR)

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if done == total and self._completed is None:
            self._completed = time.monotonic()

    async def run(self) -> None:
        while True:
            await self.frame()
            await asyncio.sleep(self.interval)

    async def frame(self, final: bool = False) -> None:
        """Sample the mesh and draw; the ``final`` frame shows averages since the first sample."""
        from .observe.top import sample, table

        try:
            current = await asyncio.to_thread(sample, self.system.seed, 2.0)
        except Exception:  # the mesh is being stopped under us: nothing to show this time
            return
        view = table(current, self._first if final else self._previous)
        self._previous = current
        if self._first is None:
            self._first = current
        now = time.monotonic()
        self._marks.append((now, self.done))
        self._draw(view, now, final)

    async def finish(self) -> None:
        await self.frame(final=True)
        self.close()

    def close(self) -> None:
        if self.tty:
            self._write(SHOW_CURSOR)
            self.tty = False

    # -- drawing -------------------------------------------------------------------------------

    def _rate(self, now: float) -> float | None:
        """Checkouts per second: over the last second and a half while they run, then on average."""
        if self._completed is not None:
            return self.total / max(self._completed - self.started, 1e-9)
        self._marks = self._marks[-8:]
        earlier = [(t, d) for t, d in self._marks[:-1] if now - t <= 1.5] or self._marks[-2:-1]
        if not earlier:
            return None
        then, done = earlier[0]
        return (self.done - done) / (now - then) if now > then else None

    def _rows(self, view: dict[str, Any]) -> list[tuple[str, int, dict[str, Any] | None]]:
        by_name = {s["service"]: s for s in view["services"]}
        return [(name, n, by_name.get(name)) for name, n in self.services]

    def _draw(self, view: dict[str, Any], now: float, final: bool) -> None:
        if self.tty:
            lines = self._frame_lines(view, now, final)
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self._write(up + "\x1b[J" + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self._write(self._line(view, now, final) + "\n")

    def _frame_lines(self, view: dict[str, Any], now: float, final: bool) -> list[str]:
        paint = self.style.paint
        width = shutil.get_terminal_size((100, 24)).columns
        bar_width = max(10, min(40, width - 50))
        filled = int(bar_width * self.done / self.total) if self.total else bar_width
        full, empty = ("█", "░") if self.style.unicode else ("#", ".")
        bar = paint(full * filled, "green") + paint(empty * (bar_width - filled), "dim")
        rate = self._rate(now)
        lines = [
            f"  checkouts [{bar}] {self.done:>5}/{self.total:<5} {_num(rate):>6}/s   {now - self.started:5.1f} s",
            "",
            paint(f"  {'SERVICE':<18}{'IN/s':>8}{'DONE/s':>8}{'IN FLIGHT':>11}{'LAG':>6}{'DEDUP':>7}", "bold")
            + (paint("   rates: averages over the run", "dim") if final else ""),
        ]
        for name, n, s in self._rows(view):
            label = f"{name} x{n}" if n > 1 else name
            if s is None:
                lines.append(f"  {label:<18}{'(no answer)':>8}")
                continue
            text = (
                f"  {label:<18}{_num(s['received_per_s']):>8}{_num(s['processed_per_s']):>8}"
                f"{s['in_flight']:>11}{s['lag']:>6}"
            )
            dedup = f"{s['dedup_hits']:>7}"
            lines.append(text + (paint(dedup, "magenta", "bold") if s["dedup_hits"] else dedup))
        return lines

    def _line(self, view: dict[str, Any], now: float, final: bool) -> str:
        """One line: progress, messages done per second per service, then in flight, lag and
        duplicates dropped (totals, and which services when not zero)."""
        rows = [(name, s) for name, _, s in self._rows(view)]

        def per_service(field: str) -> str:
            some = [(name, s[field]) for name, s in rows if s is not None and s[field]]
            total = sum(v for _, v in some)
            return f"{total} ({', '.join(f'{name} {v}' for name, v in some)})" if some else "0"

        done = ", ".join(f"{name} {_int(s['processed_per_s']) if s else '?'}" for name, s in rows)
        return (
            f"  [{now - self.started:5.1f} s] {self.done}/{self.total} checkouts, {_int(self._rate(now))}/s"
            f" | done/s{' (average)' if final else ''}: {done} | in flight {per_service('in_flight')} | lag {per_service('lag')}"
            f" | dedup {per_service('dedup_hits')}"
        )

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


# ================================================================================ the story


def _section(title: str, style: Style) -> str:
    rule = "─" if style.unicode else "-"
    return "\n" + style.paint(f"{rule * 3} {title} ", "bold") + style.paint(rule * max(3, 76 - len(title)), "dim")


def _graph(style: Style, module: str) -> str:
    from .analyzer import analyze, load_spec, render

    spec, name = load_spec(module)
    return str(render(analyze(spec, name=name), "text", style))


def _dedup_story(out: Any, api_processed: int) -> str:
    """How the phones' retries became one order each (from the driver's outcome and the nodes' counters)."""
    retries = out.attempts - out.checkouts
    created = out.numbered
    verdict = "every checkout placed once" if created == out.checkouts and not out.problems else "NOT once each"
    return "\n".join([
        (f"  retries  {retries} = {out.lost} answers lost (the phone tried again, under a new request id)"
         f" + {out.double_taps} double taps"),
        f"  api      ran all {api_processed} attempts: each is a new request, nothing to deduplicate there",
        (f"  orders   deduplicated {out.orders_deduplicated} CreateOrders (same idempotency key: customer + cart):"
         " not run again"),
        f"  result   {created} orders for {out.checkouts} checkouts: {verdict}",
    ])  # fmt: skip


def _pick_checkout(out: Any) -> tuple[str, str] | None:
    """(order id, trace id) of a retried checkout that went all the way (shipped): the latest one."""
    if not out.traces:
        return None
    retried = out.retried or list(out.traces)
    shipped = [oid for oid in retried if (v := out.views.get(oid)) is not None and v.status == "shipped"]
    oid = (shipped or retried)[-1]
    return oid, out.traces[oid]


async def _complete_trace(seed: str, trace_id: str, timeout: float = 5.0) -> Any:
    """The trace, once nothing of it runs any more and the retry's duplicate is in (bounded)."""
    from .observe.commands import fetch_trace
    from .observe.mesh import mesh_spec

    spec = await asyncio.to_thread(mesh_spec, seed, 5.0)
    deadline = time.monotonic() + timeout
    while True:
        trace = await asyncio.to_thread(fetch_trace, seed, trace_id, 5.0, spec)
        if (trace.steps and trace.status != "running" and trace.duplicates) or time.monotonic() > deadline:
            return trace
        await asyncio.sleep(0.05)


# ================================================================================ the run


async def _drive(system: Any, args: argparse.Namespace, style: Style, out: IO[str]) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted: list[str] = []

    def on_signal(name: str) -> None:
        if interrupted:
            system.kill_all()
            return
        interrupted.append(name)
        main.cancel()

    for sig, name in ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")):
        loop.add_signal_handler(sig, on_signal, name)

    tty = out.isatty() and not args.no_live
    interval = args.interval or (0.5 if tty else 2.0)
    services = [(name, n) for name, _, n in system.example.services]
    live = None if args.no_live else Live(system, services, args.orders, out=out, tty=tty, style=style,
                                          interval=interval)  # fmt: skip
    options: dict[str, Any] = {"orders": args.orders, "phones": args.phones, "loss": args.loss,
                               "double_tap": args.double_tap, "seed": args.seed, "rate": args.rate, "report": False}  # fmt: skip
    if live is not None:
        options["progress"] = live.progress
    pace = f"{args.rate:g} a second" if args.rate > 0 else "as fast as they go"
    print(_section("the phones check out" + (", live" if live is not None else ""), style), file=out)
    print(f"  {args.phones} phones check out {args.orders} carts, {pace}; {args.loss:.0%} of answers are lost "
          f"and retried, {args.double_tap:.0%} of taps are double (seed {args.seed})\n", file=out, flush=True)  # fmt: skip
    work = asyncio.ensure_future(system.drive(**options))
    watch = asyncio.ensure_future(_watch(system))
    ticker = asyncio.ensure_future(live.run()) if live is not None else None
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await live.finish()  # type: ignore[union-attr]
        if watch in done:
            print(f"error: {watch.result()}", file=out, flush=True)
            return 1
        if not done:
            print(f"error: the shop's driver did not finish within {args.timeout:.0f} s", file=out, flush=True)
            return 1
        return await _story(system, work.result(), style, out)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        if live is not None:
            live.close()
        print(f"\n{interrupted[0]}: stopping every process", file=out, flush=True)
        return 130
    finally:
        if live is not None:
            live.close()
        for task in (work, watch, ticker):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (work, watch, ticker) if t is not None), return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _story(system: Any, result: Any, style: Style, out: IO[str]) -> int:
    from .observe.trace_view import render_text

    print_report = importlib.import_module(system.example.module + ".mobile").print_report

    print(_section("the outcome (what the shop's driver checked)", style), file=out, flush=True)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        print_report(result, system)
    print("".join(f"  {line}" for line in report.getvalue().splitlines(keepends=True)), file=out, end="", flush=True)

    print(_section(f"the flow graph (choreo graph {system.example.module})", style), file=out)
    print(await asyncio.to_thread(_graph, style, system.example.module), file=out, end="", flush=True)

    print(_section("the retries, deduplicated", style), file=out)
    print(_dedup_story(result, system.total("processed", "api")), file=out, flush=True)

    picked = _pick_checkout(result)
    if picked is not None:
        oid, trace_id = picked
        print(_section(f"one retried checkout, {oid} (choreo trace {trace_id} --peer {system.seed})", style),
              file=out)  # fmt: skip
        trace = await _complete_trace(system.seed, trace_id)
        if trace.steps:
            print(render_text(trace, style), file=out, end="", flush=True)
        else:
            print(f"(no node remembers trace {trace_id})", file=out, flush=True)
    return 1 if result.problems else 0


async def _watch(system: Any) -> str:
    """Returns (a description) when a service process exits without being asked to."""
    while True:
        failed = system.failed()
        if failed:
            inst = failed[0]
            tail = inst.proc.stderr().strip().splitlines()[-15:]
            return f"{inst.name} (pid {inst.pid}) exited with status {inst.returncode}" + (
                ":\n    " + "\n    ".join(tail) if tail else ""
            )
        await asyncio.sleep(0.1)


def _style(mode: str, stream: IO[str]) -> Style:
    return style_for(stream, mode, sample="├─└│★✗█░")


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    from .up import System, load_example

    style = _style(args.color, out)
    # the clone's shop wherever the demo runs from; after pip install, the copy installed with choreo
    example = load_example(str(SHOP) if (SHOP / "__init__.py").is_file() else "examples.shop")
    total = sum(n for _, _, n in example.services)
    print(style.paint("choreo demo", "bold") + f": {example.doc}", file=out)
    print(_section(f"starting {plural(total, 'process', 'processes')}, one per service instance", style), file=out, flush=True)

    system = System(example, log=lambda line: print(f"  {line}", file=out, flush=True))
    interrupted: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:  # outside the event loop: starting, stopping
        if interrupted:  # the second one: no more waiting
            system.kill_all()
            return
        interrupted.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    status = 1
    try:
        system.start()  # stops what it started if it fails or is interrupted
        print(f"  the mesh: {system.seed} (try choreo top --peer {system.seed} while it runs)", file=out, flush=True)
        status = asyncio.run(_drive(system, args, style, out))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=out, flush=True)
        status = 130
    except Exception:  # a service that would not start, a driver that raised: said, then stopped
        out.flush()
        traceback.print_exc()
        status = 1
    finally:
        interrupted.append(0)  # from here on, Ctrl-C kills at once (the event loop had its own handlers)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        _stop(system, out, style, keep_logs=status == 1)
    if status == 0:
        print(_section("next (with the venv active: . .venv/bin/activate)", style), file=out)
        print("  choreo graph examples.shop -o shop.svg                      # the flow graph, drawn", file=out)
        print("  choreo up examples/shop --port 7400 -o orders=100000 -o rate=30   # the shop, paced (Ctrl-C stops); then:",
              file=out)  # fmt: skip
        print("  choreo top --peer tcp://127.0.0.1:7400                      # in another terminal", file=out)
        print("  choreo traces --peer tcp://127.0.0.1:7400                   # recent flows, with their ids", file=out)
        print("  choreo trace TRACE_ID --peer tcp://127.0.0.1:7400           # one flow across the mesh", file=out)
        print("  choreo graph --peer tcp://127.0.0.1:7400 --live             # the map of the running shop", file=out)
        out.flush()
    return status


def _stop(system: Any, out: IO[str], style: Style, keep_logs: bool) -> None:
    running = system.running()
    if running:
        print(_section(f"stopping {plural(len(running), 'process', 'processes')}", style), file=out, flush=True)
    started = time.monotonic()
    statuses = system.stop(timeout=10.0)
    system.cleanup_logs(keep=keep_logs)
    if keep_logs and system.instances:
        logs = ", ".join(f"{i.name} {i.proc.stderr_path}" for i in system.instances if i.proc.stderr_path)
        print(f"  the processes' logs (stderr) are kept: {logs}", file=out, flush=True)
    left = [i for i in system.instances if i.alive()]
    if left:  # cannot happen (stop kills what does not exit); said loudly if it ever does
        print(f"error: still running: {', '.join(f'{i.name} pid {i.pid}' for i in left)}", file=sys.stderr, flush=True)
    elif running:
        exits = ", ".join(f"{name} {'exit ' + str(code) if code is not None else 'killed'}"
                          for name, code in statuses.items())  # fmt: skip
        print(f"  all {len(statuses)} stopped in {time.monotonic() - started:.1f} s: {exits}", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m choreo.demo",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Ctrl-C stops every process the demo started. Exit status: 0; 1 when the shop ended "
        "inconsistent or a service died; 130 after Ctrl-C.",
    )
    parser.add_argument("--orders", type=int, default=600, help="checkouts to drive (default 600)")
    parser.add_argument("--rate", type=float, default=60.0,
                        help="checkouts begun per second over all phones; 0: as fast as they go (default 60)")
    parser.add_argument("--phones", type=int, default=8, help="phones checking out at once (default 8)")
    parser.add_argument("--loss", type=float, default=0.3, help="share of answers lost, so retried (default 0.3)")
    parser.add_argument("--double-tap", type=float, default=0.1, help="share of double taps (default 0.1)")
    parser.add_argument("--seed", type=int, default=7, help="the carts, losses and taps follow from it (default 7)")
    parser.add_argument("--no-live", action="store_true", help="no live view while the phones check out")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between live frames (default 0.5 on a terminal, 2 otherwise)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up driving after this many seconds (120)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="colour: auto (on a terminal, unless NO_COLOR is set), always, never")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("orders", "phones"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("loss", "double_tap"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.rate < 0 or args.interval < 0 or args.timeout <= 0:
        parser.error("--rate and --interval must be >= 0, --timeout > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
