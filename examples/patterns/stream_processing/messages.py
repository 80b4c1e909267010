"""Stream processing: temperature readings in, one aggregate per sensor and second out."""

from __future__ import annotations

import msgspec

from choreo import Event, Query


class Reading(Event, key="sensor_id"):
    sensor_id: str
    ts_ms: int  # event time: when the sensor measured, not when the reading arrived
    celsius: float


class StreamEnded(Event, key="sensor_id"):
    """The sensor is done: close its open windows (keyed like the readings, so it comes after them)."""

    sensor_id: str


class WindowClosed(Event, key="sensor_id"):
    sensor_id: str
    start_ms: int
    end_ms: int
    count: int
    mean: float
    low: float
    high: float


class Window(msgspec.Struct, frozen=True):
    start_ms: int
    count: int
    mean: float
    low: float
    high: float
    alert: bool


class GetWindows(Query, key="sensor_id", returns=list[Window]):
    sensor_id: str
