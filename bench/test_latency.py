"""Latency: a command's round trip (send, handler, result back) beside a raw pyzmq ping-pong.

``pinger`` (a node process) sends ``Echo`` commands one after another to ``consumer`` (another
node process), whose handler returns the command's 100-byte body; each ``await node.send(...)``
is timed. The baseline, interleaved round by round: a raw DEALER process sends the same 100
bytes to a ROUTER process that echoes them back. Percentiles are over all rounds' samples.

Under load: the same pings while a producer process emits keyed events to the same consumer at
half the peak rate measured by the end-to-end benchmark of this run (or, run alone, by a short
measurement of its own). That is three busy processes on this machine's two cores: said beside
the figure.

Rounds are interleaved (raw, then choreo, three times); the ratios' spread over rounds is
recorded beside them (``.min``/``.max``), and a CPU ratio beside every wall-clock ratio.

The same load on raw ZeroMQ, interleaved round by round: the raw echo also pulls 100-byte
payloads, at the same rate, from a raw PUSH process (serving pings first, as a node does). Its
p99 over the idle one says how much the machine's two cores alone inflate a round trip under that
load; ``latency.command_under_load.p99_ratio_vs_raw_under_load`` is choreo's over it.

Figures: ``latency.command.{p50,p99,p999}_us``, ``latency.raw_pingpong.{p50,p99,p999}_us``,
``latency.command.{p50,p99,p999}_ratio_vs_raw_pingpong``, and ``latency.command_under_load.*``
with ``latency.command_under_load.events_per_s`` (the load actually carried), and the CPU time per
round trip of each side (``latency.cpu_us.*``, ``latency.command.cpu_ratio_vs_raw_pingpong``).
"""

from __future__ import annotations

from bench.harness import (
    SESSION,
    Procs,
    choreo_run,
    cpu_seconds,
    median,
    percentiles,
    raw_pingpong,
    raw_pingpong_under_load,
    scaled,
)
from bench.results import record

ROUNDS = 3
UNDER_LOAD_ROUNDS = 3
PINGS = scaled(10_000)  # per round (or SECONDS, whichever comes first)
SECONDS = 6.0
SIZE = 100
NAMES = {50: "p50", 99: "p99", 99.9: "p999"}


def choreo_pings(procs: Procs, load: dict | None = None) -> tuple[list[int], dict | None, dict[str, float]]:
    """Round trips of Echo commands (ns); with ``load``, while a producer emits at that rate.

    Also each side's CPU seconds per round trip (``client``, ``server``; the server's include the
    500 warm-up pings and, under load, the events).
    """
    consumer = procs.node("bench.nodes:consumer")
    cpu0 = cpu_seconds(consumer.pid)
    started = procs.path("started") if load else None
    out = procs.path("pinger")
    producer_out = None
    if load:
        producer_out = procs.path("producer")
        procs.node("bench.nodes:producer", {"role": "producer", "out": producer_out, "started": started, **load},
                   peers=[consumer.endpoint])
    procs.node("bench.nodes:pinger", {"role": "pinger", "out": out, "count": PINGS, "seconds": SECONDS,
                                      "size": SIZE, "after": started}, peers=[consumer.endpoint])
    report = procs.report(out, SECONDS + 90, "pinger")
    server_cpu = cpu_seconds(consumer.pid) - cpu0
    rtts = report["rtt_ns"]
    produced = procs.report(producer_out, 120, "producer") if producer_out else None
    return rtts, produced, {"client": report["cpu_s"] / len(rtts), "server": server_cpu / (len(rtts) + 500)}


def record_percentiles(prefix: str, rtts: list[int]) -> dict[float, float]:
    p = percentiles(rtts)
    for q, name in NAMES.items():
        record(f"{prefix}.{name}_us", p[q] / 1000)
    return p


