"""The gateway: the site's front door, where the clicks come in. It ramps its ingestion rate up
past what one processor handles, and the driver adds a second processor in the middle.

Phases (seconds from the start): warm-up below one processor's capacity; surge above it with
one processor (backpressure: ``emit`` waits for credit, so the gateway cannot go faster than the
processor; the processor's lag rises to the credit window and stays there); then a second
processor joins (partitions move to it) and the lag comes down while the surge goes on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from choreo import Service

from .messages import Click
from .processor import CAPACITY

gateway = Service("gateway", emits=[Click], doc="the site's front door")

WINDOW = 200  # the gateway's credit per processor: at most this many clicks in flight to one


@dataclass
class Phase:
    name: str
    rate: float  # clicks per second the site tries to push in
    seconds: float
    started: float = 0.0  # time.monotonic()
    ended: float = 0.0
    emitted: int = 0


@dataclass
class Sample:
    t: float  # time.monotonic()
    phase: str
    processors: int
    emitted: int
    in_flight: int
    backpressure_waits: int
    lag: dict[str, int]  # processor instance -> clicks received and not yet handled
    processed: dict[str, int]


@dataclass
class Outcome:
    phases: list[Phase]
    samples: list[Sample] = field(default_factory=list)
    emitted: int = 0
    exit_status: int = 0


async def produce(client, phase: Phase, counter: list[int]) -> None:
    """Offer clicks at ``phase.rate`` for ``phase.seconds``; ``emit`` waits when credit runs out.

    A click that has to wait delays the ones behind it: the site slows down for its users, and
    what it could not take in time is not made up for later (the backpressure reached them).
    """
    phase.started = time.monotonic()
    deadline = phase.started + phase.seconds
    due = phase.started
    while (now := time.monotonic()) < deadline:
        if due > now:
            await asyncio.sleep(due - now)
            continue
        n = counter[0]
        await client.emit(Click(f"s{n % 1000:03d}", n, "/sale"), timeout=30)
        counter[0] += 1
        phase.emitted += 1
        due = max(due + 1.0 / phase.rate, time.monotonic() - 0.01)  # at most 10 ms of catching up
    phase.ended = time.monotonic()


async def sample(client, system, out: Outcome, current: list[str], every: float = 0.1) -> None:
    while True:
        stats = await asyncio.to_thread(system.stats, "processor")
        mine = client.stats()
        out.samples.append(Sample(
            time.monotonic(), current[0], len(stats), mine.emitted, mine.in_flight, mine.backpressure_waits,
            {name: sum(s["lag"].values()) for name, s in stats.items()},
            {name: s["processed"] for name, s in stats.items()},
        ))
        await asyncio.sleep(every)


def rate(samples: list[Sample], field_: str, start: float, end: float) -> float:
    """Per-second rate of a counter (emitted, or processed summed) between two times."""
    inside = [s for s in samples if start <= s.t <= end]
    if len(inside) < 2:
        return 0.0
    value = (lambda s: s.emitted) if field_ == "emitted" else (lambda s: sum(s.processed.values()))
    return (value(inside[-1]) - value(inside[0])) / (inside[-1].t - inside[0].t)


def mean_lag(samples: list[Sample], start: float, end: float) -> float:
    inside = [sum(s.lag.values()) for s in samples if start <= s.t <= end]
    return sum(inside) / len(inside) if inside else 0.0


async def drive(client, system, warmup: float = 200, surge: float = 550, seconds: float = 2.5) -> Outcome:
    """Warm up, surge with one processor, add a second one, keep surging; print what the metrics show."""
    phases = [Phase("warm-up", warmup, 1.0), Phase("surge, 1 processor", surge, seconds),
              Phase("surge, 2 processors", surge, seconds + 0.5)]
    out = Outcome(phases)
    current = [phases[0].name]
    counter = [0]
    sampler = asyncio.ensure_future(sample(client, system, out, current))
    print(f"processor capacity {CAPACITY:.0f} clicks/s per instance; gateway credit window {WINDOW} per processor")
    try:
        for i, phase in enumerate(phases):
            current[0] = phase.name
            if i == 2:
                work = asyncio.ensure_future(produce(client, phase, counter))
                await system.add("processor")  # while the surge goes on
                await work
            else:
                await produce(client, phase, counter)
            report(out, phase)
        await client.flush(timeout=60)
    finally:
        sampler.cancel()
    out.emitted = counter[0]
    one, two = phases[1], phases[2]
    lag_one = mean_lag(out.samples, one.ended - 1.0, one.ended)
    lag_two = mean_lag(out.samples, two.ended - 1.0, two.ended)
    peak = max(max(s.lag.values(), default=0) for s in out.samples)
    waits = out.samples[-1].backpressure_waits
    print(f"backpressure reached the gateway: emit waited for credit {waits} times; it ingested "
          f"{rate(out.samples, 'emitted', one.ended - 1.0, one.ended):.0f} clicks/s of the {one.rate:.0f} offered "
          "(last second with one processor)")
    print(f"consumer lag rose to {peak} and stayed bounded by the gateway's credit window ({WINDOW} per processor)")
    print(f"a second processor brought the lag down: {lag_one:.0f} -> {lag_two:.0f} (mean over each phase's last second)")
    print(f"all {out.emitted} clicks handled")
    return out


def report(out: Outcome, phase: Phase) -> None:
    last = out.samples[-1] if out.samples else None
    lag = ", ".join(f"{k} {v}" for k, v in last.lag.items()) if last else "-"
    print(f"{phase.name:<22} offered {phase.rate:4.0f}/s  ingested "
          f"{rate(out.samples, 'emitted', phase.started, phase.ended):4.0f}/s  handled "
          f"{rate(out.samples, 'processed', phase.started, phase.ended):4.0f}/s  "
          f"in flight {last.in_flight if last else 0:3d}  lag: {lag}")
