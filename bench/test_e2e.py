"""End-to-end throughput: a producer process emits keyed 100-byte events to a consumer process.

Beside it, in the same run and interleaved round by round (the machine is shared and noisy):
raw pyzmq PUSH/PULL of the same 100-byte payloads, one payload per ZeroMQ message (the
denominator of every ratio), and the same payloads packed 100 per message (what batching can
give, for context). Then each guarantee switched off in turn, so its cost shows:

========================  =====================================================================
variant                   what changes
========================  =====================================================================
``events``                acks, dedup, per-key order and tracing all on (the defaults)
``no_dedup``              ``NodeConfig(dedup=False)`` on the consumer (at-least-once)
``no_order``              an unkeyed event type (no per-key order, spread by load)
``no_tracing``            ``NodeConfig(span_ring=0)`` on both nodes (no spans recorded)
``no_guarantees``         all three off (acks stay: they are the delivery itself)
``batch``                 every guarantee on; ``emit_many`` of 256 events to a batch handler
========================  =====================================================================

Every run is bounded in count and time (the producer stops at whichever comes first and the
rate is what it did); every process is reaped. The producer's rate counts from its first emit
to the moment the last event is acknowledged, i.e. handled by the consumer. Correctness is
checked too (every event handled, none out of order per key), never a timing.

Figures (bench/results.json): ``e2e.events_per_s``, ``e2e.raw_pushpull_per_s``,
``e2e.events.ratio_vs_raw_pushpull`` (median of the per-round ratios; ``.min``/``.max`` their spread),
``e2e.<variant>.cpu_ratio_vs_raw`` beside each (CPU time per event of both processes over the
same round's raw push + pull per message, median and spread), ``e2e.<variant>.*``,
``e2e.<guarantee>.cpu_ns_per_event`` (what switching it on costs per event, in CPU time of both
processes), and the CPU time per event of each side beside raw pyzmq's per message
(``e2e.cpu_us.*``): CPU time does not depend on how much of the machine other jobs took.

``test_e2e_curve`` runs the ``events`` workload with CURVE on every socket (a key per node) and
without, alternating round by round: ``e2e.curve.ratio_vs_plain`` is the median of the per-round
ratios of their rates, ``e2e.curve.cpu_ratio_vs_plain`` the same for CPU time per event of both
processes (which other jobs on the machine do not move).
"""

from __future__ import annotations

import dataclasses

from bench.harness import BENCH_CONFIG, SESSION, Procs, choreo_run, median, raw_pushpull, scaled
from bench.nodes import body_for, encoded
from bench.results import record

ROUNDS = 3
COUNT = scaled(300_000)  # events per choreo run (or SECONDS, whichever comes first)
SECONDS = 4.0
RAW_COUNT = scaled(600_000)
PACKED_COUNT = scaled(2_000_000)
KEYS = 1000

NO_DEDUP = dataclasses.replace(BENCH_CONFIG, dedup=False)
NO_SPANS = dataclasses.replace(BENCH_CONFIG, span_ring=0)
NO_BOTH = dataclasses.replace(BENCH_CONFIG, dedup=False, span_ring=0)

# variant -> (producer params, consumer config, producer config)
VARIANTS = {
    "events": ({}, BENCH_CONFIG, BENCH_CONFIG),
    "no_dedup": ({}, NO_DEDUP, BENCH_CONFIG),
    "no_order": ({"unkeyed": True}, BENCH_CONFIG, BENCH_CONFIG),
    "no_tracing": ({}, NO_SPANS, NO_SPANS),
    "no_guarantees": ({"unkeyed": True}, NO_BOTH, NO_SPANS),
    "batch": ({"batch": 256}, BENCH_CONFIG, BENCH_CONFIG),
}
COSTS = {"dedup": "no_dedup", "order": "no_order", "tracing": "no_tracing"}