def test_command_round_trip(benchmark) -> None:
    raw: list[int] = []
    cmd: list[int] = []
    cpu: dict[str, list[float]] = {"raw.client": [], "raw.server": [], "command.client": [], "command.server": []}
    round_p99: list[float] = []  # per round: choreo p99 over the same round's raw p99
    round_cpu: list[float] = []  # per round: CPU per round trip (both sides) over raw's

    def measure() -> None:
        for _ in range(ROUNDS):
            with Procs() as procs:
                raw_rtts, used = raw_pingpong(procs, PINGS, SIZE, SECONDS)
                raw.extend(raw_rtts)
            for side, value in used.items():
                cpu[f"raw.{side}"].append(value)
            raw_cpu = used["client"] + used["server"]
            with Procs() as procs:
                rtts, _, used = choreo_pings(procs)
                cmd.extend(rtts)
            for side, value in used.items():
                cpu[f"command.{side}"].append(value)
            round_p99.append(percentiles(rtts)[99] / percentiles(raw_rtts)[99])
            round_cpu.append((used["client"] + used["server"]) / raw_cpu)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    base = record_percentiles("latency.raw_pingpong", raw)
    mine = record_percentiles("latency.command", cmd)
    for q, name in NAMES.items():
        record(f"latency.command.{name}_ratio_vs_raw_pingpong", mine[q] / base[q])
    # CPU time per round trip (both processes), which other jobs on the machine do not move
    for name, values in cpu.items():
        record(f"latency.cpu_us.{name}", median(values) * 1e6)
    record("latency.command.cpu_ratio_vs_raw_pingpong",
           (median(cpu["command.client"]) + median(cpu["command.server"]))
           / (median(cpu["raw.client"]) + median(cpu["raw.server"])))
    # the spread over rounds, each choreo round beside the raw round before it
    record("latency.command.p99_ratio_vs_raw_pingpong.min", min(round_p99))
    record("latency.command.p99_ratio_vs_raw_pingpong.max", max(round_p99))
    record("latency.command.cpu_ratio_vs_raw_pingpong.min", min(round_cpu))
    record("latency.command.cpu_ratio_vs_raw_pingpong.max", max(round_cpu))
    SESSION["latency.raw_cpu.client"] = median(cpu["raw.client"])
    SESSION["latency.raw_pingpong.p99_ns"] = base[99]
    SESSION["latency.raw_pingpong.p50_ns"] = base[50]
    SESSION["latency.raw_pingpong.p999_ns"] = base[99.9]
    benchmark.extra_info.update({"raw_samples": len(raw), "command_samples": len(cmd)})


def test_command_round_trip_under_load(benchmark) -> None:
    peak = SESSION.get("e2e.events_per_s")
    if peak is None:  # run alone: measure the peak first (one short run)
        peak = choreo_run({"count": scaled(200_000), "seconds": 3.0, "keys": 1000, "size": 100})["events_per_s"]
    rate = peak / 2
    seconds = SECONDS + 6  # the load outlasts the pings (they start once it is on)
    cmd: list[int] = []
    raw: list[int] = []  # raw ping-pong under a raw PUSH of the same rate, round by round
    carried: list[float] = []
    round_p99: list[float] = []
    round_vs_raw: list[float] = []
    client_cpu: list[float] = []

    def measure() -> None:
        for _ in range(UNDER_LOAD_ROUNDS):
            with Procs() as procs:
                raw_rtts, _ = raw_pingpong_under_load(procs, PINGS, SIZE, SECONDS, rate, b"x" * 100)
                raw.extend(raw_rtts)
            with Procs() as procs:
                rtts, produced, used = choreo_pings(
                    procs, {"count": int(rate * seconds), "seconds": seconds, "rate": rate, "keys": 1000, "size": 100}
                )
                cmd.extend(rtts)
                assert produced is not None
                carried.append(produced["count"] / produced["elapsed"])
                round_p99.append(percentiles(rtts)[99])
                round_vs_raw.append(percentiles(rtts)[99] / percentiles(raw_rtts)[99])
                client_cpu.append(used["client"])

    benchmark.pedantic(measure, rounds=1, iterations=1)
    mine = record_percentiles("latency.command_under_load", cmd)
    base = record_percentiles("latency.raw_under_load", raw)
    # what the same load does to raw ZeroMQ on this machine: how much of the ratio below is the
    # two cores', not choreo's
    for q, name in NAMES.items():
        record(f"latency.command_under_load.{name}_ratio_vs_raw_under_load", mine[q] / base[q])
    record("latency.command_under_load.p99_ratio_vs_raw_under_load.min", min(round_vs_raw))
    record("latency.command_under_load.p99_ratio_vs_raw_under_load.max", max(round_vs_raw))
    record("latency.command_under_load.target_events_per_s", rate)
    record("latency.command_under_load.events_per_s", median(carried))
    record("latency.cpu_us.command_under_load.client", median(client_cpu) * 1e6)
    if "latency.raw_pingpong.p99_ns" in SESSION:  # the idle raw baseline of this run
        for q, name in NAMES.items():
            record(f"latency.command_under_load.{name}_ratio_vs_raw_pingpong",
                   mine[q] / SESSION[f"latency.raw_pingpong.{name}_ns"])
        record("latency.command_under_load.p99_ratio_vs_raw_pingpong.min",
               min(round_p99) / SESSION["latency.raw_pingpong.p99_ns"])
        record("latency.command_under_load.p99_ratio_vs_raw_pingpong.max",
               max(round_p99) / SESSION["latency.raw_pingpong.p99_ns"])
        record("latency.raw_under_load.p99_ratio_vs_raw_pingpong", base[99] / SESSION["latency.raw_pingpong.p99_ns"])
        # the caller's CPU per round trip under load over the idle raw caller's (the owner's CPU
        # time is mostly the events then)
        record("latency.command_under_load.client_cpu_ratio_vs_raw_pingpong",
               median(client_cpu) / SESSION["latency.raw_cpu.client"])
