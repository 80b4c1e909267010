"""The sensors: readings every ~100 ms of event time, some arriving out of order, a few far too late."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from choreo import Service

from .messages import GetWindows, Reading, StreamEnded, Window
from .monitor import ALERT_CELSIUS
from .windows import SensorWindows

sensors = Service("sensors", emits=[Reading, StreamEnded], sends=[GetWindows], doc="the sensor gateway")


def readings(count: int, seconds: float, seed: int) -> list[Reading]:
    """Every sensor's readings in *arrival* order: mostly in time order, some delayed by up to
    250 ms (within the allowed lateness), one in fifty delayed by a second (too late)."""
    rng = random.Random(seed)
    arriving = []
    for s in range(count):
        sid = f"s{s:02d}"
        base = 18 + 4 * s % 9 + (10 if s % 5 == 0 else 0)  # every fifth sensor runs hot
        t = rng.randrange(100)
        while t < seconds * 1000:
            delay = 1000 + rng.randrange(200) if rng.random() < 0.02 else rng.randrange(250) if rng.random() < 0.2 else 0
            arriving.append((t + delay, Reading(sid, t, round(base + rng.gauss(0, 1.5), 2))))
            t += 80 + rng.randrange(40)
    arriving.sort(key=lambda pair: pair[0])
    return [r for _, r in arriving]


def reference(stream: list[Reading]) -> dict[str, list[Window]]:
    """The windows each sensor must end up with, computed in this process with the same code."""
    state: dict[str, SensorWindows] = {}
    out: dict[str, list[Window]] = {}

    def keep(sid, windows):
        for start, a in windows:
            mean = round(a.total / a.count, 3)
            out.setdefault(sid, []).append(Window(start, a.count, mean, a.low, a.high, mean > ALERT_CELSIUS))

    for r in stream:
        keep(r.sensor_id, state.setdefault(r.sensor_id, SensorWindows()).add(r.ts_ms, r.celsius))
    for sid, s in state.items():
        keep(sid, s.close_all())
    return out


@dataclass
class Outcome:
    readings: int = 0
    windows: dict[str, list[Window]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.wrong else 0


async def drive(client, system, count: int = 12, seconds: float = 6.0, seed: int = 6) -> Outcome:
    stream = readings(count, seconds, seed)
    for r in stream:
        await client.emit(r)
    for sid in sorted({r.sensor_id for r in stream}):
        await client.emit(StreamEnded(sid))
    await client.flush(timeout=60)
    expected = reference(stream)
    out = Outcome(len(stream))
    for sid in sorted(expected):
        out.windows[sid] = await client.ask(GetWindows(sid))
        if out.windows[sid] != expected[sid]:
            out.wrong.append(sid)
    total = sum(len(w) for w in out.windows.values())
    hot = sorted({sid for sid, ws in out.windows.items() if any(w.alert for w in ws)})
    late = len(stream) - sum(w.count for ws in expected.values() for w in ws)
    print(f"{len(stream)} readings from {count} sensors over {seconds:.0f} s of event time, in arrival order "
          f"(some out of order): {late} arrived after their window closed and were dropped")
    print(f"{total} one-second windows (count, mean, low, high) from "
          + ", ".join(f"{n} ({s['processed']})" for n, s in system.stats("aggregator").items()))
    print(f"hot sensors (a window's mean above {ALERT_CELSIUS:.0f} C): {', '.join(hot)}")
    print("every window equals the reference computation" if not out.wrong else f"WRONG windows for {out.wrong}")
    return out
