"""The observability subcommands: ``choreo trace``, ``choreo top`` and ``choreo dlq``.

How this works: :func:`register` adds the parsers (cheap: nothing heavy is imported until a
command runs). Every command takes ``--peer tcp://HOST:PORT``, one node of a running mesh, and
reaches the rest of the mesh through it (:mod:`choreo.observe.mesh`). A secure mesh is asked
with a key it trusts: ``--peer KEY@tcp://HOST:PORT --keys DIR --as NAME`` (or ``$CHOREO_KEYS``
and ``$CHOREO_KEY``).

    $ choreo traces --peer tcp://127.0.0.1:7000 --failed      # recent flows that failed, with their ids
    $ choreo traces --peer tcp://127.0.0.1:7000 --slow 50 --type PlaceOrder
    $ choreo trace 84759a27c4f2bf7f0100000000000000 --peer tcp://127.0.0.1:7000
    $ choreo trace 00-84759a27...-a9593e141a44b863-01 --peer ... --follow      # a traceparent works too
    $ choreo top --peer tcp://127.0.0.1:7000                    # refreshes every second; Ctrl-C quits
    $ choreo top --peer tcp://127.0.0.1:7000 --json --once      # one machine-readable view
    $ choreo dlq list --peer tcp://127.0.0.1:7000
    $ choreo dlq replay payments#1a2b3c:1 --peer tcp://127.0.0.1:7000

Exit status: 0; ``trace`` 1 when a step of the flow failed; 2 when the mesh cannot be read or
the trace is unknown (``choreo: error: ...``); ``dlq replay`` 1 when a replay was refused or
failed again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import IO, Any

from ..errors import ChoreoUsageError
from ..keys_commands import add_client_key_options

__all__ = ["register", "run_traces", "run_trace", "run_top", "run_dlq"]


def register(subparsers: Any) -> None:
    traces = subparsers.add_parser(
        "traces",
        help="list recent flows of the mesh (status, duration, entry message): the ids for 'choreo trace'",
        description="The recent flows every node of the mesh remembers in its span ring, newest first: each one's "
        "trace id (what 'choreo trace' takes), when it started, whether it succeeded, failed or still runs, how long "
        "it took, how many steps, its entry message and the services it went through. Exit status: 0, 2 when "
        "the mesh cannot be read.",
    )
    _mesh_arguments(traces)
    traces.add_argument("--failed", action="store_true", help="only flows with a step that failed for good")
    traces.add_argument("--slow", type=float, default=None, metavar="MS", help="only flows that took at least MS milliseconds")
    traces.add_argument("--type", default=None, metavar="TYPE", help="only flows with a step of this message type")
    traces.add_argument("--key", default=None, metavar="KEY", help="only flows with a step of this ordering key")
    traces.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="show at most N flows (default 20)")
    traces.add_argument("--json", action="store_true", help="print the choreo-traces/1 JSON document")
    _color_argument(traces)
    traces.set_defaults(func=run_traces)

    trace = subparsers.add_parser(
        "trace",
        help="follow one flow across the mesh: steps, timings, critical path, failing step",
        description="Assemble one flow from the spans every node of the mesh keeps: a tree of steps by cause, "
        "with when each was received, how long it queued and ran, the critical path (starred) and the failing "
        "step with its error. Exit status: 0, 1 when a step failed, 2 when the trace is unknown.",
    )
    trace.add_argument("trace_id", metavar="TRACE_ID", help="the trace id (32 hex digits) or a W3C traceparent")
    _mesh_arguments(trace)
    trace.add_argument("--json", action="store_true", help="print the choreo-trace/1 JSON document")
    trace.add_argument(
        "-f", "--follow", action="store_true", help="refresh while the flow runs, until it is quiet (see --quiet)"
    )
    trace.add_argument("--interval", type=float, default=0.5, help="with --follow: seconds between refreshes (0.5)")
    trace.add_argument(
        "--quiet",
        type=float,
        default=5.0,
        help="with --follow: stop once nothing runs and no new span came for this many seconds (5)",
    )
    trace.add_argument("--max-time", type=float, default=600.0, help="with --follow: stop after this many seconds (600)")
    _color_argument(trace)
    trace.set_defaults(func=run_trace)

    top = subparsers.add_parser(
        "top",
        help="live rates, in-flight, lag, redeliveries and dead letters per service and instance",
        description="Every service and instance of the mesh: ingestion and processing rates (from the change of "
        "their counters), envelopes in flight, consumer lag per partition, redeliveries, dedup hits, backpressure "
        "waits and dead letters; refreshed in place until Ctrl-C.",
    )
    _mesh_arguments(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default: 1)")
    top.add_argument(
        "--once", action="store_true", help="take two samples --interval apart, print one view and exit"
    )
    top.add_argument("--json", action="store_true", help="print the choreo-top/1 JSON document (one line per refresh)")
    top.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default: until Ctrl-C)")
    _color_argument(top)
    top.set_defaults(func=run_top)

    dlq = subparsers.add_parser(
        "dlq",
        help="list, show and replay the dead letters of the mesh",
        description="Dead letters are messages whose handler kept failing after its retries; each node keeps "
        "its own, named NODE:ID. Replay runs a letter's handler again, once.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every dead letter of the mesh, with reason, attempts and payload")
    _mesh_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.add_argument("--no-payload", action="store_true", help="leave the payloads out")
    listing.set_defaults(func=run_dlq)
    show = actions.add_parser("show", help="one dead letter in full: payload, error, traceback")
    show.add_argument("letter", metavar="LETTER", help="NODE:ID as 'choreo dlq list' shows it, or ID when unique")
    _mesh_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_dlq)
    replay = actions.add_parser("replay", help="run dead letters' handlers again, once each")
    replay.add_argument("letters", nargs="*", metavar="LETTER", help="NODE:ID or ID (several allowed)")
    replay.add_argument("--all", action="store_true", help="every dead letter of the mesh (or of --type)")
    replay.add_argument("--type", metavar="TYPE", help="with --all: only letters of this message type")
    replay.add_argument(
        "--wait", type=float, default=10.0, metavar="SECONDS",
        help="how long to wait for each replay's outcome (handled or failed again; default 10, 0: do not wait)",
    )  # fmt: skip
    _mesh_arguments(replay)
    replay.add_argument("--json", action="store_true", help="print JSON")
    replay.set_defaults(func=run_dlq)


def _mesh_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peer", required=True, metavar="tcp://HOST:PORT",
                        help="any node of the mesh (KEY@tcp://HOST:PORT in a secure mesh)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each node (default: 5)")
    add_client_key_options(parser)


def _color_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour: auto (on a terminal, unless NO_COLOR is set), always, never",
    )


def _style(args: argparse.Namespace, stream: IO[str]) -> Any:
    from ..terminal import style_for

    return style_for(stream, args.color, sample="├─└│★✗")


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


_CLEAR = "\x1b[H\x1b[2J"


# ---- traces --------------------------------------------------------------------------------------


def run_traces(args: argparse.Namespace) -> int:
    """``choreo traces --peer P [--failed] [--slow MS] [--type T] [--key K] [-n N] [--json]``."""
    from . import traces
    from .mesh import check_peer

    check_peer(args.peer, args.timeout)
    if args.limit < 1:
        raise ChoreoUsageError(f"--limit must be >= 1, got {args.limit}")
    if args.slow is not None and not args.slow >= 0:
        raise ChoreoUsageError(f"--slow takes milliseconds >= 0, got {args.slow}")
    found = traces.collect(args.peer, args.timeout)
    matching = traces.select(found.flows, failed=args.failed, slow_ms=args.slow, type=args.type, key=args.key)
    shown = matching[: args.limit]
    if args.json:
        _print(json.dumps(traces.to_json(found, shown), indent=2) + "\n")
    else:
        _print(traces.render_text(found, shown, args.peer, _style(args, sys.stdout), shown_of=len(matching)))
    return 0


# ---- trace ---------------------------------------------------------------------------------------


def fetch_trace(peer: str, trace_id: str, timeout: float, spec: Any = None) -> Any:
    """Ask every live node of the mesh for its part of a trace and assemble it."""
    from .mesh import discover, gather
    from .trace_view import assemble

    nodes = discover(peer, timeout)
    answers, answered, unreachable = [], [], []
    for node, answer in gather(nodes, "trace", {"trace_id": trace_id}, timeout):
        if isinstance(answer, Exception):
            unreachable.append({"node": node.name, "endpoint": node.endpoint, "error": str(answer)})
        else:
            answers.append(answer)
            answered.append(node.name)
    trace = assemble(trace_id, answers, spec)
    trace.asked, trace.answered, trace.unreachable = len(nodes), answered, unreachable
    return trace


def run_trace(args: argparse.Namespace) -> int:
    """``choreo trace TRACE_ID --peer P [--json] [--follow]``."""
    from ..tracing import trace_id_of
    from ..keys_commands import use_client_keys
    from .mesh import check_peer, mesh_spec
    from .trace_view import render_text, to_json

    check_peer(args.peer, args.timeout)
    use_client_keys(args)  # --keys/--as: the key to ask a secure mesh with
    try:
        trace_id = trace_id_of(args.trace_id)
    except ValueError as exc:
        raise ChoreoUsageError(str(exc)) from None
    style = _style(args, sys.stdout)
    spec = mesh_spec(args.peer, args.timeout)

    def show(trace: Any, redraw: bool) -> None:
        if args.json:
            _print(json.dumps(to_json(trace), indent=None if args.follow else 2) + "\n")
            return
        text = render_text(trace, style, now=time.time() if args.follow else None)
        if redraw and sys.stdout.isatty():
            _print(_CLEAR + text)
        else:
            _print(("\n" if redraw else "") + text)

    if not args.follow:
        trace = fetch_trace(args.peer, trace_id, args.timeout, spec)
        if not trace.steps:
            raise ChoreoUsageError(_not_found(trace, trace_id))
        show(trace, False)
        return 1 if trace.status == "error" else 0

    start = time.monotonic()
    last_change = start
    last_signature: Any = None
    trace = None
    shown = 0
    try:
        while True:
            trace = fetch_trace(args.peer, trace_id, args.timeout, spec)
            now = time.monotonic()
            signature = [(s.index, s.outcome, s.attempt_count, round(s.finished, 3)) for s in trace.steps
                         if s.outcome not in ("running", "queued")] + [(s.index, s.outcome) for s in trace.steps]  # fmt: skip
            if trace.steps and signature != last_signature:
                show(trace, shown > 0)
                shown += 1
                last_signature = signature
                last_change = now
            if trace.status != "running" and now - last_change >= args.quiet:
                break
            if now - start >= args.max_time:
                break
            time.sleep(max(args.interval, 0.05))
    except KeyboardInterrupt:
        pass
    if trace is None or not trace.steps:
        raise ChoreoUsageError(_not_found(trace, trace_id) if trace else f"trace {trace_id}: nothing seen")
    return 1 if trace.status == "error" else 0


def _not_found(trace: Any, trace_id: str) -> str:
    missing = f"; no answer from {', '.join(u['node'] for u in trace.unreachable)}" if trace.unreachable else ""
    return (
        f"no node of the mesh ({trace.asked} asked) remembers trace {trace_id}{missing}: the id may be wrong, "
        "the flow may not have started yet (try --follow), or its spans may have left the nodes' span rings "
        "(NodeConfig.span_ring)"
    )


# ---- top -----------------------------------------------------------------------------------------


def run_top(args: argparse.Namespace) -> int:
    """``choreo top --peer P [--once] [--json] [--interval S]``."""
    from ..keys_commands import use_client_keys
    from .mesh import check_peer
    from .top import render_text, sample, table

    check_peer(args.peer, args.timeout)
    use_client_keys(args)  # --keys/--as: the key to ask a secure mesh with
    if not args.interval > 0:
        raise ChoreoUsageError(f"--interval must be > 0 seconds, got {args.interval}")
    style = _style(args, sys.stdout)
    tty = sys.stdout.isatty() and not args.json

    def show(view: dict[str, Any], first: bool) -> None:
        if args.json:
            _print(json.dumps(view, indent=2 if args.once else None) + "\n")
        elif tty:
            _print(_CLEAR + render_text(view, args.peer, style))
        else:
            _print(("" if first else "\n") + render_text(view, args.peer, style))

    if args.once:
        previous = sample(args.peer, args.timeout)
        time.sleep(args.interval)
        show(table(sample(args.peer, args.timeout, previous), previous), True)
        return 0
    previous = None
    shown = 0
    try:
        while True:
            current = sample(args.peer, args.timeout, previous)
            show(table(current, previous), shown == 0)
            shown += 1
            if args.count and shown >= args.count:
                break
            previous = current
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


# ---- dlq -----------------------------------------------------------------------------------------


def run_dlq(args: argparse.Namespace) -> int:
    """``choreo dlq list|show|replay --peer P``."""
    from . import dlq
    from ..keys_commands import use_client_keys
    from .mesh import check_peer

    check_peer(args.peer, args.timeout)
    use_client_keys(args)  # --keys/--as: the key to ask a secure mesh with
    if args.dlq_command == "list":
        found = dlq.collect(args.peer, args.timeout, payload=not args.no_payload)
        if args.json:
            _print(json.dumps({"letters": found.letters, "unreachable": found.unreachable}, indent=2, ensure_ascii=False) + "\n")
        else:
            _print(dlq.render_list(found))
        return 0
    found = dlq.collect(args.peer, args.timeout)
    if args.dlq_command == "show":
        letter = dlq.show(dlq.find(found, args.letter), args.timeout)
        if args.json:
            _print(json.dumps(letter, indent=2, ensure_ascii=False) + "\n")
        else:
            _print(dlq.render_show(letter, letter.get("traceback")))
        return 0
    # replay
    if args.all == bool(args.letters):
        raise ChoreoUsageError("choreo dlq replay: name the LETTERs to replay, or give --all (not both)")
    if args.type and not args.all:
        raise ChoreoUsageError("choreo dlq replay: --type selects among --all")
    if args.all:
        chosen = [d for d in found.letters if args.type in (None, d["type"])]
    else:
        chosen = [dlq.find(found, ref) for ref in args.letters]
    if not args.wait >= 0:
        raise ChoreoUsageError(f"--wait must be >= 0 seconds, got {args.wait}")
    replayed, failed = [], []
    for letter in chosen:
        try:
            summary = dlq.replay(letter, args.timeout)
        except Exception as exc:  # refused by the node (gone, or the letter was replayed meanwhile)
            failed.append({"ref": letter["ref"], "error": str(exc)})
            continue
        replayed.append({"ref": letter["ref"], "type": letter["type"], "handler": letter["handler"],
                         "node": letter["node"], "replays": summary.get("replays"), "letter": letter})  # fmt: skip
    for r in replayed:  # all replays are started first; then their outcomes are collected
        letter = r.pop("letter")
        if args.wait > 0:
            try:
                r.update(dlq.outcome(letter, int(r["replays"]), args.timeout, args.wait))
            except Exception as exc:  # the node went away meanwhile
                r.update({"state": "unknown", "error": str(exc), "attempts": None})
        else:
            r.update({"state": "started", "error": None, "attempts": None})
    if args.json:
        _print(json.dumps({"replayed": replayed, "failed": failed}, indent=2) + "\n")
    else:
        said = {
            "handled": "handled",
            "failed": "failed again: {error} (back in the store: 'choreo dlq list')",
            "running": f"still running after {args.wait:g} s: 'choreo dlq list' shows it if it fails",
            "started": "started (not waited for: 'choreo dlq list' shows it if it fails)",
            "gone": "left the store (this node records no spans to tell how it ended)",
            "unknown": "outcome unknown: {error}",
        }
        for r in replayed:
            _print(f"replayed {r['ref']} ({r['type']}, {r['handler']}): " + said[r["state"]].format(**r) + "\n")
        for f in failed:
            _print(f"could not replay {f['ref']}: {f['error']}\n")
        if not chosen:
            _print("no dead letters to replay\n")
    return 1 if failed or any(r["state"] in ("failed", "unknown") for r in replayed) else 0
