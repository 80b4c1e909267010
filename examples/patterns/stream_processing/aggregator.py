"""aggregator: per-sensor tumbling windows over the readings; runs as several instances.

The readings are keyed by sensor, so all of one sensor's readings reach one instance, in the
order they were sent, and only that instance holds the sensor's open windows: the aggregate
does not depend on how many instances share the work.
"""

from choreo import Service

from .messages import Reading, StreamEnded, WindowClosed
from .windows import WINDOW_MS, SensorWindows

aggregator = Service("aggregator")

_sensors: dict[str, SensorWindows] = {}


def _closed(sensor_id: str, windows) -> list[WindowClosed]:
    return [
        WindowClosed(sensor_id, start, start + WINDOW_MS, agg.count, round(agg.total / agg.count, 3), agg.low, agg.high)
        for start, agg in windows
    ]


@aggregator.on(Reading, emits=[WindowClosed])
def add(reading: Reading, ctx) -> None:
    state = _sensors.setdefault(reading.sensor_id, SensorWindows())
    for window in _closed(reading.sensor_id, state.add(reading.ts_ms, reading.celsius)):
        ctx.emit(window)


@aggregator.on(StreamEnded, emits=[WindowClosed])
def end(event: StreamEnded, ctx) -> None:
    state = _sensors.pop(event.sensor_id, SensorWindows())
    for window in _closed(event.sensor_id, state.close_all()):
        ctx.emit(window)
