"""``choreo up``: run an example system, every service as its own process, and drive it.

    $ choreo up examples/shop                      # start, drive the scenario, stop; exit status of the driver
    $ choreo up examples.shop -o orders=500 -o loss=0.5
    $ choreo up examples/products --no-drive --port 7400   # just run it (Ctrl-C stops); join at tcp://127.0.0.1:7400
    $ choreo up examples/shop --secure             # the same over CURVE, with a key per process (made for the run)

How this works: the example package says what to run (``SYSTEM``, ``drive``...: see
:mod:`choreo.up`). The seed starts first, the other instances in parallel; once every node sees
every other, the driver runs in this process with a client node of its own. Meanwhile one line
per process shows its state every ``--interval`` seconds. When the driver returns (or on Ctrl-C
or SIGTERM, or when a service process dies) every process is stopped: SIGTERM, so each drains
and leaves, then SIGKILL for any still there after ``--stop-timeout``; a second Ctrl-C kills at
once. No process is left behind. Exit status: the driver's (0 when it returns nothing), 1 when it
raised or a service died, 130 after Ctrl-C; 0 after Ctrl-C when there is no driver (--no-drive).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import signal
import sys
import time
import traceback
from typing import Any

__all__ = ["register", "parse_options", "status_line"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up",
        help="run an example system: every service as its own process, then its driver",
        description="Run an example system: every service as its own process, then its driver.\n\n"
        + __doc__.split("\n\n")[2].replace("``", "").replace(":mod:`choreo.up`", "choreo/up.py"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("example", metavar="EXAMPLE", help="an example package: a path (examples/shop) or a module (examples.shop)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the example's driver (repeatable): -o orders=200 -o seed=3")
    p.add_argument("--no-drive", action="store_true", help="do not run the driver: keep the system up until Ctrl-C")
    p.add_argument("--port", type=int, default=None, help="TCP port of the seed node on 127.0.0.1 (default: any free port)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between status lines, one per process (0: only at start and stop; default 2)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="directory for the run's files (event logs, blobs), kept afterwards (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=None, help="stop the driver after this many seconds (exit 1)")
    p.add_argument("--stop-timeout", type=float, default=15.0, help="seconds a process may take to drain (default 15)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level of the service processes (their stderr is shown if one fails)")
    p.add_argument("--secure", action="store_true",
                   help="a secure mesh: CURVE on every socket, a key per process with only its own rights, made in a "
                        "temporary keys directory removed at the end")
    p.set_defaults(func=_up)


def parse_options(pairs: list[str], drive: Any) -> dict[str, Any]:
    """``["orders=200", "name=x"]`` -> ``{"orders": 200, "name": "x"}``, checked against ``drive``'s keywords.

    >>> async def drive(client, system, orders=10, loss=0.3): ...
    >>> parse_options(["orders=200", "loss=0.5"], drive)
    {'orders': 200, 'loss': 0.5}
    """
    from .errors import ChoreoUsageError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ChoreoUsageError(f"-o takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    if options and drive is not None:
        params = inspect.signature(drive).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            known = [n for n, p in list(params.items())[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise ChoreoUsageError(
                    f"the driver takes no option {', '.join(unknown)}; its options: "
                    + (", ".join(f"{n}={params[n].default!r}" for n in known) or "none")
                )
    return options


def status_line(name: str, pid: int, stats: dict[str, Any] | None, state: str = "up") -> str:
    """One process's line: state, processed, duplicates dropped, in flight, lag, failures.

    >>> status_line("orders#1", 4242, {"processed": 120, "duplicates": 3, "in_flight": 0, "lag": {}, "dead_letters": 0})
    'orders#1           pid 4242    up      processed 120    dedup 3    in flight 0     lag 0     dlq 0'
    """
    if stats is None:
        return f"{name:<18} pid {pid:<7} {state}"
    lag = sum(stats.get("lag", {}).values())
    return (
        f"{name:<18} pid {pid:<7} {state:<7} processed {stats.get('processed', 0):<6} dedup {stats.get('duplicates', 0):<4} "
        f"in flight {stats.get('in_flight', 0):<5} lag {lag:<5} dlq {stats.get('dead_letters', 0)}"
    )


def _up(args: argparse.Namespace) -> int:
    from .terminal import plural
    from .up import System, load_example

    example = load_example(args.example)
    options = parse_options(args.option, example.drive)
    drive = example.drive is not None and not args.no_drive

    def say(line: str) -> None:
        print(f"  {line}", flush=True)

    counts = ", ".join(f"{name}" + (f" x{n}" if n > 1 else "") for name, _, n in example.services)
    total = sum(n for _, _, n in example.services)
    print(f"choreo up {example.module}: {example.doc}" if example.doc else f"choreo up {example.module}", flush=True)
    print(f"starting {plural(total, 'process', 'processes')}: {counts}", flush=True)
    system = System(example, data_dir=args.data, port=args.port, log_level=args.log_level, log=say, secure=args.secure)
    status = 1
    ok = False
    try:
        system.start()
        keys = f" --keys {system.keys_dir} --as ops" if system.keys_dir is not None else ""
        print(f"mesh seed {system.seed}: choreo top|trace|graph --peer {system.seed}{keys}", flush=True)
        status = asyncio.run(_main(system, args, options, drive))
        ok = status == 0
    except KeyboardInterrupt:  # Ctrl-C while the processes were starting
        print("interrupted: stopping", flush=True)
        status = 130
    finally:
        _stop(system, args.stop_timeout)
        keep = not ok and status != 130
        system.cleanup_logs(keep=keep)
        if keep:
            print("the processes' logs (stderr) are kept: " + ", ".join(
                f"{i.name} {i.proc.stderr_path}" for i in system.instances if i.proc.stderr_path), flush=True)
    return status


async def _main(system: Any, args: argparse.Namespace, options: dict[str, Any], drive: bool) -> int:
    from .up import exit_status

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted: list[str] = []

    def on_signal(name: str) -> None:
        if interrupted:  # the second Ctrl-C: no more draining
            print(f"{name} again: killing every process", flush=True)
            system.kill_all()
            return
        interrupted.append(name)
        print(f"{name}: stopping", flush=True)
        main.cancel()

    for sig, name in ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")):
        loop.add_signal_handler(sig, on_signal, name)
    ticker = asyncio.ensure_future(_statuses(system, args.interval))
    watch = asyncio.ensure_future(_watch(system))
    started = time.monotonic()
    if drive:
        print(f"driving: {system.example.module}.drive({', '.join(f'{k}={v!r}' for k, v in options.items())})",
              flush=True)
        work = asyncio.ensure_future(system.drive(**options))
    else:
        print("running until Ctrl-C" + (f" (or for {args.timeout:.0f} s)" if args.timeout else ""), flush=True)
        work = asyncio.ensure_future(asyncio.Event().wait())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:  # a service process died
            print(f"error: {watch.result()}", flush=True)
            return 1
        if not done:
            if not drive:
                return 0
            print(f"error: the driver did not finish within {args.timeout:.0f} s", flush=True)
            return 1
        try:
            result = work.result()
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            print(f"driver failed after {time.monotonic() - started:.1f} s", flush=True)
            return 1
        status = exit_status(result)
        print(f"driver finished in {time.monotonic() - started:.1f} s (exit {status})", flush=True)
        return status
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return 0 if not drive else 130
    finally:
        for task in (work, watch, ticker):
            task.cancel()
        await asyncio.gather(work, watch, ticker, return_exceptions=True)  # the driver's node leaves at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # Ctrl-C from here on (while stopping) kills instead of waiting for drains
        signal.signal(signal.SIGINT, lambda *_: system.kill_all())
        signal.signal(signal.SIGTERM, lambda *_: system.kill_all())


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


async def _statuses(system: Any, interval: float) -> None:
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        stats = await asyncio.to_thread(system.stats)
        elapsed = time.monotonic() - system.started_at
        lines = [status_line(i.name, i.pid, stats.get(i.name)) for i in system.running()]
        print(f"[{elapsed:5.1f} s]\n  " + "\n  ".join(lines), flush=True)


def _stop(system: Any, timeout: float) -> None:
    from .terminal import plural

    running = system.running()
    stats = system.stats() if running else {}
    if running:
        print(f"stopping {plural(len(running), 'process', 'processes')} (SIGTERM: each drains what it holds, then leaves)",
              flush=True)  # fmt: skip
    system.stop(timeout=timeout)
    for inst in running:
        print(f"  {status_line(inst.name, inst.pid, stats.get(inst.name), f'exit {inst.returncode}')}", flush=True)
    left = [i for i in system.instances if i.alive()]
    if left:  # cannot happen (stop kills what does not exit); said loudly if it ever does
        print(f"error: still running: {', '.join(f'{i.name} pid {i.pid}' for i in left)}", file=sys.stderr, flush=True)
