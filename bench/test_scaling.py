"""How cost grows: the end-to-end workload with one dimension pushed at a time.

Each point is one short run (a producer process, fresh consumer processes; bounded in count
and in time, the rate is what it did), with the defaults of the end-to-end benchmark
(keyed 100-byte events, 1,000 keys, acks, dedup, per-key order, tracing) except for:

* ``keys``: distinct keys 10 .. 1,000,000 (the 1,000,000 point sends a million events, so
  every key is live), with the consumer's resident memory (RSS) and its dedup state; the
  order check of the bench handler is off here, so its own dict does not count as choreo's;
* ``window``: credit per channel 1 .. 10,000 (on both nodes);
* ``payload``: encoded event 16 B .. 64 KiB, each beside raw PUSH/PULL of the same payload in
  the same run (16 B means "as small as the fixed fields allow", about 20 B);
* ``consumers``: 1 .. 4 instances of the consuming service (the machine has 2 cores: beyond
  one producer and one consumer, instances share cores: the rate shows that, not scale-out;
  ``scale.consumers.<n>.cpu_us_per_event.max_instance``, the busiest instance's CPU time per
  event sent, shows each instance's share of the work falling as instances are added, and
  ``.all`` what they cost together);
* ``fanout``: 1 .. 8 subscribing services, one process each (every event is delivered to each;
  ``deliveries_per_s`` counts them all).

Figures: ``scale.<dimension>.<point>.events_per_s`` and the extras named below; the chart
(``docs/bench-scaling.png``) is drawn from them by ``python -m bench.report``.
"""

from __future__ import annotations

import dataclasses

from bench.harness import BENCH_CONFIG, Procs, choreo_run, raw_pushpull, scaled
from bench.nodes import body_for, encoded
from bench.results import record

COUNT = scaled(200_000)
SECONDS = 3.0
KEYS = [10, 1_000, 100_000, 1_000_000]
WINDOWS = [1, 10, 100, 1_000, 10_000]
PAYLOADS = [16, 256, 4096, 65536]
CONSUMERS = [1, 2, 3, 4]
FANOUT = [1, 2, 4, 8]
RAW_BYTES = 1 << 30  # at most this many payload bytes per raw run
NO_CHECK = {"CHOREO_BENCH_CHECK": "0"}  # the bench handler's order check keeps a dict per key: off


def run(params: dict, **kw) -> dict:
    return choreo_run({"count": COUNT, "seconds": SECONDS, "keys": 1000, "size": 100, **params}, **kw)


def test_scale_keys(benchmark) -> None:
    reports: dict[int, dict] = {}

    def measure() -> None:
        for n in KEYS:
            count = max(COUNT, scaled(n))
            reports[n] = run({"keys": n, "count": count, "seconds": max(SECONDS, count / 150_000)}, env=NO_CHECK)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    rates = []
    for n, r in reports.items():
        consumer = r["consumers"][0]
        live = min(n, r["count"])
        record(f"scale.keys.{n}.events_per_s", r["events_per_s"])
        record(f"scale.keys.{n}.consumer_rss_mb", r["rss_after_kb"][0] / 1024)
        record(f"scale.keys.{n}.dedup_entries", consumer["dedup_entries"])
        rates.append(r["events_per_s"])
        benchmark.extra_info[f"keys={n}"] = {"live": live, "busy_keys": consumer["busy_keys"],
                                              "dedup_bytes": consumer["dedup_bytes"]}
    record("scale.keys.flatness", max(rates) / min(rates))
    lo, hi = reports[KEYS[0]], reports[KEYS[-1]]
    live_hi, live_lo = min(KEYS[-1], hi["count"]), min(KEYS[0], lo["count"])
    # RSS growth between the fewest and the most live keys, per extra key: what per-key state costs
    record("scale.keys.rss_bytes_per_live_key",
           (hi["rss_after_kb"][0] - lo["rss_after_kb"][0]) * 1024 / max(live_hi - live_lo, 1))
    dedup = hi["consumers"][0]
    record("scale.keys.dedup_bytes_per_entry", dedup["dedup_bytes"] / max(dedup["dedup_entries"], 1))


def test_scale_window(benchmark) -> None:
    reports: dict[int, dict] = {}

    def measure() -> None:
        for w in WINDOWS:
            config = dataclasses.replace(BENCH_CONFIG, window=w)
            reports[w] = run({}, consumer_config=config, producer_config=config)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for w, r in reports.items():
        record(f"scale.window.{w}.events_per_s", r["events_per_s"])


def test_scale_payload(benchmark) -> None:
    rates: dict[int, tuple[float, float, int]] = {}

    def measure() -> None:
        for size in PAYLOADS:
            count = max(1000, min(COUNT, RAW_BYTES // size))
            body = body_for(size)
            payload = encoded("k500", 1 << 20, body)
            with Procs() as procs:
                raw = raw_pushpull(procs, count, payload)
            r = run({"size": size, "count": count})
            rates[size] = (r["events_per_s"], raw["per_s"], r["payload_bytes"])

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for size, (mine, raw, actual) in rates.items():
        record(f"scale.payload.{size}.events_per_s", mine)
        record(f"scale.payload.{size}.raw_pushpull_per_s", raw)
        record(f"scale.payload.{size}.ratio_vs_raw_pushpull", mine / raw)
        record(f"scale.payload.{size}.encoded_bytes", actual)


def test_scale_consumers(benchmark) -> None:
    reports: dict[int, dict] = {}

    def measure() -> None:
        for n in CONSUMERS:
            reports[n] = run({}, services={"consumer": n})

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for n, r in reports.items():
        record(f"scale.consumers.{n}.events_per_s", r["events_per_s"])
        # two cores cannot run more instances at once: what scales out is each instance's share
        # of the work, its CPU time per event the producer sent (the busiest instance's)
        record(f"scale.consumers.{n}.cpu_us_per_event.max_instance", max(r["consumer_cpu_each"]) / r["count"] * 1e6)
        record(f"scale.consumers.{n}.cpu_us_per_event.all", r["consumer_cpu_s"] / r["count"] * 1e6)
        handled = [c["handled"] for c in r["consumers"]]
        assert sum(c["out_of_order"] for c in r["consumers"]) == 0, f"{n} consumers: events out of order per key"
        benchmark.extra_info[f"consumers={n}"] = handled


def test_scale_fanout(benchmark) -> None:
    reports: dict[int, dict] = {}

    def measure() -> None:
        for n in FANOUT:
            names = ["consumer"] + [f"consumer_{i}" for i in range(1, n)]
            reports[n] = run({}, services={name: 1 for name in names})

    benchmark.pedantic(measure, rounds=1, iterations=1)
    for n, r in reports.items():
        record(f"scale.fanout.{n}.events_per_s", r["events_per_s"])
        record(f"scale.fanout.{n}.deliveries_per_s", r["events_per_s"] * n)
        for c in r["consumers"]:
            assert c["handled"] >= r["count"], f"fan-out {n}: a subscriber handled {c['handled']} of {r['count']}"
