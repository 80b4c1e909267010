"""Handler state: what ``ctx.state`` costs per event, what a key takes, how fast a partition moves.

``test_e2e_state``: a producer process emits keyed 100-byte events to one consumer process
whose handler counts them per key, read-modify-write, either in ``ctx.state`` (``counter_state``)
or in a module dict (``counter_plain``, the same handler otherwise), alternating round by round.
``e2e.state.ratio_vs_stateless`` is the median of the per-round ratios of their rates;
``e2e.state.cpu_ratio_vs_stateless`` the same for CPU time per event of both processes.
Every count is checked: as many counted as sent, with dedup on.

``test_state_memory_and_handover``: one ``counter_state`` instance gets one event for each of
``HANDOVER_KEYS`` keys; what its memory grew by, per key (``state.memory_bytes_per_key``;
``state.payload_bytes_per_key`` is the keys and values alone). Then a second instance joins and
half the partitions stream to it: ``state.handover.keys_per_s`` and ``state.handover.mb_per_s``
(from the first stream sent to the last one installed, on the sender's clock), beside raw
pyzmq PUSH/PULL of 128 KiB messages between two processes in the same run
(``state.handover.mb_ratio_vs_raw``: the stream moves in chunks of about that size).
"""

from __future__ import annotations

import time

from bench.harness import BENCH_CONFIG, Procs, choreo_run, median, raw_pushpull, scaled
from bench.results import record
from choreo.client import rpc

ROUNDS = 3
COUNT = scaled(300_000)
SECONDS = 4.0
KEYS = 1000
HANDOVER_KEYS = scaled(200_000)
CHUNK = 128 << 10


def counted(report: dict, service: str) -> None:
    (consumer,) = report["consumers"]
    expected = report["count"] + min(2000, COUNT)  # the warm-up events too
    assert consumer["handled"] == expected, f"{service}: {consumer['handled']} handled for {expected} sent"
    assert consumer["counted"] == expected, f"{service}: counted {consumer['counted']} of {expected} events"


def test_e2e_state(benchmark) -> None:
    rates: dict[str, list[float]] = {"plain": [], "state": []}
    cpu: dict[str, list[float]] = {"plain": [], "state": []}
    ratios: list[float] = []
    cpu_ratios: list[float] = []

    def measure() -> None:
        for i in range(ROUNDS):
            order = ("plain", "state") if i % 2 == 0 else ("state", "plain")
            round_rates, round_cpu = {}, {}
            for variant in order:
                service = f"counter_{variant}"
                report = choreo_run({"count": COUNT, "seconds": SECONDS, "keys": KEYS, "size": 100},
                                    services={service: 1})
                counted(report, service)
                round_rates[variant] = report["events_per_s"]
                round_cpu[variant] = (report["cpu_s"] + report["consumer_cpu_s"]) / report["count"]
                rates[variant].append(round_rates[variant])
                cpu[variant].append(round_cpu[variant])
            ratios.append(round_rates["state"] / round_rates["plain"])
            cpu_ratios.append(round_cpu["state"] / round_cpu["plain"])

    benchmark.pedantic(measure, rounds=1, iterations=1)

    record("e2e.state.ratio_vs_stateless", median(ratios))
    record("e2e.state.cpu_ratio_vs_stateless", median(cpu_ratios))
    for variant in rates:
        record(f"e2e.state.{variant}.events_per_s", median(rates[variant]))
        record(f"e2e.state.{variant}.cpu_us_per_event", median(cpu[variant]) * 1e6)
    benchmark.extra_info.update({"ratios": [round(r, 3) for r in ratios],
                                 "cpu_ratios": [round(r, 3) for r in cpu_ratios]})


def test_state_memory_and_handover(benchmark) -> None:
    figures: dict[str, float] = {}

    def measure() -> None:
        with Procs() as procs:
            raw = raw_pushpull(procs, scaled(4000), b"x" * CHUNK)
        raw_mb_per_s = raw["per_s"] * CHUNK / 1e6
        with Procs() as procs:
            first = procs.node("bench.nodes:counter_state", config=BENCH_CONFIG)
            procs.produce({"count": HANDOVER_KEYS, "seconds": 60, "keys": HANDOVER_KEYS, "size": 100,
                           "wait": {"counter_state": 1}}, [first.endpoint], timeout=180)
            before = rpc(first.endpoint, "bench", timeout=10)
            assert before["keys"] == HANDOVER_KEYS, before
            figures["state.memory_bytes_per_key"] = (before["rss_kb"] - before["rss_start_kb"]) * 1024 / before["keys"]
            figures["state.payload_bytes_per_key"] = before["state_bytes"] / before["keys"]
            second = procs.node("bench.nodes:counter_state", peers=[first.endpoint], config=BENCH_CONFIG)
            deadline = time.monotonic() + 120
            while True:
                moved = rpc(first.endpoint, "bench", timeout=10)
                if moved["transfers"]["streams_done"] and not moved["moving"]:
                    break
                assert time.monotonic() < deadline, f"the partitions did not move within 120 s: {moved}"
                time.sleep(0.05)
            after = rpc(second.endpoint, "bench", timeout=10)
            kept = rpc(first.endpoint, "bench", timeout=10)
            assert after["keys"] + kept["keys"] == HANDOVER_KEYS, "every key on exactly one instance"
            assert after["counted"] + kept["counted"] == before["counted"], "every count moved with its key"
            t = moved["transfers"]
            seconds = t["last_done_at"] - t["first_sent_at"]
            figures["state.handover.keys"] = after["keys"]
            figures["state.handover.keys_per_s"] = after["keys"] / seconds
            figures["state.handover.mb_per_s"] = t["bytes_sent"] / seconds / 1e6
            figures["state.handover.raw_pushpull_mb_per_s"] = raw_mb_per_s
            figures["state.handover.mb_ratio_vs_raw"] = figures["state.handover.mb_per_s"] / raw_mb_per_s

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for name, value in figures.items():
        record(name, value)
    benchmark.extra_info.update({k: round(v, 3) for k, v in figures.items()})
