"""Handler state: what ``ctx.state`` costs per event, what a key takes, how fast a partition moves.

``test_e2e_state``: a producer process emits keyed 100-byte events to one consumer process
whose handler counts them per key, read-modify-write, either in ``ctx.state`` (``counter_state``)
or in a module dict (``counter_plain``, the same handler otherwise), alternating round by round.
``e2e.state.ratio_vs_stateless`` is the median of the per-round ratios of their rates;
``e2e.state.cpu_ratio_vs_stateless`` the same for CPU time per event of both processes. The same
pair on durable nodes (both processes with a data dir, ``fsync="batch"``) gives
``e2e.state.durable.ratio_vs_stateless``: what state adds to a durable node (whose dict counter
would not survive a restart; its ``ctx.state`` does). Every count is checked: as many counted as
sent, with dedup on.

``test_state_memory_and_handover``: one ``counter_state`` instance gets one event for each of
``HANDOVER_KEYS`` keys; what its memory grew by, per key (``state.memory_bytes_per_key``;
``state.payload_bytes_per_key`` is the keys and values alone); on a durable instance, what its
store grew by (``state.disk_bytes_per_key``, the key's dedup id included). Then a second instance joins and
half the partitions stream to it: ``state.handover.keys_per_s`` and ``state.handover.mb_per_s``
(from the first stream sent to the last one installed, on the sender's clock), beside raw
pyzmq PUSH/PULL of 128 KiB messages between two processes in the same run
(``state.handover.mb_ratio_vs_raw``: the stream moves in chunks of about that size).
"""

from __future__ import annotations

import time

from bench.harness import BENCH_CONFIG, Procs, choreo_run, median, raw_pushpull, scaled
from bench.results import record
from choreo.client import RpcError, rpc

ROUNDS = 3
COUNT = scaled(300_000)
SECONDS = 4.0
KEYS = 1000
HANDOVER_KEYS = scaled(200_000)
VARIANTS = {"plain": None, "state": None, "plain_durable": "batch", "state_durable": "batch"}  # -> fsync
CHUNK = 128 << 10


def ask(endpoint: str) -> dict:
    """The ``bench`` system query of a counter node (its task registers it a moment after start)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return rpc(endpoint, "bench", timeout=10)  # type: ignore[no-any-return]
        except RpcError as exc:
            if "unknown method" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def counted(report: dict, service: str) -> None:
    (consumer,) = report["consumers"]
    expected = report["count"] + min(2000, COUNT)  # the warm-up events too
    assert consumer["handled"] == expected, f"{service}: {consumer['handled']} handled for {expected} sent"
    assert consumer["counted"] == expected, f"{service}: counted {consumer['counted']} of {expected} events"


def test_e2e_state(benchmark) -> None:
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {"memory": [], "durable": []}
    cpu_ratios: dict[str, list[float]] = {"memory": [], "durable": []}

    def measure() -> None:
        for i in range(ROUNDS):
            order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))  # neither always first
            round_rates, round_cpu = {}, {}
            for variant in order:
                service = "counter_state" if variant.startswith("state") else "counter_plain"
                report = choreo_run({"count": COUNT, "seconds": SECONDS, "keys": KEYS, "size": 100},
                                    services={service: 1}, fsync=VARIANTS[variant])
                counted(report, variant)
                round_rates[variant] = report["events_per_s"]
                round_cpu[variant] = (report["cpu_s"] + report["consumer_cpu_s"]) / report["count"]
                rates[variant].append(round_rates[variant])
                cpu[variant].append(round_cpu[variant])
            for mode, suffix in (("memory", ""), ("durable", "_durable")):
                ratios[mode].append(round_rates[f"state{suffix}"] / round_rates[f"plain{suffix}"])
                cpu_ratios[mode].append(round_cpu[f"state{suffix}"] / round_cpu[f"plain{suffix}"])

    benchmark.pedantic(measure, rounds=1, iterations=1)

    record("e2e.state.ratio_vs_stateless", median(ratios["memory"]))
    record("e2e.state.cpu_ratio_vs_stateless", median(cpu_ratios["memory"]))
    record("e2e.state.durable.ratio_vs_stateless", median(ratios["durable"]))
    record("e2e.state.durable.cpu_ratio_vs_stateless", median(cpu_ratios["durable"]))
    for variant in rates:
        record(f"e2e.state.{variant}.events_per_s", median(rates[variant]))
        record(f"e2e.state.{variant}.cpu_us_per_event", median(cpu[variant]) * 1e6)
    benchmark.extra_info.update({"ratios": {k: [round(r, 3) for r in v] for k, v in ratios.items()}})


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
            before = ask(first.endpoint)
            assert before["keys"] == HANDOVER_KEYS, before
            figures["state.memory_bytes_per_key"] = (before["rss_kb"] - before["rss_start_kb"]) * 1024 / before["keys"]
            figures["state.payload_bytes_per_key"] = before["state_bytes"] / before["keys"]
            second = procs.node("bench.nodes:counter_state", peers=[first.endpoint], config=BENCH_CONFIG)
            deadline = time.monotonic() + 120
            while True:
                moved = ask(first.endpoint)
                if moved["transfers"]["streams_done"] and not moved["moving"]:
                    break
                assert time.monotonic() < deadline, f"the partitions did not move within 120 s: {moved}"
                time.sleep(0.05)
            after = ask(second.endpoint)
            kept = ask(first.endpoint)
            assert after["keys"] + kept["keys"] == HANDOVER_KEYS, "every key on exactly one instance"
            assert after["counted"] + kept["counted"] == before["counted"], "every count moved with its key"
            t = moved["transfers"]
            seconds = t["last_done_at"] - t["first_sent_at"]
            figures["state.handover.keys"] = after["keys"]
            figures["state.handover.keys_per_s"] = after["keys"] / seconds
            figures["state.handover.mb_per_s"] = t["bytes_sent"] / seconds / 1e6
            figures["state.handover.raw_pushpull_mb_per_s"] = raw_mb_per_s
            figures["state.handover.mb_ratio_vs_raw"] = figures["state.handover.mb_per_s"] / raw_mb_per_s
        with Procs() as procs:  # on disk: one durable instance with the same keys
            node = procs.node("bench.nodes:counter_state", config=BENCH_CONFIG, fsync="batch")
            empty = ask(node.endpoint)["store"]["used_bytes"]
            procs.produce({"count": HANDOVER_KEYS, "seconds": 120, "keys": HANDOVER_KEYS, "size": 100,
                           "wait": {"counter_state": 1}}, [node.endpoint], timeout=240)
            full = ask(node.endpoint)
            assert full["keys"] == HANDOVER_KEYS, full
            # (each key's one message left its dedup id too: ~19 bytes of it are that)
            figures["state.disk_bytes_per_key"] = (full["store"]["used_bytes"] - empty) / full["keys"]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for name, value in figures.items():
        record(name, value)
    benchmark.extra_info.update({k: round(v, 3) for k, v in figures.items()})
