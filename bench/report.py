"""Turn bench/results.json into the README's performance table (``python -m bench.report``).

The tables go between the markers ``<!-- bench:start -->`` and ``<!-- bench:end -->`` of
README.md; nothing else in the file is touched. Without the markers the tables are printed with a
note on where to put them. One table per suite, each under the command that reproduces it; every
row shows the figure, its target, and the baseline measured beside it in the same run. The
scaling curves are drawn to ``docs/bench-scaling.png`` (:mod:`bench.chart`). Never edit the
tables or the chart by hand: run ``make bench`` (and ``make bench-peers``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.chart import CHART
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

    def value_text(self, value: float | None) -> str:
        """The value as the table shows it, with the digits that tell it from its target when it
        rounds to the target's figure (0.797 is not 0.80x).

        >>> Row("r", "", "x", 0.8, True, str).value_text(0.797)
        '0.797x'
        >>> Row("r", "", "x", 0.8, True, str).value_text(0.81)
        '0.81x'
        """
        if value is None or self.target is None or abs(value) >= 100:
            return fmt(value, self.unit)
        digits = 2
        while round(value, digits) == round(self.target, digits) and value != self.target and digits < 6:
            digits += 1
        return fmt(value, self.unit, digits)

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
        "pyzmq send + recv; the sender packs each batch with one append_many()", "", 0.3, False,
        lambda f: (f"raw PUSH/PULL tcp send + recv of 100 B {fmt(num(f, 'raw.sendrecv_ns'), ' ns')} vs core "
                   f"{fmt(num(f, 'core.per_event_ns'), ' ns')} per event")),
    Row("core.per_event.one_call_ratio_vs_raw_sendrecv", "the same, with one append() call per event (the "
        "difference is CPython's 10-argument call)", "", None, False,
        lambda f: (f"raw {fmt(num(f, 'raw.sendrecv_ns'), ' ns')} vs core "
                   f"{fmt(num(f, 'core.per_event.one_call_ns'), ' ns')} per event")),
    Row("core.dedup.bytes_per_entry", "dedup memory with 1,000,000 live 16-byte ids", " B", 100.0, False,
        lambda f: f"{fmt(num(f, 'core.dedup.memory_mb.1m'), ' MiB')} for the million"),
    Row("core.dedup.flatness", "dedup cost per op, max / min over 1k .. 1m live ids", "", 2.0, False,
        lambda f: _sizes(f, "dedup")),
    Row("core.window.flatness", "window cost per event, max / min over 1k .. 1m in flight", "", 2.0, False,
        lambda f: _sizes(f, "window")),
]


def _per_s(f: Figures, name: str) -> str:
    return fmt(num(f, name), "/s")


def _us(f: Figures, name: str) -> str:
    return fmt(num(f, name), " µs")


def _raw_e2e(f: Figures) -> str:
    return (f"raw PUSH/PULL, one 100 B frame per message: {_per_s(f, 'e2e.raw_pushpull_per_s')} "
            f"(packed 100 per message: {_per_s(f, 'e2e.raw_packed100_per_s')}); choreo {_per_s(f, 'e2e.events_per_s')}")


def _variant(variant: str) -> Callable[[Figures], str]:
    return lambda f: (f"{_per_s(f, f'e2e.{variant}.events_per_s')} vs raw {_per_s(f, 'e2e.raw_pushpull_per_s')} "
                      f"(all on: {_per_s(f, 'e2e.events_per_s')})")


def _cost(variant: str) -> Callable[[Figures], str]:
    return lambda f: (f"CPU per event, both processes: all on {_us(f, 'e2e.events.cpu_us_per_event')} vs "
                      f"{_us(f, f'e2e.{variant}.cpu_us_per_event')} without it")


def _latency(prefix: str, q: str) -> Callable[[Figures], str]:
    return lambda f: f"raw DEALER/ROUTER ping-pong {_us(f, f'latency.raw_pingpong.{q}_us')} vs {_us(f, f'{prefix}.{q}_us')}"


def _points(dimension: str, points: tuple[str, ...], what: str = "events_per_s", unit: str = "/s") -> Callable[[Figures], str]:
    def text(f: Figures) -> str:
        return " / ".join(f"{p}: {fmt(num(f, f'scale.{dimension}.{p}.{what}'), unit)}" for p in points)

    return text


def _peer(peer: str) -> Callable[[Figures], str]:
    return lambda f: (f"{_per_s(f, f'peers.{peer}.msgs_per_s')} vs choreo {_per_s(f, f'peers.{peer}.choreo_events_per_s')}; "
                      f"{_peer_guarantee(peer)}")


def _peer_guarantee(peer: str) -> str:
    from bench.peers import GUARANTEES

    return GUARANTEES.get(peer, "")


def _spread(name: str) -> str:
    """`` (rounds a–b)``: the spread of a median ratio over its rounds, when recorded."""
    return lambda f: (f" (rounds {fmt(num(f, f'{name}.min'), 'x')}–{fmt(num(f, f'{name}.max'), 'x')})"  # type: ignore[return-value]
                      if num(f, f"{name}.min") is not None else "")


def _with_spread(name: str, text: Callable[[Figures], str]) -> Callable[[Figures], str]:
    spread = _spread(name)
    return lambda f: text(f) + spread(f)  # type: ignore[operator]


E2E = "producer process → consumer process, keyed 100-byte events, 1,000 keys"
E2E_ROWS = [
    Row("e2e.events.ratio_vs_raw_pushpull", f"{E2E}; acks + dedup + per-key order + tracing on", "x", 1.0, True,
        _with_spread("e2e.events.ratio_vs_raw_pushpull", _raw_e2e)),
    Row("e2e.events.cpu_ratio_vs_raw", "the same, CPU time per event of both processes over the same round's raw "
        "push + pull per message", "x", 1.0, False,
        _with_spread("e2e.events.cpu_ratio_vs_raw", lambda f: (
            f"raw push {_us(f, 'e2e.cpu_us.push')} + pull {_us(f, 'e2e.cpu_us.pull')} vs choreo "
            f"{_us(f, 'e2e.events.cpu_us_per_event')}"))),
    Row("e2e.batch.ratio_vs_raw_pushpull", "the same guarantees, `emit_many` of 256 events to a batch handler "
        "(`@svc.on(Event, batch=True)`)", "x", 1.5, True,
        _with_spread("e2e.batch.ratio_vs_raw_pushpull", _variant("batch"))),
    Row("e2e.batch.cpu_ratio_vs_raw", "the same, CPU time per event of both processes over raw push + pull", "x",
        None, False, _with_spread("e2e.batch.cpu_ratio_vs_raw", lambda f: (
            f"raw push {_us(f, 'e2e.cpu_us.push')} + pull {_us(f, 'e2e.cpu_us.pull')} vs choreo "
            f"{_us(f, 'e2e.batch.cpu_us_per_event')}"))),
    Row("e2e.no_dedup.ratio_vs_raw_pushpull", "the same, dedup off on the consumer (at-least-once)", "x", None, True,
        _variant("no_dedup")),
    Row("e2e.no_order.ratio_vs_raw_pushpull", "the same, an unkeyed type (no per-key order)", "x", None, True,
        _variant("no_order")),
    Row("e2e.no_tracing.ratio_vs_raw_pushpull", "the same, no spans recorded (span_ring=0)", "x", None, True,
        _variant("no_tracing")),
    Row("e2e.no_guarantees.ratio_vs_raw_pushpull", "the same, dedup, order and tracing all off (acks stay)", "x", None,
        True, _variant("no_guarantees")),
    Row("e2e.dedup.cpu_ns_per_event", "what dedup adds per event (CPU time of both processes, on minus off; "
        "below zero means below what a whole-system run resolves: switching a guarantee off also changes how "
        "events batch, and the core's whole per-event cost above bounds it)", " ns",
        None, False, _cost("no_dedup")),
    Row("e2e.order.cpu_ns_per_event", "what per-key order adds per event (the same)", " ns", None, False,
        _cost("no_order")),
    Row("e2e.tracing.cpu_ns_per_event", "what tracing adds per event (the same)", " ns", None, False,
        _cost("no_tracing")),
    Row("e2e.curve.ratio_vs_plain", "the all-on workload with CURVE on every socket (a key per node), over the "
        "same without, rounds interleaved", "x", 0.8, True,
        lambda f: (f"CURVE {_per_s(f, 'e2e.curve.curve.events_per_s')} vs plain "
                   f"{_per_s(f, 'e2e.curve.plain.events_per_s')}")),
    Row("e2e.curve.cpu_ratio_vs_plain", "CPU time per event, both processes, with CURVE over without (encryption "
        "runs in ZeroMQ's I/O threads, counted here)", "x", None, False,
        lambda f: (f"CURVE {_us(f, 'e2e.curve.curve.cpu_us_per_event')} vs plain "
                   f"{_us(f, 'e2e.curve.plain.cpu_us_per_event')} per event")),
    Row("e2e.durable.ratio_vs_memory", "the all-on workload with both nodes durable (a data dir each, "
        "fsync=\"batch\": every commit on disk before the acks it covers leave), over the same in memory, rounds "
        "interleaved", "x", 0.5, True,
        lambda f: (f"durable {_per_s(f, 'e2e.durable.durable.events_per_s')} vs memory "
                   f"{_per_s(f, 'e2e.durable.memory.events_per_s')}; "
                   f"{fmt(num(f, 'e2e.durable.consumer_events_per_commit'), '')} events per consumer commit")),
    Row("e2e.durable.cpu_ratio_vs_memory", "CPU time per event, both processes, durable over memory", "x", None,
        False, lambda f: (f"durable {_us(f, 'e2e.durable.durable.cpu_us_per_event')} vs memory "
                          f"{_us(f, 'e2e.durable.memory.cpu_us_per_event')} per event")),
    Row("e2e.durable.store_bytes_per_in_flight", "a durable producer's store, per event sent and not acknowledged "
        "(its consumer stopped), 100 B payloads", " B", None, False,
        lambda f: f"{fmt(num(f, 'e2e.durable.in_flight'), '')} events in flight"),
    Row("e2e.durable.store_bytes_per_dedup_id", "a durable consumer's store, per message id it remembers "
        "(the dedup window of its type)", " B", None, False, lambda f: "bytes in use (pages not free) over ids kept"),
    Row("e2e.durable.steady.growth", "a durable consumer's store under steady load (40,000 events/s for 12 s): "
        "its largest size in the second half of the run over that in the first (once the dedup window is full; "
        "1.00: bounded)", "x", None, False,
        lambda f: f"largest {fmt(num(f, 'e2e.durable.steady.store_mb'), ' MiB')} in use"),
    Row("e2e.cpu.ratio_vs_raw", "CPU time per event, producer + consumer, over raw push + pull per message "
        "(independent of what other jobs take; medians over rounds, each side on its own)", "x", 1.0, False,
        lambda f: (f"raw push {_us(f, 'e2e.cpu_us.push')} + pull {_us(f, 'e2e.cpu_us.pull')} vs choreo producer "
                   f"{_us(f, 'e2e.cpu_us.producer')} + consumer {_us(f, 'e2e.cpu_us.consumer')}")),
]
LATENCY_ROWS = [
    Row("latency.command.p50_ratio_vs_raw_pingpong", "command round trip (send → handler → result), 100 B, p50", "x",
        None, False, _latency("latency.command", "p50")),
    Row("latency.command.p99_ratio_vs_raw_pingpong", "the same, p99", "x", 1.5, False,
        _with_spread("latency.command.p99_ratio_vs_raw_pingpong", _latency("latency.command", "p99"))),
    Row("latency.command.p999_ratio_vs_raw_pingpong", "the same, p99.9", "x", None, False,
        _latency("latency.command", "p999")),
    Row("latency.command.cpu_ratio_vs_raw_pingpong", "CPU time per round trip, both processes (independent of "
        "what other jobs take)", "x", 2.0, False, _with_spread("latency.command.cpu_ratio_vs_raw_pingpong",
        lambda f: (f"raw client {_us(f, 'latency.cpu_us.raw.client')} + echo {_us(f, 'latency.cpu_us.raw.server')} vs "
                   f"choreo caller {_us(f, 'latency.cpu_us.command.client')} + owner "
                   f"{_us(f, 'latency.cpu_us.command.server')}"))),
    Row("latency.command_under_load.p99_ratio_vs_raw_pingpong", "command round trip p99 while a producer emits to the "
        "same consumer at half the peak rate (3 busy processes on 2 cores)", "x", 5.0, False,
        _with_spread("latency.command_under_load.p99_ratio_vs_raw_pingpong",
        lambda f: (f"idle raw p99 {_us(f, 'latency.raw_pingpong.p99_us')} vs {_us(f, 'latency.command_under_load.p99_us')}"
                   f" (p50 {_us(f, 'latency.command_under_load.p50_us')}, p99.9 "
                   f"{_us(f, 'latency.command_under_load.p999_us')}) at "
                   f"{_per_s(f, 'latency.command_under_load.events_per_s')}"))),
    Row("latency.command_under_load.p99_ratio_vs_raw_under_load", "the same p99 over raw ZeroMQ's under the same "
        "load (a raw echo that also pulls 100 B payloads at that rate from a raw PUSH process), rounds interleaved",
        "x", None, False, _with_spread("latency.command_under_load.p99_ratio_vs_raw_under_load",
        lambda f: (f"raw under load p99 {_us(f, 'latency.raw_under_load.p99_us')} (p50 "
                   f"{_us(f, 'latency.raw_under_load.p50_us')}; "
                   f"{fmt(num(f, 'latency.raw_under_load.p99_ratio_vs_raw_pingpong'), 'x')} the idle raw p99)"))),
    Row("latency.command_under_load.client_cpu_ratio_vs_raw_pingpong", "the caller's CPU time per round trip under "
        "that load, over the idle raw caller's", "x", None, False,
        lambda f: (f"raw client {_us(f, 'latency.cpu_us.raw.client')} vs choreo caller "
                   f"{_us(f, 'latency.cpu_us.command_under_load.client')}")),
]
SCALE_ROWS = [
    Row("scale.keys.flatness", "events/s, max / min over 10 .. 1,000,000 distinct keys", "", 2.0, False,
        _points("keys", ("10", "1000", "100000", "1000000"))),
    Row("scale.keys.rss_bytes_per_live_key", "consumer RSS growth per extra live key (10 → 1,000,000 keys)", " B",
        None, False, _points("keys", ("10", "1000000"), "consumer_rss_mb", " MiB")),
    Row("scale.keys.dedup_bytes_per_entry", "dedup state per remembered message id, in the running consumer", " B",
        None, False, _points("keys", ("1000000",), "dedup_entries", " ids")),
    Row("scale.window.10000.events_per_s", "events/s by credit window (1 .. 10,000 in flight per channel)", "/s", None,
        True, _points("window", ("1", "10", "100", "1000", "10000"))),
    Row("scale.payload.65536.ratio_vs_raw_pushpull", "ratio to raw PUSH/PULL of the same payload, 16 B .. 64 KiB",
        "x", None, True, _points("payload", ("16", "256", "4096", "65536"), "ratio_vs_raw_pushpull", "x")),
    Row("scale.consumers.4.events_per_s", "events/s by instances of the consuming service (2 cores: a producer "
        "and 4 consumers share them)", "/s", None, True, _points("consumers", ("1", "2", "3", "4"))),
    Row("scale.consumers.4.cpu_us_per_event.max_instance", "CPU time per event sent of the busiest consuming "
        "instance, 1 .. 4 instances (each one's share of the work, which 2 cores cannot run at once)", " µs", None,
        False, _points("consumers", ("1", "2", "3", "4"), "cpu_us_per_event.max_instance", " µs")),
    Row("scale.fanout.8.deliveries_per_s", "deliveries/s (events × subscribing services), 1 .. 8 services", "/s", None,
        True, _points("fanout", ("1", "2", "4", "8"), "deliveries_per_s")),
]
STATE_ROWS = [
    Row("e2e.state.ratio_vs_stateless", "keyed read-modify-write events (a counter per key in `ctx.state`, 1,000 "
        "keys), over the same handler keeping nothing, in memory, rounds interleaved", "x", 0.7, True,
        lambda f: (f"with state {_per_s(f, 'e2e.state.state.events_per_s')} vs without "
                   f"{_per_s(f, 'e2e.state.plain.events_per_s')}")),
    Row("e2e.state.cpu_ratio_vs_stateless", "the same, CPU time per event of both processes", "x", None, False,
        lambda f: (f"with state {_us(f, 'e2e.state.state.cpu_us_per_event')} vs without "
                   f"{_us(f, 'e2e.state.plain.cpu_us_per_event')} per event")),
    Row("e2e.state.durable.ratio_vs_stateless", "the same on durable nodes (fsync=\"batch\": each write commits "
        "with its message's dedup id)", "x", None, True,
        lambda f: (f"with state {_per_s(f, 'e2e.state.state_durable.events_per_s')} vs without "
                   f"{_per_s(f, 'e2e.state.plain_durable.events_per_s')}")),
    Row("state.handover.keys_per_s", "a graceful scale-out: the keys a second instance takes over, streamed with "
        "their dedup ids from the first, per second", " keys/s", None, True,
        lambda f: f"{fmt(num(f, 'state.handover.keys'), '')} keys moved"),
    Row("state.handover.mb_per_s", "the same in bytes (chunks of half a batch, 128 KiB by default, sent as the earlier "
        "ones are acknowledged, BLAKE2b-checked)",
        " MB/s", None, True,
        lambda f: f"raw PUSH/PULL of 128 KiB frames {fmt(num(f, 'state.handover.raw_pushpull_mb_per_s'), ' MB/s')}"),
    Row("state.memory_bytes_per_key", "resident memory a key's state takes in its owner (a one-field Struct)", " B",
        None, False, lambda f: f"of which value bytes {fmt(num(f, 'state.payload_bytes_per_key'), ' B')}"),
    Row("state.disk_bytes_per_key", "store bytes in use per key on a durable instance (its message's dedup id "
        "included)", " B", None, False, lambda f: "SQLite pages in use, before over after"),
]


def _mesh(what: str, unit: str, sizes: tuple[str, ...] = ("5", "20", "60")) -> Callable[[Figures], str]:
    return lambda f: " / ".join(f"{n}: {fmt(num(f, f'scale.mesh.{what}.{n}'), unit)}" for n in sizes)


def _sim(what: str, unit: str = "", sizes: tuple[str, ...] = ("10", "100", "1000")) -> Callable[[Figures], str]:
    return lambda f: " / ".join(f"{n}: {fmt(num(f, f'scale.sim.{what}.{n}'), unit)}" for n in sizes)


MESH_ROWS = [
    Row("scale.mesh.idle_cpu_per_node.60", "CPU of an idle node, % of one core (all its threads), 60 processes of "
        "`choreo run` on 2 cores; by processes 5 / 20 / 60", "%", 0.5, False, _mesh("idle_cpu_per_node", "%")),
    Row("scale.mesh.idle_cpu_per_node.flatness", "idle CPU per node, max / min over 5, 20 and 60 processes", "", 1.5,
        False, _mesh("idle_cpu_per_node", "%")),
    Row("scale.mesh.join_seconds.60", "from starting the first process until every node sees all alive; by "
        "processes (beside: until all printed choreo-ready)", " s", None, False,
        lambda f: _mesh("join_seconds", " s")(f) + " (ready: " + _mesh("ready_seconds", " s")(f) + ")"),
    Row("scale.sim.bytes_per_node_flatness", "membership bytes per node per period, max / min over 10, 100 and "
        "1,000 simulated nodes (quiet mesh)", "", 2.0, False, _sim("bytes_per_node", " B")),
    Row("scale.sim.frames_per_node.1000", "membership frames per node per period at 1,000 nodes", "", None, False,
        _sim("frames_per_node")),
    Row("scale.sim.join_periods.1000", "periods until every node sees a newcomer, at 1,000 nodes", "", None, False,
        _sim("join_periods")),
    Row("scale.sim.crash_periods.1000", "periods until every node sees a crash (suspect_after + dead_after are 12 "
        "of them by default)", "", None, False, _sim("crash_periods")),
    Row("scale.sim.crash_spread_periods.1000", "of which from the first node that declared it dead", "", None, False,
        _sim("crash_spread_periods")),
    Row("scale.sim.leave_periods.1000", "periods until every node sees a graceful leave", "", None, False,
        _sim("leave_periods")),
    Row("scale.sim.false_suspicions_per_1000.loss_5", "suspicions of live nodes per 1,000 node-periods, 1,000 nodes, "
        "5 % of frames lost (beside: 1 %; nodes declared dead at 1 % / 5 %)", "", None, False,
        lambda f: (f"1 %: {fmt(num(f, 'scale.sim.false_suspicions_per_1000.loss_1'))}; dead: "
                   f"{fmt(num(f, 'scale.sim.false_deaths.loss_1'), '', 0)} / "
                   f"{fmt(num(f, 'scale.sim.false_deaths.loss_5'), '', 0)}; "
                   f"bytes per node per period {fmt(num(f, 'scale.sim.bytes_per_node.loss_1'), ' B')} / "
                   f"{fmt(num(f, 'scale.sim.bytes_per_node.loss_5'), ' B')}")),
]
PEER_ROWS = [
    Row("peers.redis_streams.ratio", "choreo e2e over Redis Streams (redis-py + hiredis), same workload", "x", 5.0,
        True, _peer("redis_streams")),
    Row("peers.rabbitmq.ratio", "choreo e2e over RabbitMQ (pika)", "x", 25.0, True, _peer("rabbitmq")),
    Row("peers.nats_js.ratio", "choreo e2e over NATS JetStream (nats-py)", "x", 25.0, True, _peer("nats_js")),
    Row("peers.redis_streams_aof_everysec.ratio", "choreo durable (a data dir per node, fsync=batch) over Redis "
        "Streams with AOF appendfsync everysec, same workload", "x", 3.0, True, _peer("redis_streams_aof_everysec")),
    Row("peers.nats_js_file.ratio", "choreo durable over NATS JetStream with file storage", "x", 10.0, True,
        _peer("nats_js_file")),
    Row("peers.rabbitmq_durable.ratio", "choreo durable over RabbitMQ, durable queue and persistent messages", "x",
        10.0, True, _peer("rabbitmq_durable")),
]
SECTIONS = [
    ("Core micro-benchmarks", "make bench", "bench/test_core.py", ROWS),
    ("End to end", "make bench", "bench/test_e2e.py", E2E_ROWS),
    ("Latency", "make bench", "bench/test_latency.py", LATENCY_ROWS),
    ("Handler state", "make bench", "bench/test_state.py", STATE_ROWS),
    ("How cost grows (chart: docs/bench-scaling.png)", "make bench", "bench/test_scaling.py", SCALE_ROWS),
    ("What membership costs", "make bench", "bench/test_mesh.py", MESH_ROWS),
    ("Beside the brokers users pick instead", "make bench-peers", "bench/test_peers.py", PEER_ROWS),
]


def rows_table(figures: Figures, rows: list[Row]) -> list[str]:
    lines = [
        "| figure | value | target | | baseline, same run | what |",
        "|---|---:|---|---|---|---|",
    ]
    for row in rows:
        value = num(figures, row.figure)
        lines.append(f"| `{row.figure}` | {row.value_text(value)} | {row.target_text()} | {row.verdict(value)} | "
                     f"{row.baseline(figures)} | {row.what} |")
    return lines


def table(figures: Figures) -> str:
    lines: list[str] = []
    for title, command, module, rows in SECTIONS:
        if not any(num(figures, row.figure) is not None for row in rows):
            continue  # a suite not run yet (e.g. the peers before the first make bench-peers)
        lines += [f"**{title}**: `{command}` ({module})", "", *rows_table(figures, rows), ""]
        if rows is SCALE_ROWS and CHART.exists():
            lines += [f"![how throughput grows]({CHART.relative_to(README.parent).as_posix()})", ""]
    cpu, cores, py, pyzmq, libzmq, date = (str(figures.get(f"machine.{k}", "?"))
                                           for k in ("cpu", "cores", "python", "pyzmq", "libzmq", "date"))
    lines += [
        f"Measured on {cpu} ({cores} cores), CPython {py}, pyzmq {pyzmq} / libzmq {libzmq}, {date}. "
        "Core: events in batches of 256, as the runtime feeds the core; each figure is the best round of its "
        "benchmark (the machine is shared; the medians and spreads are in the pytest-benchmark table "
        "printed by the run). End to end, latency and scaling: every node is its own process on 127.0.0.1; "
        "ratios are medians of rounds interleaved with their baseline, because absolute rates on a shared "
        "machine drift from one minute to the next. Reproduce with `" + REPRODUCE + "` (and `make bench-peers`): "
        "they rewrite these tables from `bench/results.json`, so do not edit them by hand.",
    ]
    return "\n".join(lines)


def mesh_summary(figures: Figures) -> str | None:
    """What a mesh of n nodes costs, for the README's membership section (None before a run of test_mesh)."""
    if num(figures, "scale.mesh.idle_cpu_per_node.5") is None or num(figures, "scale.sim.bytes_per_node.10") is None:
        return None

    def f(name: str, unit: str = "", digits: int = 2) -> str:
        return fmt(num(figures, name), unit, digits)

    def row(what: str, *cells: str) -> str:
        return f"| {what} | " + " | ".join(cells) + " |"

    mesh, sim = ("5", "20", "60"), ("10", "100", "1000")
    period = num(figures, "scale.sim.period_seconds") or 0.5
    crash = [num(figures, f"scale.sim.crash_periods.{n}") or 0.0 for n in sim]
    lines = [
        "| | 5 / 10 nodes | 20 / 100 nodes | 60 / 1,000 nodes |",
        "|---|---:|---:|---:|",
        row("idle node, real processes (5 / 20 / 60 `choreo run`), % of one core, all threads",
            *(f(f"scale.mesh.idle_cpu_per_node.{n}") for n in mesh)),
        row("from starting the processes until every node sees all (of which: the processes starting)",
            *(f"{f(f'scale.mesh.join_seconds.{n}', ' s', 1)} ({f(f'scale.mesh.ready_seconds.{n}', ' s', 1)})"
              for n in mesh)),
        row("membership bytes per node per period, simulated (10 / 100 / 1,000 nodes)",
            *(f(f"scale.sim.bytes_per_node.{n}", "", 0) for n in sim)),
        row("membership frames per node per period, simulated", *(f(f"scale.sim.frames_per_node.{n}") for n in sim)),
        row("periods until every node sees a join / a graceful leave, simulated",
            *(f"{f(f'scale.sim.join_periods.{n}', '', 1)} / {f(f'scale.sim.leave_periods.{n}', '', 1)}" for n in sim)),
        row("periods until every node sees a crash (of which after the first node declared it dead), simulated",
            *(f"{f(f'scale.sim.crash_periods.{n}', '', 1)} ({f(f'scale.sim.crash_spread_periods.{n}', '', 1)})"
              for n in sim)),
        "",
        f"A crash is known everywhere {min(crash):.1f} to {max(crash):.1f} periods after it happened "
        f"({min(crash) * period:.1f} to {max(crash) * period:.1f} s with the default period). At 1,000 simulated "
        f"nodes with 1 % of frames lost for 100 periods: {f('scale.sim.false_suspicions_per_1000.loss_1')} "
        f"suspicions of live nodes per 1,000 node-periods, {f('scale.sim.false_deaths.loss_1', '', 0)} deaths, "
        f"{f('scale.sim.bytes_per_node.loss_1', ' B', 0)} per node per period; with 5 %: "
        f"{f('scale.sim.false_suspicions_per_1000.loss_5')} suspicions per 1,000 node-periods, "
        f"{f('scale.sim.false_deaths.loss_5', '', 0)} deaths, {f('scale.sim.bytes_per_node.loss_5', ' B', 0)} per "
        "node per period (each suspicion and its refutation travel to every node).",
    ]
    return "\n".join(lines)


MESH_START, MESH_END = "<!-- bench:mesh:start -->", "<!-- bench:mesh:end -->"


def splice(readme: str, body: str, start_marker: str = START, end_marker: str = END) -> str | None:
    """``readme`` with ``body`` between the markers, or None when the markers are missing or out of order."""
    start, end = readme.find(start_marker), readme.find(end_marker)
    if start < 0 or end < 0 or end < start:
        return None
    return readme[: start + len(start_marker)] + "\n" + body + "\n" + readme[end:]


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
    summary = mesh_summary(figures)
    if summary is not None:
        new = splice(new, summary, MESH_START, MESH_END) or new
    if new != readme:
        README.write_text(new)
    print(f"performance table written to {README} from {RESULTS}")
    from bench.chart import draw

    chart = draw(figures)
    print(f"scaling chart written to {chart}" if chart else "no scaling chart (no scale.* figures, or no matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