def check_delivery(variant: str, report: dict) -> None:
    handled = sum(c["handled"] for c in report["consumers"])
    expected = report["count"] + min(2000, COUNT)  # the warm-up events too
    assert handled >= expected, f"{variant}: {expected} events acknowledged but only {handled} handled"
    if variant != "no_dedup" and variant != "no_guarantees":
        assert handled == expected, f"{variant}: {handled} handled for {expected} sent, with dedup on"
    out_of_order = sum(c["out_of_order"] for c in report["consumers"])
    assert out_of_order == 0, f"{variant}: {out_of_order} events handled out of order for their key"


def test_e2e_throughput(benchmark) -> None:
    payload = encoded(f"k{KEYS // 2}", COUNT // 2, body_for(100, f"k{KEYS // 2}", COUNT // 2))
    rates: dict[str, list[float]] = {"raw": [], "packed": [], **{v: [] for v in VARIANTS}}
    ratios: dict[str, list[float]] = {v: [] for v in [*VARIANTS, "packed"]}
    cpu: dict[str, list[float]] = {"push": [], "pull": [], "producer": [], "consumer": []}
    variant_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per round: over that round's raw push + pull
    sizes = []

    def measure() -> None:
        for _ in range(ROUNDS):
            with Procs() as procs:
                raw = raw_pushpull(procs, RAW_COUNT, payload)
                packed = raw_pushpull(procs, PACKED_COUNT, payload, pack=100)
            rates["raw"].append(raw["per_s"])
            rates["packed"].append(packed["per_s"])
            ratios["packed"].append(packed["per_s"] / raw["per_s"])
            cpu["push"].append(raw["push_cpu_per"])
            cpu["pull"].append(raw["pull_cpu_per"])
            for variant, (params, consumer_config, producer_config) in VARIANTS.items():
                report = choreo_run(
                    {"count": COUNT, "seconds": SECONDS, "keys": KEYS, "size": 100, **params},
                    consumer_config=consumer_config,
                    producer_config=producer_config,
                )
                check_delivery(variant, report)
                rates[variant].append(report["events_per_s"])
                ratios[variant].append(report["events_per_s"] / raw["per_s"])
                sizes.append(report["payload_bytes"])
                both = (report["cpu_s"] + report["consumer_cpu_s"]) / report["count"]
                variant_cpu[variant].append(both)
                cpu_ratios[variant].append(both / (raw["push_cpu_per"] + raw["pull_cpu_per"]))
                if variant == "events":
                    cpu["producer"].append(report["cpu_s"] / report["count"])
                    cpu["consumer"].append(report["consumer_cpu_s"] / report["count"])

    benchmark.pedantic(measure, rounds=1, iterations=1)

    record("e2e.payload_bytes", median(sizes))
    record("e2e.raw_pushpull_per_s", median(rates["raw"]))
    record("e2e.raw_packed100_per_s", median(rates["packed"]))
    record("e2e.raw_packed100.ratio_vs_raw_pushpull", median(ratios["packed"]))
    for variant in VARIANTS:
        prefix = "e2e" if variant == "events" else f"e2e.{variant}"
        record(f"{prefix}.events_per_s", median(rates[variant]))
        record(f"e2e.{variant}.ratio_vs_raw_pushpull", median(ratios[variant]))
        # the spread of the per-round ratios, and the CPU ratio beside the wall-clock one
        record(f"e2e.{variant}.ratio_vs_raw_pushpull.min", min(ratios[variant]))
        record(f"e2e.{variant}.ratio_vs_raw_pushpull.max", max(ratios[variant]))
        record(f"e2e.{variant}.cpu_ratio_vs_raw", median(cpu_ratios[variant]))
        record(f"e2e.{variant}.cpu_ratio_vs_raw.min", min(cpu_ratios[variant]))
        record(f"e2e.{variant}.cpu_ratio_vs_raw.max", max(cpu_ratios[variant]))
    SESSION["e2e.events_per_s"] = median(rates["events"])
    for variant, values in variant_cpu.items():
        record(f"e2e.{variant}.cpu_us_per_event", median(values) * 1e6)
    for guarantee, without in COSTS.items():
        # what the guarantee adds per event: CPU time (producer + consumer) with it on, minus without it;
        # CPU time rather than wall time, which moves with what other jobs take from the machine
        record(f"e2e.{guarantee}.cpu_ns_per_event",
               (median(variant_cpu["events"]) - median(variant_cpu[without])) * 1e9)
    for side, values in cpu.items():
        record(f"e2e.cpu_us.{side}", median(values) * 1e6)
    record("e2e.cpu.ratio_vs_raw", (median(cpu["producer"]) + median(cpu["consumer"]))
           / (median(cpu["push"]) + median(cpu["pull"])))
    benchmark.extra_info.update({k: [round(x) for x in v] for k, v in rates.items()})


CURVE_ROUNDS = 5


class Alternating:
    """Two variants of the ``events`` workload, alternating round by round (neither always first):
    their rates and CPU per event, and per round the ratio of the second to the first."""

    def __init__(self, base: str, other: str) -> None:
        self.base, self.other = base, other
        self.rates: dict[str, list[float]] = {base: [], other: []}
        self.cpu: dict[str, list[float]] = {base: [], other: []}
        self.ratios: list[float] = []
        self.cpu_ratios: list[float] = []

    def run(self, rounds: int, **options_of: dict) -> list[dict]:
        """``options_of[variant]``: choreo_run's keyword arguments; returns every report."""
        reports = []
        for i in range(rounds):
            order = (self.base, self.other) if i % 2 == 0 else (self.other, self.base)
            rate, cpu = {}, {}
            for variant in order:
                report = choreo_run({"count": COUNT, "seconds": SECONDS, "keys": KEYS, "size": 100},
                                    **options_of[variant])
                check_delivery("events", report)
                report["variant"] = variant
                reports.append(report)
                rate[variant] = report["events_per_s"]
                cpu[variant] = (report["cpu_s"] + report["consumer_cpu_s"]) / report["count"]
                self.rates[variant].append(rate[variant])
                self.cpu[variant].append(cpu[variant])
            self.ratios.append(rate[self.other] / rate[self.base])
            self.cpu_ratios.append(cpu[self.other] / cpu[self.base])
        return reports

    def record(self, prefix: str, benchmark) -> None:  # type: ignore[no-untyped-def]
        """``PREFIX.ratio_vs_BASE``, ``PREFIX.cpu_ratio_vs_BASE`` (medians of the per-round ratios) and
        each variant's ``events_per_s`` and ``cpu_us_per_event``."""
        record(f"{prefix}.ratio_vs_{self.base}", median(self.ratios))
        record(f"{prefix}.cpu_ratio_vs_{self.base}", median(self.cpu_ratios))
        for variant in self.rates:
            record(f"{prefix}.{variant}.events_per_s", median(self.rates[variant]))
            record(f"{prefix}.{variant}.cpu_us_per_event", median(self.cpu[variant]) * 1e6)
        benchmark.extra_info.update({"ratios": [round(r, 3) for r in self.ratios],
                                     "cpu_ratios": [round(r, 3) for r in self.cpu_ratios],
                                     **{k: [round(x) for x in v] for k, v in self.rates.items()}})


def test_e2e_curve(benchmark) -> None:
    runs = Alternating("plain", "curve")

    def measure() -> None:
        runs.run(CURVE_ROUNDS, plain={}, curve={"secure": True})

    benchmark.pedantic(measure, rounds=1, iterations=1)
    runs.record("e2e.curve", benchmark)


# ------------------------------------------------------------------------------------------------ durable

DURABLE_ROUNDS = 5


def test_e2e_durable(benchmark) -> None:
    """The ``events`` workload with every node durable (``fsync="batch"``: each commit on disk
    before the acks it covers leave) and with none, alternating round by round.

    ``e2e.durable.ratio_vs_memory`` is the median of the per-round ratios of their rates;
    ``e2e.durable.cpu_ratio_vs_memory`` the same for CPU time per event of both processes. Each
    durable consumer's store says how many ids it keeps and the bytes it uses for them
    (``e2e.durable.store_bytes_per_dedup_id``) and how many events each commit carried.
    """
    runs = Alternating("memory", "durable")
    per_id: list[float] = []
    per_commit: list[float] = []

    def measure() -> None:
        for report in runs.run(DURABLE_ROUNDS, memory={}, durable={"fsync": "batch"}):
            if report["variant"] == "durable":
                store = report["consumer_stores"][0]
                per_id.append(store["used_bytes"] / max(store["dedup_ids"], 1))
                per_commit.append((report["count"] + min(2000, COUNT)) / max(store["commits"], 1))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    runs.record("e2e.durable", benchmark)
    record("e2e.durable.store_bytes_per_dedup_id", median(per_id))
    record("e2e.durable.consumer_events_per_commit", median(per_commit))


def test_e2e_durable_store(benchmark) -> None:
    """What a durable node's store holds, and that it stays bounded.

    In flight: a durable producer emits 4,000 events (less than its window) to a consumer the
    benchmark has stopped (SIGSTOP): nothing is acknowledged, everything stays in the producer's
    outbox; ``e2e.durable.store_bytes_per_in_flight`` is the growth of the bytes its store uses
    over the events in flight. Steady load: a producer emits at a fixed rate for a while to a
    durable consumer, whose store is sampled every half second:
    ``e2e.durable.steady.store_mb`` is its largest size (bytes in use) in the second half of the
    run, ``e2e.durable.steady.growth`` that over its largest size in the first half once the
    dedup window is full (1.0: bounded).
    """
    import os
    import signal
    import time

    from bench.harness import BENCH_CONFIG as CONFIG
    from bench.harness import Procs
    from choreo.client import rpc

    figures: dict[str, float] = {}

    def measure() -> None:
        with Procs() as procs:  # in flight: the consumer stopped, nothing acknowledged
            consumer = procs.node("bench.nodes:consumer", fsync="batch")
            started, out = procs.path("started"), procs.path("producer")
            procs.node("bench.nodes:producer", {"role": "producer", "out": out, "count": 4000, "keys": KEYS,
                                                "size": 100, "started": started, "hold": True},
                       peers=[consumer.endpoint], config=CONFIG, fsync="batch")
            before = procs.report(started, 60, "producer warm-up")["store"]["used_bytes"]
            os.kill(consumer.pid, signal.SIGSTOP)
            try:
                with open(started + ".go", "w"):
                    pass
                report = procs.report(out, 60, "producer")
                figures["in_flight"] = report["in_flight"]
                figures["per_in_flight"] = (report["store"]["used_bytes"] - before) / report["in_flight"]
            finally:
                os.kill(consumer.pid, signal.SIGCONT)
        with Procs() as procs:  # steady load
            consumer = procs.node("bench.nodes:consumer", fsync="batch")
            out = procs.path("producer")
            seconds, rate = 12.0, 40_000
            procs.node("bench.nodes:producer", {"role": "producer", "out": out, "count": int(seconds * rate),
                                                "seconds": seconds, "rate": rate, "keys": KEYS, "size": 100},
                       peers=[consumer.endpoint], config=CONFIG, fsync="batch")
            samples: list[tuple[float, int]] = []
            t0 = time.monotonic()
            while not os.path.exists(out) and time.monotonic() - t0 < seconds + 60:
                store = rpc(consumer.endpoint, "stats", timeout=10)["store"]
                samples.append((time.monotonic() - t0, store["used_bytes"]))
                time.sleep(0.5)
            procs.report(out, 60, "producer")
        full = [s for s in samples if s[0] > 100_000 / rate + 1.0]  # after the dedup window (100,000 ids) filled
        half = len(full) // 2
        figures["steady_mb"] = max(b for _, b in full[half:]) / 2**20
        figures["growth"] = max(b for _, b in full[half:]) / max(b for _, b in full[:half])

    benchmark.pedantic(measure, rounds=1, iterations=1)

    record("e2e.durable.store_bytes_per_in_flight", figures["per_in_flight"])
    record("e2e.durable.in_flight", figures["in_flight"])
    record("e2e.durable.steady.store_mb", figures["steady_mb"])
    record("e2e.durable.steady.growth", figures["growth"])
