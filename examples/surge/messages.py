"""The surge's one message: a click on the shop's site, keyed by the browsing session."""

from choreo import Event


class Click(Event, key="session_id"):
    session_id: str
    n: int
    page: str
