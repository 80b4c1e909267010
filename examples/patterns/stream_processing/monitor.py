"""monitor: keeps every sensor's closed windows, and flags the hot ones."""

from choreo import Service

from .messages import GetWindows, Window, WindowClosed

monitor = Service("monitor")

ALERT_CELSIUS = 30.0

_windows: dict[str, list[Window]] = {}


@monitor.on(WindowClosed)
def keep(event: WindowClosed) -> None:
    _windows.setdefault(event.sensor_id, []).append(
        Window(event.start_ms, event.count, event.mean, event.low, event.high, event.mean > ALERT_CELSIUS)
    )


@monitor.query(GetWindows)
def get_windows(query: GetWindows) -> list[Window]:
    return list(_windows.get(query.sensor_id, []))
